"""Chat messages -> prompt token ids.

* A model directory's Jinja ``chat_template`` (``chat_template.jinja``, else
  ``tokenizer_config.json``'s ``chat_template``; a list of named templates: the ``default`` one)
  is rendered as transformers renders it: a jinja2 ``ImmutableSandboxedEnvironment`` with
  ``trim_blocks`` and ``lstrip_blocks``, the loop-controls extension, a ``tojson`` filter that
  keeps non-ASCII, the globals ``raise_exception`` and ``strftime_now``, and the variables
  ``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and the special-token strings
  of ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ...).
* Encoding: special tokens the template writes become their single ids; special-token text that
  comes from the messages (or tools) stays text. Before rendering, every such occurrence in the
  request's strings is wrapped in two private-use marker characters (markers already in those
  strings are removed first); after rendering, marked occurrences are encoded as plain text and
  unmarked ones as special tokens.
* Presets (the byte tokenizer) use ``BuiltinChat``: every message becomes
  ``<|ROLE|>\\nCONTENT\\n`` and the prompt ends with ``<|assistant|>\\n``.

Template errors (``raise_exception``, bad syntax, sandbox violations) raise ``ChatTemplateError``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from prfaas.tokenizer.base import Tokenizer
from prfaas.tokenizer.kimi import token_text
from prfaas.tokenizer.loader import BYTE_TOKENIZER_CLASS, model_dir

MARK_START, MARK_END = "\ue0f0", "\ue0f1"
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class ChatTemplateError(ValueError):
    """The chat template refused the messages or failed to render."""


class ChatFormat(Protocol):
    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str: ...
    def encode(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]: ...


class BuiltinChat:
    """The presets' template: ``<|ROLE|>\\nCONTENT\\n`` per message, then ``<|assistant|>\\n``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        out = []
        for m in messages:
            c = m.get("content")
            if isinstance(c, list):
                c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
            out.append(f"<|{m.get('role')}|>\n{c or ''}\n")
        if add_generation_prompt:
            out.append("<|assistant|>\n")
        return "".join(out)

    def encode(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        return self.tokenizer.encode(
            self.render(messages, add_generation_prompt), allow_special=False
        )


@lru_cache(maxsize=8)
def _compile(source: str):  # noqa: ANN202 - a jinja2 Template
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None


def _plain(value: Any) -> Any:
    """JSON data only (what a template may see): other objects become their type's name."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


class JinjaChat:
    def __init__(
        self,
        source: str,
        tokenizer: Tokenizer,
        special_tokens: dict[str, int],
        template_vars: dict[str, Any] | None = None,
    ) -> None:
        self.source = source
        self.tokenizer = tokenizer
        self.special_tokens = dict(special_tokens)
        self.template_vars = dict(template_vars or {})
        # longest first: a token wins over the tokens it contains; "(?!)" never matches
        by_len = sorted(self.special_tokens, key=len, reverse=True)
        alts = "|".join(re.escape(t) for t in by_len) or "(?!)"
        self._special_re = re.compile(alts)
        # a marked token (from the request), a lone marker, or the template's own token
        self._split_re = re.compile(
            f"{MARK_START}({alts}){MARK_END}|[{MARK_START}{MARK_END}]|({alts})"
        )
        _compile(source)  # fail early on a template that does not compile

    def _mark(self, obj: Any) -> Any:
        if isinstance(obj, str):
            obj = obj.replace(MARK_START, "").replace(MARK_END, "")
            return self._special_re.sub(lambda m: MARK_START + m.group(0) + MARK_END, obj)
        if isinstance(obj, dict):
            return {k: self._mark(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._mark(v) for v in obj]
        return obj

    def _render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None,
        mark: bool,
    ) -> str:
        import jinja2

        msgs, tls = _plain(messages), _plain(tools)
        if mark:
            msgs, tls = self._mark(msgs), self._mark(tls)
        try:
            return _compile(self.source).render(
                messages=msgs,
                tools=tls,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.template_vars,
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from None

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text, exactly as transformers' ``apply_chat_template(tokenize=False)``."""
        return self._render(messages, add_generation_prompt, tools, mark=False)

    def encode(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        text = self._render(messages, add_generation_prompt, tools, mark=True)
        ids: list[int] = []
        plain: list[str] = []
        pos = 0
        for m in self._split_re.finditer(text):
            plain.append(text[pos : m.start()])
            pos = m.end()
            if m.group(1) is not None:  # special-token text from the request: text
                plain.append(m.group(1))
            elif m.group(2) is not None:  # written by the template: the special token
                ids.extend(self._plain_ids(plain))
                plain = []
                ids.append(self.special_tokens[m.group(2)])
            # else a lone marker (the template cut a marked token apart): dropped
        plain.append(text[pos:])
        ids.extend(self._plain_ids(plain))
        return ids

    def _plain_ids(self, parts: Sequence[str]) -> list[int]:
        s = "".join(parts)
        return self.tokenizer.encode(s, allow_special=False) if s else []


def read_chat_template(directory: str | Path) -> str | None:
    """The directory's template source: chat_template.jinja, else tokenizer_config.json's."""
    d = Path(directory)
    f = d / "chat_template.jinja"
    if f.is_file():
        return f.read_text()
    cfg_f = d / "tokenizer_config.json"
    if not cfg_f.is_file():
        return None
    t = json.loads(cfg_f.read_text()).get("chat_template")
    if isinstance(t, list):  # named templates
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default")
    return t if isinstance(t, str) else None


def load_chat_format(model: str | Path, tokenizer: Tokenizer) -> ChatFormat | None:
    """A preset, or a directory of a preset's weights (``PrfaasByteTokenizer``): ``BuiltinChat``.
    Another model directory: its Jinja template, or None when it has none (the chat endpoint
    then refuses chat requests)."""
    d = model_dir(model)
    if d is None:
        return BuiltinChat(tokenizer)
    f = d / "tokenizer_config.json"
    cfg = json.loads(f.read_text()) if f.is_file() else {}
    source = read_chat_template(d)
    if source is None:
        byte = cfg.get("tokenizer_class") == BYTE_TOKENIZER_CLASS
        return BuiltinChat(tokenizer) if byte else None
    template_vars: dict[str, Any] = {}
    for k in SPECIAL_TOKEN_KEYS:
        v = token_text(cfg.get(k))
        if v is not None:
            template_vars[k] = v
    extra = cfg.get("additional_special_tokens")
    if isinstance(extra, list):
        template_vars["additional_special_tokens"] = [token_text(x) for x in extra]
    specials = getattr(tokenizer, "special_tokens", None) or {}
    return JinjaChat(source, tokenizer, specials, template_vars)
