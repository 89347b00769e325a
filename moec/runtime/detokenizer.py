"""Token ids → text, one token at a time, for streaming.

Two things make a token's text not final when it arrives:
- byte-level (and byte-fallback) tokens may hold part of a multi-byte UTF-8 character: decoding
  then ends in U+FFFD, so that text waits until a later token completes the character;
- the text may be the beginning of a stop string: it waits until the stop string either
  appears (the sequence stops, the text is cut just before it) or can no longer appear there.

Decoding works on a short window of ids (the tokens made final by the previous push plus the
new ones) and takes the difference, as vLLM does: each push costs O(1), and decoders that treat
the start of a text specially (SentencePiece strips one leading space) see context. The first
window starts in the prompt, so the first generated token keeps its leading space.
"""

from __future__ import annotations

from tokenizers import Tokenizer

CONTEXT_TOKENS = 5  # prompt tokens in the first decoding window


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.stopped = False
        self.token_ids: list[int] = []  # generated ids
        self._ids = list(prompt_ids)  # prompt + generated: the decoding window slides over it
        self._read_offset = len(self._ids)  # ids before this are decoded into _decoded
        self._prefix_offset = max(len(self._ids) - CONTEXT_TOKENS, 0)  # window start
        if self._decode(self._ids[self._prefix_offset:]).endswith("\ufffd"):
            self._prefix_offset = self._read_offset  # prompt ends mid-character: no context
        self._decoded = ""  # text of the generated ids up to _read_offset (cut at a stop string once stopped)
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
        self._ids.append(token_id)
        self._advance(flush=False)
        return self._emit(final=self.stopped)

    def finish(self) -> str:
        """The sequence ended: release held-back text (an incomplete character decodes as U+FFFD)."""
        if self._finished:
            return ""
        self._finished = True
        if not self.stopped:
            self._advance(flush=True)
        return self._emit(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, flush: bool) -> None:
        """Move complete text from the decoding window into _decoded, then look for stop strings."""
        window = self._ids[self._prefix_offset:]
        if len(window) == self._read_offset - self._prefix_offset:
            return
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(window)
        if not flush and (len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")):
            return  # nothing new yet, or a character still incomplete
        old_len = len(self._decoded)
        self._decoded += new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> None:
        """Cut at the earliest stop string that ends in the new text (earlier text was checked already)."""
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
