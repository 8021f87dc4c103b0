"""Evaluation on held-out text: cross-entropy, perplexity and bits per byte (`moelab eval`).

The text is tokenized the way training streams it — every document preceded by the model's separator
token (a moelab run's <|endoftext|>, a Hugging Face model's eos) — and cut into consecutive windows of
`seq_len` + 1 tokens that overlap by one, so every token but the first is predicted exactly once, from the
tokens of its window before it. Over the N predicted tokens and the B UTF-8 bytes of the documents:

    loss = (1/N) Σ −ln p(token | context)          (nats per token)
    perplexity = exp(loss)
    bits per byte = Σ −ln p / (ln 2 · B)           (independent of the tokenizer; Gao et al. 2020, The Pile)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moelab.model.transformer import MoETransformer


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean nats per predicted token
    perplexity: float
    bits_per_byte: float
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the documents evaluated
    documents: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


def token_stream(tokenizer, documents: Iterable[str], separator: int | None,
                 max_tokens: int | None = None) -> tuple[list[int], int, int]:
    """(ids, bytes, documents): [sep] doc1 [sep] doc2 ..., whole documents until `max_tokens` is reached."""
    ids: list[int] = []
    n_bytes = n_docs = 0
    for doc in documents:
        if max_tokens is not None and len(ids) >= max_tokens:
            break
        ids += ([separator] if separator is not None else []) + tokenizer.encode(doc, add_special_tokens=False).ids
        n_bytes += len(doc.encode("utf-8"))
        n_docs += 1
    return ids, n_bytes, n_docs


@torch.no_grad()
def evaluate_tokens(model: MoETransformer, ids: list[int], seq_len: int, batch_size: int = 8,
                    progress: bool = False) -> tuple[float, int]:
    """(Σ −ln p in nats, tokens predicted) over consecutive windows of `seq_len` + 1 tokens of `ids`."""
    if len(ids) < 2:
        raise ValueError(f"the text gives {len(ids)} token(s): at least 2 are needed to predict one")
    if not 1 <= seq_len <= model.cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} is invalid: allowed 1..max_seq_len={model.cfg.max_seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: allowed an integer >= 1")
    model.eval()
    device = next(model.parameters()).device
    tokens = torch.tensor(ids, dtype=torch.long)
    n_full, rest = divmod(len(ids) - 1, seq_len)
    windows = [(s, seq_len) for s in range(0, n_full * seq_len, seq_len)] + ([(n_full * seq_len, rest)] if rest else [])
    total, count = 0.0, 0
    with tqdm(total=len(ids) - 1, desc="eval", unit="tok", disable=not progress, file=sys.stderr) as bar:
        for i in range(0, len(windows), batch_size):
            chunk = windows[i:i + batch_size]
            for width in sorted({w for _, w in chunk}):  # one width; two in the chunk holding a shorter last window
                rows = torch.stack([tokens[s:s + w + 1] for s, w in chunk if w == width]).to(device)
                logits = model(rows[:, :-1]).logits
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                         reduction="sum").item()
                count += rows[:, 1:].numel()
                bar.update(rows[:, 1:].numel())
    return total, count


def evaluate_text(model: MoETransformer, tokenizer, documents: Iterable[str], separator: int | None,
                  seq_len: int | None = None, batch_size: int = 8, max_tokens: int | None = None,
                  progress: bool = False) -> EvalResult:
    """Loss, perplexity and bits per byte of `model` on `documents` (see the module docstring); `seq_len`
    (1..max_seq_len, ValueError otherwise) defaults to the model's max_seq_len; `max_tokens` stops adding
    documents once reached."""
    seq_len = model.cfg.max_seq_len if seq_len is None else seq_len
    ids, n_bytes, n_docs = token_stream(tokenizer, documents, separator, max_tokens)
    nats, n = evaluate_tokens(model, ids, seq_len, batch_size, progress)
    loss = nats / n
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), bits_per_byte=nats / math.log(2) / n_bytes,
                      tokens=n, bytes=n_bytes, documents=n_docs, seq_len=seq_len)
