"""A real byte-level BPE tokenizer for synthetic models, trained on a corpus shipped with moec.

A synthetic model needs a tokenizer that behaves like a real checkpoint's: a `tokenizer.json`
the runtime loads with the `tokenizers` library, and a `tokenizer_config.json` that
`transformers.AutoTokenizer` loads with no network. `build_tokenizer(vocab_size)` trains one on
`moec/compiler/data/corpus.txt`; `write_tokenizer_files` writes the three files a Hugging Face
model directory carries.

Conventions (the same as Llama/Mixtral checkpoints):

- ids 0, 1, 2 are `<unk>`, `<s>` (BOS), `</s>` (EOS); every other id is a BPE token;
- the tokenizer itself adds no special tokens: `Tokenizer.encode(text).ids`, and
  `AutoTokenizer(...).encode(text)` too, are the text only. `tokenizer_config.json` says
  `add_bos_token: true`, which is how the moec runtime knows to put BOS in front of a prompt.
  (transformers 5 ignores `add_bos_token` when a `tokenizer.json` is present: only the
  tokenizer.json post-processor decides, so a Hugging Face tokenizer here adds no BOS; feed HF
  the runtime's ids, `Engine.encode`, when comparing the two.);
- byte-level: any Python string, emoji included, round-trips `encode` → `decode` exactly
  (unless it spells a special token such as "<s>" literally: that is matched as the special
  token, as in every Hugging Face tokenizer).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK, BOS, EOS)  # ids 0, 1, 2
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # the specials plus one token per byte
MAX_VOCAB_SIZE = 262_144  # Qwen3's 151,936 fits; past this the tokenizer.json alone runs to megabytes
RESERVED = "<reserved_{}>"  # fills the vocab past what the corpus has merges for
HF_UNBOUNDED_LENGTH = int(1e30)  # what transformers writes for "no limit" (VERY_LARGE_INTEGER)

# The chat format, one line per message:  <s>[role]\ncontent</s>
# With add_generation_prompt the prompt ends in "<s>[assistant]\n", so the model writes the
# assistant's content next and ends it with </s> (the EOS). The newline (not a space) after "]"
# keeps the generation prompt a token-exact prefix of a finished assistant message: byte-level BPE
# glues a space to the word after it, but a newline before a word is a token of its own.
# The rendered text starts with <s>: encode it with add_special_tokens=False (transformers'
# apply_chat_template does), or BOS appears twice.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ bos_token }}[{{ message['role'] }}]\n{{ message['content'] }}{{ eos_token }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ bos_token }}[assistant]\n"
    "{% endif -%}"  # no "{%-" here: it would strip the newline before it
)


def corpus_text() -> str:
    """The training corpus shipped with moec (original English prose, about 40 KB)."""
    return resources.files("moec.compiler").joinpath("data", "corpus.txt").read_text(encoding="utf-8")


def _train_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(keepends=True), trainer=trainer)
    # Adds nothing: BOS is the caller's decision (see add_bos_token in tokenizer_config.json).
    tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    # The corpus has merges for a few thousand tokens; real vocabularies (Mixtral's 32,000) are
    # larger. Reserved entries fill the rest: no merge produces them, so text never encodes to
    # them, and they decode to their own name if a model emits one.
    for i in range(vocab_size - len(vocab)):
        vocab[RESERVED.format(i)] = len(vocab)
    return json.dumps(data, ensure_ascii=False)


_TRAINED: dict[int, str] = {}


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE with exactly `vocab_size` tokens, the same one every time for a given size.

    Raises ValueError if `vocab_size` is below 259 (3 specials + 256 bytes) or more than the
    corpus has merges for.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for a byte-level tokenizer: it needs at least {MIN_VOCAB_SIZE} "
            f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes)"
        )
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is too large for a synthetic tokenizer (at most {MAX_VOCAB_SIZE})")
    if vocab_size not in _TRAINED:
        data = _train_json(vocab_size)
        got = Tokenizer.from_str(data).get_vocab_size(with_added_tokens=True)
        if got != vocab_size:
            raise ValueError(f"the trained tokenizer has {got} tokens, not the vocab_size {vocab_size} asked for")
        _TRAINED[vocab_size] = data
    # A fresh object each call: a Tokenizer is mutable (padding, truncation), the cache is not.
    return Tokenizer.from_str(_TRAINED[vocab_size])


def _token_id(tok: Tokenizer, token: str) -> int:
    tid = tok.token_to_id(token)
    if tid is None:
        raise ValueError(f"the tokenizer has no token {token!r}")
    return tid


def write_tokenizer_files(
    tok: Tokenizer,
    out_dir: Path,
    bos: str = BOS,
    eos: str = EOS,
    unk: str = UNK,
    model_max_length: int | None = None,
) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`.

    `transformers.AutoTokenizer.from_pretrained(out_dir)` then loads a fast tokenizer whose
    `encode(text)` equals `tok.encode(text).ids` (no special tokens: see the module docstring)
    and whose `decode` gives the text back exactly.
    `model_max_length`: the model's context length (None: unbounded, written as transformers does).
    Returns the paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = {name: _token_id(tok, name) for name in (unk, bos, eos)}

    added = {}
    for tid, added_token in sorted(tok.get_added_tokens_decoder().items()):
        added[str(tid)] = {
            "content": added_token.content,
            "lstrip": added_token.lstrip,
            "normalized": added_token.normalized,
            "rstrip": added_token.rstrip,
            "single_word": added_token.single_word,
            "special": added_token.special,
        }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decode must give back the exact text
        "model_max_length": HF_UNBOUNDED_LENGTH if model_max_length is None else int(model_max_length),
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    special_map = {"bos_token": bos, "eos_token": eos, "unk_token": unk}

    paths = [out_dir / "tokenizer.json", out_dir / "tokenizer_config.json", out_dir / "special_tokens_map.json"]
    tok.save(str(paths[0]), pretty=True)
    paths[1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[2].write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    return paths
