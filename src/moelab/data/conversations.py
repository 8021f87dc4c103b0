"""Conversations for fine-tuning: JSONL chats rendered with a checkpoint's chat template, the loss on assistant text.

Input: one JSON object per line, `{"messages": [{"role": ..., "content": ...}, ...]}` (the format of chat
fine-tuning sets); blank lines are skipped. Each conversation is rendered with the checkpoint's chat template
(`moelab.data.chat.ChatTemplate`, as transformers' `apply_chat_template` renders it) and tokenized without adding
special tokens (the template writes them), as `apply_chat_template(tokenize=True)` does.

The loss mask (which tokens are trained): a token is a target when its first character lies inside an
assistant span of the rendered text. The spans are
- the template's `{% generation %}` blocks, when it has them (`render_spans`: exactly the text the template
  marks as the assistant's), else
- found by rendering prefixes: for the i-th message, an assistant one, P = render(messages[:i],
  add_generation_prompt=True) and Q = render(messages[:i+1]); the span is text[len(P):len(Q)] — the
  assistant's content and whatever the template closes its turn with (e.g. `<|im_end|>`), so the model learns
  to stop. This needs the template to be prefix-stable (Q starts with P, the whole text starts with Q); a
  template that rewrites earlier turns is refused, naming the message.
System, user and tool text, the role headers and the generation prompt are never targets.

Batches: a row is one conversation (its first S + 1 tokens), x = ids[:-1], y = ids[1:] with y = -100 (the
ignore index of `torch.nn.functional.cross_entropy`) wherever the next token is not a target and on the right
padding. Padding sits after the real tokens, so causal attention keeps it from changing them (it is still
routed: the routing statistics of a padded batch count its pad tokens). The validation split is the last
`val_fraction` of the conversations (at least one). The conversations are held in memory.

Legend: B = batch size, S = sequence length.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab.data.chat import ChatTemplate
from moelab.data.tokenizer import tokenizer_sha256

IGNORE = -100  # the target of a token that is not trained (cross_entropy's ignore_index)


def is_conversations(path: str | Path | None) -> bool:
    """Whether a data path is read as conversations: a `.jsonl` file."""
    return path is not None and Path(path).suffix == ".jsonl" and Path(path).is_file()


def read_conversations(path: str | Path) -> list[list[dict[str, Any]]]:
    """The `messages` of every non-blank line, else ValueError naming the line and the field."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e}); each line must be "
                                 '{"messages": [{"role": ..., "content": ...}, ...]}') from None
            if not isinstance(obj, dict) or "messages" not in obj:
                raise ValueError(f"{path} line {n}: field 'messages' is missing; each line must be "
                                 '{"messages": [{"role": ..., "content": ...}, ...]}')
            if not isinstance(obj["messages"], list) or not any(
                    isinstance(m, dict) and m.get("role") == "assistant" for m in obj["messages"]):
                raise ValueError(f"{path} line {n}: field 'messages' has no assistant turn (nothing to train on); "
                                 "allowed: a list of messages with at least one role 'assistant'")
            out.append(obj["messages"])
    if not out:
        raise ValueError(f"{path} holds no conversation: one {{\"messages\": [...]}} object per line")
    return out


def assistant_spans(template: ChatTemplate, messages: list[dict[str, Any]], where: str = "messages"
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and its assistant character spans [start, end) (the module docstring's rule)."""
    try:
        text, spans = template.render_spans(messages)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if spans:
        return text, spans
    out = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True) if i else ""
        upto = template.render(messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError(f"{where}[{i}]: the chat template renders the conversation up to this assistant turn "
                             "differently from the whole (it rewrites earlier turns), so the assistant text cannot "
                             "be located; use a template with {% generation %} blocks")
        out.append((len(before), len(upto)))
    return text, out


def encode_conversation(tokenizer, template: ChatTemplate, messages: list[dict[str, Any]],
                        where: str = "messages") -> tuple[np.ndarray, np.ndarray]:
    """(ids [N], target [N] bool): token ids of the rendered conversation (no special tokens added) and whether
    each token is trained (its first character inside an assistant span)."""
    text, spans = assistant_spans(template, messages, where)
    enc = tokenizer.encode(text, add_special_tokens=False)
    starts = np.array([s for s, _ in enc.offsets], dtype=np.int64)
    target = np.zeros(len(enc.ids), dtype=bool)
    for a, b in spans:
        target |= (starts >= a) & (starts < b)
    return np.array(enc.ids, dtype=np.int64), target


class ChatData:
    """Conversations as training rows (module docstring): the `TokenData` interface the training loop uses
    (`get_batch`, `iter_eval_batches`, `vocab_size`, `metadata`)."""

    def __init__(self, path: str | Path, tokenizer, template: ChatTemplate | None, seq_len: int,
                 val_fraction: float = 0.05, pad_id: int = 0, source_name: str = "the checkpoint") -> None:
        if template is None:
            raise ValueError(f"{source_name} has no chat template (field 'chat_template' of tokenizer_config.json, or "
                             "chat_template.jinja): conversations cannot be rendered; train on plain text instead")
        self.seq_len, self.pad_id = seq_len, pad_id
        rows, sha = [], hashlib.sha256()
        for n, messages in enumerate(read_conversations(path)):
            ids, target = encode_conversation(tokenizer, template, messages, f"{path} conversation {n + 1}: messages")
            ids, target = ids[: seq_len + 1], target[: seq_len + 1]
            if not target[1:].any():
                raise ValueError(f"{path} conversation {n + 1}: no assistant token within its first {seq_len + 1} "
                                 "tokens; allowed: a larger seq_len, or a shorter conversation")
            labels = np.where(target, ids, IGNORE)
            rows.append((ids, labels))
            sha.update(ids.tobytes() + labels.tobytes())
        n_val = max(1, round(len(rows) * val_fraction))
        if len(rows) - n_val < 1:
            raise ValueError(f"{path} holds {len(rows)} conversation(s): too few to split with val_fraction="
                             f"{val_fraction} (at least one for training and one for validation)")
        self.train, self.val = rows[: len(rows) - n_val], rows[len(rows) - n_val:]
        self._vocab = tokenizer.get_vocab_size()
        self.metadata = {"format": "conversations", "source_spec": str(path), "source": f"conversations {path}",
                         "corpus_sha256": sha.hexdigest(), "tokenizer_sha256": tokenizer_sha256(tokenizer),
                         "n_tokens": int(sum(len(ids) for ids, _ in rows)), "n_conversations": len(rows)}

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def _rows(self, rows: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.full((len(rows), seq_len), self.pad_id, dtype=torch.long)  # [B, S]
        y = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)  # [B, S]
        for b, (ids, labels) in enumerate(rows):
            n = min(len(ids) - 1, seq_len)
            x[b, :n] = torch.from_numpy(ids[:n])
            y[b, :n] = torch.from_numpy(labels[1: n + 1])
        return x, y

    def get_batch(self, split: str, batch_size: int, seq_len: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` conversations drawn uniformly (with replacement) by `generator`: x, y [B, S]."""
        rows = self.train if split == "train" else self.val
        picks = torch.randint(0, len(rows), (batch_size,), generator=generator).tolist()
        return self._rows([rows[i] for i in picks], seq_len)

    def iter_eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None,
                          split: str = "val") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split's conversations in order, `batch_size` per batch, at most `max_batches` batches."""
        rows = self.val if split == "val" else self.train
        n = len(rows) if max_batches is None else min(len(rows), max_batches * batch_size)
        for i in range(0, n, batch_size):
            yield self._rows(rows[i: min(i + batch_size, n)], seq_len)
