"""Chat messages → prompt tokens, with the chat template the artifact's tokenizer ships.

The template is the Jinja `chat_template` of `tokenizer/tokenizer_config.json` (a string, or
Hugging Face's list of named templates, of which "default" is used), or a `chat_template.jinja`
file beside it (where transformers 5 saves it). It is rendered in jinja2's
`ImmutableSandboxedEnvironment`, as transformers' `apply_chat_template` does, with `messages`
(a list of `{"role", "content"}` dicts, content as plain text), `add_generation_prompt`,
`bos_token` and `eos_token`, plus `raise_exception(msg)` and `strftime_now(fmt)`.

When the tokenizer has no chat template, DEFAULT_CHAT_TEMPLATE is used: each message as

    <s>[{role}]\\n{content}</s>

(with the tokenizer's own BOS and EOS text), then `<s>[assistant]\\n` for the model to answer
after. This is the format moec's synthetic tokenizer ships as its template, so both agree.

The rendered text carries its own special tokens (a template that wants BOS writes it), so it is
encoded with `add_special_tokens=False` and no BOS is put in front: doing so would give BOS twice.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moec.errors import ArtifactError, RequestError

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ bos_token }}[{{ message['role'] }}]\n{{ message['content'] }}{{ eos_token }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ bos_token }}[assistant]\n"
    "{% endif -%}"  # "{% endif" (no "-") keeps the newline before it
)


class TemplateError(RequestError):
    """The template refused these messages (its `raise_exception`) or failed on them."""


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": ..., ...}
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the chat template rejected the messages: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    # The settings transformers' apply_chat_template renders with, so both give the same text.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", is_default: bool = False):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.is_default = is_default
        try:
            self._template = _compile(source)
        except jinja2.TemplateSyntaxError as e:
            raise ArtifactError(f"the tokenizer's chat_template is not valid Jinja (line {e.lineno}: {e.message})") \
                from None

    @classmethod
    def from_tokenizer_dir(cls, tok_dir: str | Path) -> ChatTemplate:
        """The artifact's template (tokenizer_config.json or chat_template.jinja), else the default."""
        tok_dir = Path(tok_dir)
        cfg_file = tok_dir / "tokenizer_config.json"
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{cfg_file}: cannot read the tokenizer config ({e})") from None
        bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        source = cfg.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next((t for t in named.values() if isinstance(t, str)), None)
        jinja_file = tok_dir / "chat_template.jinja"
        if not isinstance(source, str) and jinja_file.is_file():
            source = jinja_file.read_text(encoding="utf-8")
        if isinstance(source, str) and source.strip():
            return cls(source, bos, eos)
        return cls(DEFAULT_CHAT_TEMPLATE, bos, eos, is_default=True)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template failed on these messages: {e}") from None

    def encode(self, tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Render and tokenize without adding special tokens: the template wrote its own BOS."""
        text = self.render(messages, add_generation_prompt)
        return list(tokenizer.encode(text, add_special_tokens=False).ids)
