"""Expert weights in host memory, paged onto the compute device one layer ahead (CGOPipe's copies).

An offloaded artifact's graph calls `moec::external_moe(..., layer)`, which asks the pager for
that layer's weights. The first `resident_expert_layers` MoE layers (the plan's choice) live on
the device for good; every other layer goes through a double buffer of two layers' experts:
while layer i computes from one slot, the next streamed layer copies into the other on a copy
stream of its own, ordered by CUDA events (the copy waits until the compute stream has finished
with the slot it overwrites; the compute waits until the copy has landed). After the last layer
the first streamed layer of the next step is fetched, so steps chain without a bubble.

A step may run as several micro-batches at once, one thread each (`moec.runtime.micro_batches`):
each streamed layer still crosses the link once per step, shared by all of them, and a slot is
overwritten only once every micro-batch has moved past the layer it holds (a micro-batch that
runs ahead waits for the others).

For a handful of tokens (interactive use at batch 1) streaming whole layers wastes the link: most
experts go unused. When T*K < E the pager reads which experts the tokens chose (a host sync)
and serves them from an LRU cache of (layer, expert) slots, copying only the missing ones, with
the token's expert ids mapped to cache slots. The cache is the plan's own (`cache_experts`, what
the plan's batch leaves free) or, when the plan left it none, the double buffer itself: two
layers' worth of expert slots that a step of a few tokens does not stream through. A step that
streams again takes the slots back (the cache forgets), and one that caches first waits for any
copy still landing in them.

Every byte the pager puts on the device goes through a `DeviceBudget` holding the plan's GPU
budget (the compiled weights and the KV cache are charged first), so a plan that does not fit
fails at load, not halfway through a request. On a machine without a GPU the same code runs
with the "device" and the host both in CPU memory (copies are synchronous there): what CI runs.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from contextlib import contextmanager

import torch

from moec.artifact import Artifact
from moec.artifact.reader import open_weights
from moec.errors import ArtifactError


class DeviceBudget:
    """Bytes placed on the compute device, against a limit: `take` refuses what would pass it."""

    def __init__(self, limit: int):
        self.limit, self.used, self.peak = limit, 0, 0

    def take(self, nbytes: int, what: str) -> None:
        if self.used + nbytes > self.limit:
            raise ArtifactError(f"offload: {what} ({nbytes / 2**20:.1f} MiB) would pass the GPU budget of "
                                f"{self.limit / 2**20:.1f} MiB ({self.used / 2**20:.1f} MiB in use); recompile with "
                                "a larger offload.gpu_memory or fewer resident expert layers")
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def empty_like(self, t: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
        self.take(t.numel() * t.element_size(), what)
        return torch.empty(t.shape, dtype=t.dtype, device=device)


class ExpertPager:
    """The expert executor of an offloaded artifact (`moec::external_moe`); see the module docstring."""

    def __init__(self, artifact: Artifact, device: torch.device, budget: DeviceBudget):
        plan = artifact.manifest.offload
        self.device, self.budget = device, budget
        self.cuda = device.type == "cuda"
        layers = sorted(plan["experts"], key=lambda e: e["layer"])
        names = [n for e in layers for n in (e["gate_up_proj"], e["down_proj"])]
        host = open_weights(artifact, device="cpu", names=names)
        missing = [n for n in names if n not in host]
        if missing:
            raise ArtifactError(f"{artifact.weights_path}: lacks the offloaded expert weight {missing[0]}; recompile")
        if self.cuda:  # pinned: copies run asynchronously at the link's full rate
            host = {name: t.pin_memory() for name, t in host.items()}
        self.host = [(host[e["gate_up_proj"]], host[e["down_proj"]]) for e in layers]
        num_resident = int(plan["policy"]["resident_expert_layers"])
        self.resident: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in range(min(num_resident, len(layers))):
            w13, w2 = self.host[layer]
            on_device = (budget.empty_like(w13, device, f"resident experts of MoE layer {layer}"),
                         budget.empty_like(w2, device, f"resident experts of MoE layer {layer}"))
            on_device[0].copy_(w13)
            on_device[1].copy_(w2)
            self.resident[layer] = on_device
        self.streamed = [layer for layer in range(len(layers)) if layer not in self.resident]
        self.slots: list[tuple[torch.Tensor, torch.Tensor]] = []
        double = None  # [2, E, ...] per weight: slot i is double[i]
        if self.streamed:
            double = tuple(budget.empty_like(t.new_empty((2, *t.shape), device="meta"), device,
                                             "the expert double buffer") for t in self.host[self.streamed[0]])
            self.slots = [(double[0][i], double[1][i]) for i in range(2)]
        # few tokens (T*K < E, so some experts surely go unused): only the chosen experts, through
        # an LRU cache of (layer, expert) slots: the plan's, or else the double buffer's 2E slots
        self.num_experts = int(self.host[0][0].shape[0])
        self.top_k = int(artifact.manifest.moe_regions[0].top_k)
        cache_size = min(int(plan["policy"].get("cache_experts", 0)), len(self.streamed) * self.num_experts)
        self.cache = None
        self.cache_in_slots = False
        if self.streamed and cache_size >= self.top_k:
            w13, w2 = self.host[self.streamed[0]]
            self.cache = tuple(budget.empty_like(t.new_empty((cache_size, *t.shape[1:]), device="meta"), device,
                                                 "the expert cache") for t in (w13, w2))
        elif self.streamed:
            self.cache = tuple(t.flatten(0, 1) for t in double)
            self.cache_in_slots = True
        self.cache_slots: OrderedDict[tuple[int, int], int] = OrderedDict()  # least recently used first
        self.cache_hits = self.cache_misses = 0
        # the double buffer: what each slot holds, as (step, position in `streamed`), and when its copy lands
        self.slot_key: list[tuple[int, int] | None] = [None, None]
        self.ready: list[torch.cuda.Event | None] = [None, None]
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        # micro-batches of one step run the graph in threads (CGOPipe); each holds one streamed
        # layer at a time, in order: `progress[j]` is micro-batch j's position in `streamed`
        # (-1 before its first, inf when it is done), and a slot is free once all have moved past it
        self.lock = threading.Condition()
        self.local = threading.local()
        self.step = 0
        self.progress: list[float] = [math.inf]
        self.bytes_copied = 0
        self.copies = 0
        self.waits = 0  # weights asked for before their prefetch was issued (a bubble)

    # ------------------------------------------------------------------ steps and micro-batches
    @contextmanager
    def micro_batches(self, count: int):
        """One step run as `count` micro-batches; each runs inside `micro_batch(j)`, in its own thread."""
        with self.lock:
            self._begin(count)
        yield

    @contextmanager
    def micro_batch(self, index: int):
        self.local.index = index
        try:
            yield
        finally:
            self.local.index = None
            with self.lock:
                self.progress[index] = math.inf
                self._prefetch()
                self.lock.notify_all()

    def _begin(self, count: int) -> None:
        self.step += 1
        self.progress = [-1] * count

    def _enter(self, position: int) -> None:
        """This thread's micro-batch now holds streamed `position`. Outside `micro_batches` a step is
        one micro-batch, and a new step starts whenever the layers start over."""
        index = getattr(self.local, "index", None)
        if index is None:
            if len(self.progress) != 1 or position <= self.progress[0]:
                self._begin(1)
            index = 0
        self.progress[index] = position

    def _free(self, slot: int) -> bool:
        key = self.slot_key[slot]
        return key is None or key[0] < self.step or (key[0] == self.step and all(p > key[1] for p in self.progress))

    def _wanted(self) -> tuple[int, int] | None:
        """The next (step, position) to bring in: the first this step's micro-batches still need
        that no slot holds, else the next step's first; nothing when no layer streams."""
        if not self.streamed:
            return None
        held = set(self.slot_key)
        first = min(self.progress)  # the furthest-behind micro-batch; inf when all are done
        start = len(self.streamed) if first == math.inf else max(0, int(first))
        for position in range(start, len(self.streamed)):
            if (self.step, position) not in held:
                return self.step, position
        return None if (self.step + 1, 0) in held else (self.step + 1, 0)

    def _prefetch(self) -> None:
        """Bring in what is wanted next if a slot is free (a slot already holding that layer is
        relabelled, not copied again)."""
        key = self._wanted()
        if key is None:
            return
        free = [slot for slot in (0, 1) if self._free(slot)]
        if not free:
            return
        layer = self.streamed[key[1]]
        same = [slot for slot in free if self.slot_key[slot] is not None
                and self.streamed[self.slot_key[slot][1]] == layer]
        if same:
            self.slot_key[same[0]] = key
            return
        self._copy(layer, free[0])
        self.slot_key[free[0]] = key
        self.lock.notify_all()

    def _copy(self, layer: int, slot: int) -> None:
        """Copy `layer`'s experts into `slot`, after the compute stream is done with what is there."""
        w13, w2 = self.host[layer]
        dst13, dst2 = self.slots[slot]
        if self.cuda:
            freed = torch.cuda.current_stream(self.device).record_event()
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(freed)
                dst13.copy_(w13, non_blocking=True)
                dst2.copy_(w2, non_blocking=True)
                self.ready[slot] = self.copy_stream.record_event()
        else:
            dst13.copy_(w13)
            dst2.copy_(w2)
        self.bytes_copied += w13.numel() * w13.element_size() + w2.numel() * w2.element_size()
        self.copies += 1

    def run(self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
            activation: str, plan: str) -> torch.Tensor:
        """`moec::external_moe`'s body: `fused_moe` on the weights `experts` made ready."""
        w13, w2, ids = self.experts(layer, topk_ids)
        return torch.ops.moec.fused_moe(hidden, w13, w2, topk_weights, ids, activation, plan)

    def experts(self, layer: int, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w13, w2, ids) ready on the device: the layer's experts and the ids as they are, or, for
        a few tokens, a cache holding every expert they chose and the ids mapped to its slots."""
        if (layer not in self.resident and self.cache is not None and topk_ids.numel() < self.num_experts
                and getattr(self.local, "index", None) is None):  # not one of several micro-batches
            needed = sorted(set(topk_ids.flatten().tolist()))  # a host sync: worth it for a few tokens
            if len(needed) <= self.cache[0].shape[0]:
                if self.cache_in_slots:
                    self._slots_to_cache()
                return self._from_cache(layer, needed, topk_ids)
        w13, w2 = self.weights(layer)
        return w13, w2, topk_ids

    def _slots_to_cache(self) -> None:
        """The double buffer becomes the cache: whatever a streaming step copied (or is copying)
        into the slots is forgotten, once the compute stream has waited for those copies."""
        with self.lock:
            if self.slot_key == [None, None]:
                return
            if self.cuda:
                for ready in self.ready:
                    if ready is not None:
                        torch.cuda.current_stream(self.device).wait_event(ready)
            self.slot_key, self.ready = [None, None], [None, None]

    def _from_cache(self, layer: int, needed: list[int], topk_ids: torch.Tensor):
        cache13, cache2 = self.cache
        slots = []
        for expert in needed:
            key = (layer, expert)
            if key in self.cache_slots:
                self.cache_hits += 1
                self.cache_slots.move_to_end(key)
            else:
                self.cache_misses += 1
                if len(self.cache_slots) < cache13.shape[0]:
                    slot = len(self.cache_slots)
                else:  # evict the least recently used expert this call does not need
                    victim = next(k for k in self.cache_slots if k[0] != layer or k[1] not in needed)
                    slot = self.cache_slots.pop(victim)
                w13, w2 = self.host[layer]
                # on the compute stream: ordered after every kernel that read the slot before
                cache13[slot].copy_(w13[expert], non_blocking=self.cuda)
                cache2[slot].copy_(w2[expert], non_blocking=self.cuda)
                self.bytes_copied += w13[expert].numel() * w13.element_size() + w2[expert].numel() * w2.element_size()
                self.cache_slots[key] = slot
            slots.append(self.cache_slots[key])
        lookup = torch.zeros(self.num_experts, dtype=topk_ids.dtype)
        lookup[needed] = torch.tensor(slots, dtype=topk_ids.dtype)
        return cache13, cache2, lookup.to(topk_ids.device, non_blocking=True)[topk_ids]

    def weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.resident:
            return self.resident[layer]
        position = self.streamed.index(layer)
        with self.lock:
            if self.cache_in_slots:  # streaming overwrites the slots: the cache in them is gone
                self.cache_slots.clear()
            self._enter(position)
            key = (self.step, position)
            if key not in self.slot_key and self._wanted() == key and any(map(self._free, (0, 1))):
                self.waits += 1  # nothing prefetched it (the first step): fetched now
            while key not in self.slot_key:  # another micro-batch still holds both slots: wait for it
                self._prefetch()
                if key not in self.slot_key:
                    self.lock.wait()
            slot = self.slot_key.index(key)
            ready = self.ready[slot]
            self._prefetch()  # the layer after it, into the other slot once every micro-batch is past what is there
        if self.cuda and ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        return self.slots[slot]

    def stats(self) -> dict:
        return {"resident_layers": sorted(self.resident), "streamed_layers": self.streamed,
                "bytes_copied": self.bytes_copied, "copies": self.copies, "unprefetched_fetches": self.waits,
                "cache_experts": self.cache[0].shape[0] if self.cache is not None else 0,
                "cache_in_double_buffer": self.cache_in_slots,
                "cache_hits": self.cache_hits, "cache_misses": self.cache_misses,
                "device_bytes_peak": self.budget.peak, "device_budget": self.budget.limit}
