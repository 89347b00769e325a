"""Token ids → text, one token at a time, for streaming.

Two things make a token's text not final when it arrives:
- byte-level (and byte-fallback) tokens may hold part of a multi-byte UTF-8 character: decoding
  then ends in U+FFFD, so that text waits until a later token completes the character;
- the text may be the beginning of a stop string: it waits until the stop string either
  appears (the sequence stops, the text is cut just before it) or can no longer appear there.

Decoding is `tokenizers`' own `DecodeStream`: a short window of ids (the tokens made final by
the previous step plus the new ones) decoded and differenced in Rust, as vLLM does in Python
(0.8 us a token against 2.7 us for two `decode` calls from Python, which at batch 128 was a
third of a millisecond of host time per step). Decoders that treat the start of a text
specially (SentencePiece strips one leading space) see context: the stream starts with the last
prompt tokens, so the first generated token keeps its leading space.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

CONTEXT_TOKENS = 5  # prompt tokens the stream starts from


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str] | None = None,
                 skip_special_tokens: bool = True, min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        # vLLM's min_tokens: no stop string is looked for before this many tokens; from then on,
        # one that ends in new text (as vLLM's window over the new characters)
        self.min_tokens = min_tokens
        self.stopped = False
        self.token_ids: list[int] = []  # generated ids
        context = list(prompt_ids[-CONTEXT_TOKENS:])
        if self._decode(context).endswith("\ufffd"):
            context = []  # the prompt ends mid-character: no context
        try:
            self._stream = DecodeStream(ids=context or None, skip_special_tokens=skip_special_tokens)
        except TypeError:  # tokenizers without prefilled streams: the same window, decoded from Python
            self._stream = None
        self._settled = context  # the ids the stream made final last (context for a final flush)
        self._pending: list[int] = []  # ids the stream holds back: an incomplete character so far
        self._decoded = ""  # text of the final ids (cut at a stop string once stopped)
        self._emitted = 0  # chars of _decoded returned as deltas so far
        self._finished = False

    @property
    def text(self) -> str:
        """The generated text that is final so far: the concatenation of every delta returned."""
        return self._decoded[: self._emitted]

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became final (may be empty)."""
        self.token_ids.append(token_id)
        if self.stopped or self._finished:
            return ""
        self._advance(token_id)
        return self._emit(final=self.stopped)

    def finish(self) -> str:
        """The sequence ended: release held-back text (an incomplete character decodes as U+FFFD)."""
        if self._finished:
            return ""
        self._finished = True
        if not self.stopped:
            self._advance(None)
        return self._emit(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, token_id: int | None) -> None:
        """Feed one id to the stream (None: flush what it holds back, an incomplete character
        decoding as U+FFFD), move the text it makes final into _decoded, look for stop strings."""
        if token_id is not None:
            self._pending.append(token_id)
        if not self._pending:
            return
        text = None
        if token_id is not None and self._stream is not None:
            try:
                text = self._stream.step(self.tokenizer, token_id)
            except Exception:  # the stream refused a window (tokenizers' InvalidPrefix): Python from here on
                self._stream = None
        if token_id is None or self._stream is None:
            text = self._window_text(flush=token_id is None)
        if text is None:
            return  # nothing new yet, or a character still incomplete
        self._settled, self._pending = self._pending, []
        old_len = len(self._decoded)
        self._decoded += text
        self._check_stop(old_len)

    def _window_text(self, flush: bool) -> str | None:
        """What `DecodeStream.step` computes, in Python: the window's text past the settled ids'
        (None while it ends mid-character or adds nothing, unless flushing)."""
        prefix = self._decode(self._settled)
        text = self._decode(self._settled + self._pending)
        if not flush and (len(text) <= len(prefix) or text.endswith("\ufffd")):
            return None
        return text[len(prefix):]

    def _check_stop(self, old_len: int) -> None:
        """Cut at the earliest stop string that ends in the new text (earlier text was checked already)."""
        if len(self.token_ids) < self.min_tokens:
            return
        hits = [
            i for s in self.stop
            if (i := self._decoded.find(s, max(old_len - len(s) + 1, 0))) >= 0
        ]
        if hits:
            self._decoded = self._decoded[: min(hits)]
            self.stopped = True

    def _emit(self, final: bool) -> str:
        end = len(self._decoded) if final else len(self._decoded) - self._stop_prefix_len()
        end = max(end, self._emitted)
        delta = self._decoded[self._emitted:end]
        self._emitted = end
        return delta

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string (it must wait)."""
        text = self._decoded
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
