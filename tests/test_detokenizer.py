"""Streaming detokenization: split UTF-8 characters are held back, stop strings cut the text."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moec.runtime.detokenizer import IncrementalDetokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! 你好，世界。",
    "I love 🍕 and 🎉 parties 🎉🎉",
    "日本語のテキストも少し。",
    "naïve café déjà vu",
] * 3

# Characters outside the corpus fall back to single bytes; some inside it merge across characters.
TEXTS = [
    "Hello 世界 🍕🚀 naïve 漢字 done",
    "The quick brown fox jumps over 🦊🦊 the lazy 狗.",
    "🎉🎉🎉 parties, café, 日本語のテキスト",
    "plain ascii only",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def stream(tok, ids, stop=(), prompt=None):
    """Feed ids one by one; return (deltas, detokenizer, index of the token at which it stopped)."""
    detok = IncrementalDetokenizer(tok, tok.encode("Prompt: ").ids if prompt is None else prompt, list(stop))
    deltas, stopped_at = [], None
    for i, token in enumerate(ids):
        delta = detok.push(token)
        assert "\ufffd" not in delta or "\ufffd" in tok.decode(ids)
        deltas.append(delta)
        if detok.stopped and stopped_at is None:
            stopped_at = i
    deltas.append(detok.finish())
    return deltas, detok, stopped_at


def test_texts_split_multibyte_characters(tok):
    for text in TEXTS[:3]:
        assert any("\ufffd" in tok.decode([i]) for i in tok.encode(text).ids), text


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode(tok, text):
    ids = tok.encode(text).ids
    deltas, detok, _ = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text == detok.text
    assert not detok.stopped
    assert all("\ufffd" not in d for d in deltas)


def test_text_grows_only_with_complete_characters(tok):
    ids = tok.encode("🚀🦊漢").ids
    detok = IncrementalDetokenizer(tok, [], [])
    seen = []
    for token in ids:
        detok.push(token)
        seen.append(detok.text)
    assert seen[-1] == "🚀🦊漢"
    assert all(text in ("", "🚀", "🚀🦊", "🚀🦊漢") for text in seen)
    assert len(seen) > 3  # some pushes completed no character


def test_random_ids_match_decode(tok):
    """Arbitrary token soup (invalid UTF-8 included): the stream still adds up to decode()."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(1, 30))]
        prompt = [rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(0, 6))]  # may end mid-character
        deltas, detok, _ = stream(tok, ids, prompt=prompt)
        assert "".join(deltas) == tok.decode(ids) == detok.text


def test_special_tokens_skipped(tok):
    ids = tok.encode("Hello world").ids + [tok.token_to_id("<eos>")]
    deltas, detok, _ = stream(tok, ids)
    assert detok.text == "Hello world" and deltas[-2] == ""


@pytest.mark.parametrize("text, stop, want", [
    ("The quick brown fox jumps over the lazy dog.", ["brown fox"], "The quick "),  # spans several tokens
    ("The quick brown fox jumps over the lazy dog.", ["lazy", "fox"], "The quick brown "),  # earliest wins
    ("The quick brown fox jumps", ["jum"], "The quick brown fox "),
    ("Hello 世界 🍕🚀 naïve", ["🚀"], "Hello 世界 🍕"),  # stop is a byte-split character
    ("Hello 世界 🍕🚀 naïve", ["界 🍕"], "Hello 世"),
    ("The quick brown fox", ["The"], ""),
    ("The quick brown fox", ["k b"], "The quic"),  # cut inside a token
    ("The quick brown fox", ["xyz", "foxes"], "The quick brown fox"),  # never matches: all text flushed
    ("The lazy dog", ["y", "zy d"], "The laz"),  # the first stop string to appear wins
])
def test_stop_strings(tok, text, stop, want):
    ids = tok.encode(text).ids
    deltas, detok, stopped_at = stream(tok, ids, stop)
    assert detok.text == "".join(deltas) == want
    matched = any(s in text for s in stop)
    assert detok.stopped == matched
    if matched:  # stopped at the first token whose text completes the stop string (and ends a character)
        prefixes = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
        assert stopped_at == next(
            i for i, p in enumerate(prefixes) if any(s in p for s in stop) and not p.endswith("\ufffd")
        )
        assert all(d == "" for d in deltas[stopped_at + 1:])


def test_min_tokens_holds_off_stop_strings(tok):
    """Below min_tokens no stop string is looked for (vLLM's min_tokens); from then on one that
    ends in the new text stops it, as without min_tokens."""
    ids = tok.encode("The fox ran. The fox sat.").ids
    first = next(i for i in range(len(ids)) if "fox" in tok.decode(ids[: i + 1]))
    detok = IncrementalDetokenizer(tok, [], ["fox"], min_tokens=first + 2)
    out = "".join(detok.push(t) for t in ids)
    assert detok.stopped and out == "The fox ran. The "
    plain = IncrementalDetokenizer(tok, [], ["fox"])
    assert "".join(plain.push(t) for t in ids) == "The "


def test_possible_stop_prefix_is_held_back_until_disambiguated(tok):
    detok = IncrementalDetokenizer(tok, [], ["fox jumps"])
    out = ""
    for token in tok.encode("The quick brown fox ").ids:
        out += detok.push(token)
    assert out == "The quick brown "  # "fox " may begin the stop string
    for token in tok.encode("ran").ids:
        out += detok.push(token)
    assert out == "The quick brown fox ran" and not detok.stopped

    detok = IncrementalDetokenizer(tok, [], ["fox jumps"])
    out = "".join(detok.push(t) for t in tok.encode("The fox").ids)
    assert out == "The " and detok.text == "The "
    assert detok.finish() == "fox" and detok.text == "The fox"
    assert detok.finish() == ""


def test_first_token_keeps_leading_space_with_sentencepiece_style_decoder():
    """Metaspace decoding strips a leading space; the prompt as context keeps the generated one."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(CORPUS[:1] * 3, trainers.BpeTrainer(vocab_size=80, show_progress=False))
    prompt = tokenizer.encode("The quick").ids
    generated = tokenizer.encode("The quick brown fox").ids[len(prompt):]
    detok = IncrementalDetokenizer(tokenizer, prompt, [])
    out = "".join(detok.push(t) for t in generated) + detok.finish()
    assert out == " brown fox"


class _RefusingStream:
    """A DecodeStream that fails after a few steps, as tokenizers' InvalidPrefix error does."""

    def __init__(self, ids=None, skip_special_tokens=False, fail_after=3):
        from tokenizers.decoders import DecodeStream

        self.inner, self.left = DecodeStream(ids=ids, skip_special_tokens=skip_special_tokens), fail_after

    def step(self, tokenizer, token_id):
        self.left -= 1
        if self.left < 0:
            raise Exception("InvalidPrefix")
        return self.inner.step(tokenizer, token_id)


def _no_prefill(ids=None, skip_special_tokens=False):
    raise TypeError("DecodeStream() got an unexpected keyword argument 'ids'")  # tokenizers before prefill


@pytest.mark.parametrize("stream_cls", [_RefusingStream, _no_prefill])
def test_python_window_gives_the_same_text(tok, monkeypatch, stream_cls):
    """Without tokenizers' stream (too old, or refusing a window mid-way) the same window decoded
    from Python gives the same deltas."""
    import moec.runtime.detokenizer as module

    rng = random.Random(1)
    cases = []
    for _ in range(100):
        ids = [rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(1, 30))]
        prompt = [rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(0, 6))]
        cases.append((ids, prompt, stream(tok, ids, prompt=prompt)[0]))
    monkeypatch.setattr(module, "DecodeStream", stream_cls)
    for ids, prompt, want in cases:
        deltas, detok, _ = stream(tok, ids, prompt=prompt)
        assert deltas == want and detok.text == tok.decode(ids)
