"""The engine on a thread of its own, for the server: requests in, streams of text out.

The HTTP side (asyncio) submits requests and reads `RequestStream`s; the engine thread admits
them between steps, runs steps while there is work, and sends each sequence's new text back to
the event loop it came from. Aborts (client gone, timeout) free the KV blocks at the next step
boundary. If the engine thread dies, `healthy` turns False and every open stream ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from moec.errors import RequestError
from moec.runtime.engine import Engine
from moec.runtime.rank_loop import HEARTBEAT_S, LOAD_EVERY_S, Orders, RankSequences, exchange_orders, gather_emitted, params_dict
from moec.runtime.sampler import SamplingParams
from moec.runtime.sequence import Sequence
from moec.runtime.stream_event import StreamEvent

log = logging.getLogger("moec.engine")


class QueueFull(RequestError):
    """Too many requests are waiting: the client should retry later (HTTP 429)."""


class ShuttingDown(RequestError):
    """The server is draining and takes no new requests (HTTP 503)."""


class RequestStream:
    """Async iterator over one request's events; the last one has `finish_reason` set."""

    def __init__(self, owner: EngineLoop, seq: Sequence, loop: asyncio.AbstractEventLoop):
        self.request_id = seq.request_id
        self.seq = seq
        self._owner = owner
        self._loop = loop
        self._queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._sent_first = False

    def _deliver(self, event: StreamEvent) -> None:
        """Called on the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone: nobody is listening
            pass

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        while True:
            event = await self._queue.get()
            yield event
            if event.finish_reason is not None:
                return

    def abort(self) -> None:
        self._owner._post("abort", self)


class EngineLoop:
    def __init__(self, engine: Engine, max_queue: int = 256):
        self.engine = engine
        self.max_queue = max_queue
        self.healthy = True
        self._inbox: list[tuple[str, RequestStream]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[Sequence, RequestStream] = {}
        self._accepting = True
        self._stopping = False
        self._cancel_all = False
        self._thread = threading.Thread(target=self._run, name="moec-engine", daemon=True)
        # expert-parallel group: this loop is rank 0's and gives the other ranks their orders
        world = getattr(engine, "world", 1)
        self.group = world > 1
        self.on_failure = None  # called on the engine thread if it dies (the server exits then)
        self._by_id: dict[str, RequestStream] = {}
        self._rank_of: dict[str, int] = {}
        self._load = [0] * world
        self._share = RankSequences(engine) if self.group else None
        self.expert_load: dict | None = None  # the group's, refreshed every LOAD_EVERY_S
        self._load_at = 0.0

    def start(self) -> None:
        self._thread.start()

    # --- called from the event loop ---------------------------------------------------------

    def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> RequestStream:
        if not self._accepting:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        if not self.healthy:
            raise ShuttingDown("the engine has stopped; see the server log")
        seq = self.engine.new_sequence(prompt, params, request_id=request_id)
        with self._lock:
            if self._num_waiting() >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting; retry later")
            stream = RequestStream(self, seq, asyncio.get_running_loop())
            self._inbox.append(("add", stream))
        self._wake.set()
        return stream

    def _post(self, kind: str, stream: RequestStream) -> None:
        with self._lock:
            self._inbox.append((kind, stream))
        self._wake.set()

    def _num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + sum(1 for kind, _ in self._inbox if kind == "add")

    def stats(self) -> dict:
        allocator = self.engine.allocator
        with self._lock:
            waiting = self._num_waiting()
        return {
            "num_running": len(self.engine.scheduler.running),
            "num_waiting": waiting,
            "kv_usage": allocator.usage,
            "kv_blocks_total": allocator.num_blocks,
            "kv_blocks_free": allocator.num_free,
            "expert_load": self.expert_load,
        }

    async def shutdown(self, cancel_running: bool = False, timeout: float = 30.0) -> None:
        """Take no new requests; let running ones finish (or abort them), then stop the thread."""
        self._accepting = False
        self._cancel_all = cancel_running
        self._stopping = True
        self._wake.set()
        if not self._thread.is_alive():
            return
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)
        if self._thread.is_alive():
            self._cancel_all = True
            self._wake.set()
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    # --- the engine thread ------------------------------------------------------------------

    def _event(self, seq: Sequence, stream: RequestStream, text: str, new_ids: list[int]) -> None:
        logprobs = None  # the new tokens' `TokenLogprob`s, where the request asked
        if new_ids and seq.output_logprobs:
            logprobs = seq.output_logprobs[len(seq.output_ids) - len(new_ids):]
        event = StreamEvent(text, new_ids, seq.finish_reason, len(seq.prompt_ids), len(seq.output_ids),
                            time=time.perf_counter(), logprobs=logprobs)
        if not stream._sent_first:
            stream._sent_first = True
            event.queue_time_s = (seq.first_scheduled or event.time) - seq.arrived
            event.prompt_logprobs = seq.prompt_logprobs  # complete: the prompt ran before any token
        stream._deliver(event)

    def _abort(self, stream: RequestStream) -> None:
        seq = stream.seq
        if seq.finished:
            return
        self.engine.abort(seq)
        self._streams.pop(seq, None)
        self._event(seq, stream, seq.detok.finish(), [])

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for kind, stream in inbox:
            if kind == "add" and not stream.seq.finished:
                self._streams[stream.seq] = stream
                self.engine.scheduler.add(stream.seq)
            elif kind == "abort":
                self._abort(stream)

    def _orders(self) -> tuple[Orders, dict[str, Sequence]]:
        """The inbox as orders for the group: each new request to the rank with the fewest live ones."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
        orders, local = Orders(), {}
        for kind, stream in inbox:
            rid = stream.request_id
            if kind == "add" and not stream.seq.finished:
                rank = min(range(len(self._load)), key=self._load.__getitem__)
                self._load[rank] += 1
                self._rank_of[rid], self._by_id[rid] = rank, stream
                orders.adds.append((rid, list(stream.seq.prompt_ids), params_dict(stream.seq.params), rank))
                if rank == 0:
                    local[rid] = stream.seq
            elif kind == "abort" and rid in self._by_id:
                orders.aborts.append(rid)
        if self._cancel_all:
            orders.aborts += [rid for rid in self._by_id if rid not in orders.aborts]
        return orders, local

    def _finish_remote(self, rid: str) -> None:
        self._by_id.pop(rid, None)
        self._load[self._rank_of.pop(rid)] -= 1

    def _run_group(self) -> None:
        world = self.engine.world
        while True:
            orders, local = self._orders()
            orders.stop = self._stopping and not self._by_id and not orders.adds
            orders.report_load = time.perf_counter() - self._load_at >= LOAD_EVERY_S
            exchange_orders(orders, 0, world)
            if orders.stop:
                return
            if orders.report_load:
                self.expert_load = self.engine.expert_load()
                self._load_at = time.perf_counter()
            self._share.apply(orders, local)
            for rid in orders.aborts:  # the clients hear at once; the owning rank frees its blocks
                stream = self._by_id.get(rid)
                if stream is not None:
                    seq = stream.seq
                    seq.finish_reason = seq.finish_reason or "abort"
                    self._event(seq, stream, seq.detok.finish(), [])
                    self._finish_remote(rid)
            busy, emitted = self._share.step()
            if not busy:
                self._wake.wait(timeout=HEARTBEAT_S)
                self._wake.clear()
                continue
            for e in gather_emitted(emitted, 0, world):
                stream = self._by_id.get(e.request_id)
                if stream is None:
                    continue
                seq = stream.seq
                if self._rank_of.get(e.request_id) != 0:  # rank 0's own sequences are up to date already
                    seq.first_scheduled = seq.first_scheduled or time.perf_counter()
                    seq.output_ids.append(e.token)
                    if e.logprob is not None:
                        seq.output_logprobs.append(e.logprob)
                    seq.finish_reason = e.finish_reason
                self._event(seq, stream, e.text, [e.token])
                if e.finish_reason is not None:
                    self._finish_remote(e.request_id)

    def _run(self) -> None:
        try:
            if self.group:
                self._run_group()
                return
            while True:
                self._drain_inbox()
                if self._cancel_all:
                    for stream in list(self._streams.values()):
                        self._abort(stream)
                if self._stopping and not self.engine.scheduler.has_work():
                    return
                if not self.engine.scheduler.has_work():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                emitted, _ = self.engine.step()
                for seq, text in emitted:
                    stream = self._streams.get(seq)
                    if stream is not None:
                        self._event(seq, stream, text, seq.output_ids[-1:])
                        if seq.finished:
                            del self._streams[seq]
        except Exception:
            log.exception("engine thread failed")
            self.healthy = False
            self._accepting = False
            for stream in [*self._streams.values(), *self._by_id.values()]:
                stream.seq.finish_reason = stream.seq.finish_reason or "abort"
                self._event(stream.seq, stream, "", [])
            self._streams.clear()
            self._by_id.clear()
            if self.on_failure is not None:
                self.on_failure()
