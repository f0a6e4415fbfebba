"""The bundle's tokenizer (HF `tokenizers`) and chat template (jinja2, rendered the way
transformers renders it: sandboxed, trim_blocks/lstrip_blocks, `raise_exception` and
`strftime_now` available; Llama 3.2's template dates its system prompt with the latter)."""

from __future__ import annotations

import datetime
import json
from functools import cached_property
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from edgert.bundle import Bundle


class ChatTemplateError(ValueError):
    pass


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, *, bos_token_id: int | None,
                 eos_token_ids: list[int], add_bos_token: bool, chat_template: str | None):
        self.hf = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Tokenizer:
        info = bundle.tokenizer_info
        try:
            hf = _HFTokenizer.from_file(str(bundle.tokenizer_path))
        except Exception as e:  # tokenizers raises plain Exception on a bad file
            raise ValueError(f"{bundle.tokenizer_path}: cannot load tokenizer ({e})") from None
        return cls(hf, bos_token_id=info.get("bos_token_id"),
                   eos_token_ids=info.get("eos_token_ids") or [],
                   add_bos_token=bool(info.get("add_bos_token")),
                   chat_template=info.get("chat_template"))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if (add_special_tokens and self.add_bos_token and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.chat_template:
            raise ChatTemplateError("this model's bundle has no chat template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        return env.from_string(self.chat_template)

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.id_to_token(token_id) or "")

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render messages to the prompt text; the text is then encoded without adding BOS
        again (templates that want BOS write it themselves)."""
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                **({"tools": tools} if tools else {}),
                bos_token=self._token_text(self.bos_token_id), eos_token=self._token_text(eos))
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None
