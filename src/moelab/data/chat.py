"""Chat templates: a checkpoint's conversation format, rendered as Hugging Face transformers renders it.

A chat model's `tokenizer_config.json` carries its `chat_template` (a Jinja template, or a list of named ones of
which "default" is used) and its special tokens. `apply_chat_template` in transformers renders it in a sandboxed
Jinja environment with `trim_blocks` and `lstrip_blocks`, the loop-control extension, a `tojson` filter that keeps
non-ASCII text as it is, the globals `raise_exception(message)` and `strftime_now(format)`, a `{% generation %}`
block that marks assistant text, and the special tokens (`bos_token`, `eos_token`, ...) as variables. This module
renders the same text from the same file, without transformers:

    template = ChatTemplate.from_dir(path)        # None when the checkpoint has no chat template
    text = template.render(messages, add_generation_prompt=True)
    text, spans = template.render_spans(messages)  # and the character spans of {% generation %} blocks

Templates are untrusted text from the internet: they run in Jinja's sandbox (no attribute access to Python
internals). A template's own `raise_exception` becomes a ValueError naming the template's message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
ROLES = ("system", "user", "assistant", "tool", "developer")


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body and, while spans are collected, records where
    the body's text lands in the output (the assistant's own text, which fine-tuning trains on)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller) -> str:
        text = caller()
        return f"\x00{text}\x01" if getattr(self.environment, "collect_spans", False) else text


def _env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, "jinja2.ext.loopcontrols"])

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, Any]]:
    """messages as a list of {"role": str, "content": str | None | list, ...} dicts, else ValueError naming the item
    and the allowed roles."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(f"{where} must be a non-empty list of {{'role': ..., 'content': ...}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"{where}[{i}] must be an object with a string 'role' (one of {', '.join(ROLES)})")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}[{i}].role={m['role']!r} is not allowed: use one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"{where}[{i}].content must be a string, a list of parts or null")
    return [dict(m) for m in messages]


@dataclass
class ChatTemplate:
    """A checkpoint's chat template (`source`: its Jinja text) and the special tokens it may refer to."""

    source: str
    tokens: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self._template = _env().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate | None:
        """The template of a checkpoint directory: `chat_template` of its tokenizer_config.json (a string, or a list
        of {"name", "template"} of which "default" is taken), else a chat_template.jinja file; None when it has
        neither. ValueError naming the file when tokenizer_config.json is not JSON or the template does not parse."""
        path = Path(path)
        cfg_path, jinja_path = path / "tokenizer_config.json", path / "chat_template.jinja"
        config: dict[str, Any] = {}
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{cfg_path} must hold a JSON object")
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) and jinja_path.is_file():
            source = jinja_path.read_text(encoding="utf-8")
        if not isinstance(source, str):
            return None
        tokens = {k: t for k in SPECIAL_TOKENS if (t := _token_text(config.get(k))) is not None}
        try:
            return cls(source, tokens)
        except ValueError as e:
            raise ValueError(f"{cfg_path if config.get('chat_template') else jinja_path}: {e}") from None

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False, **context: Any) -> str:
        """The conversation as text (transformers' apply_chat_template(..., tokenize=False)); `context`: more
        template variables (e.g. enable_thinking, tools)."""
        return self._render(messages, add_generation_prompt, False, context)

    def render_spans(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                     **context: Any) -> tuple[str, list[tuple[int, int]]]:
        """`render`'s text and the [start, end) character spans of its `{% generation %}` blocks (empty when the
        template has none)."""
        marked = self._render(messages, add_generation_prompt, True, context)
        text, spans, start = [], [], None
        pos = 0
        for ch in marked:
            if ch == "\x00":
                start = pos
            elif ch == "\x01":
                spans.append((start, pos))
            else:
                text.append(ch)
                pos += 1
        return "".join(text), spans

    def _render(self, messages, add_generation_prompt: bool, spans: bool, context: dict[str, Any]) -> str:
        messages = check_messages(messages)
        variables = {"tools": None, "documents": None, **self.tokens, **context}
        env = self._template.environment
        env.collect_spans = spans
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template refused the conversation: {e}") from None
        finally:
            env.collect_spans = False
