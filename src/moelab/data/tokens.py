"""The byte-level BPE tokenizer and token streams on disk: a GPT-2-style data pipeline.

BPE follows Sennrich et al. 2016 over bytes as in GPT-2 (Radford et al. 2019): every string, whatever its
characters, encodes, and ``decode(encode(text)) == text``. The stream and sampler follow nanoGPT's flat
``.bin`` memmap with random windows, plus a cache that detects when it is stale. The text comes from a
`moelab.data.corpus.Corpus` (the default corpus or a user's files).

    documents (Iterator[str]) ──train_tokenizer──► OUT/tokenizer.json
    documents ──build_token_file──► OUT/data/tokens.bin (flat uint16/uint32) + OUT/data/tokens.json (metadata)
    TokenData.get_batch / iter_eval_batches ──► x, y LongTensors [B, S] with y = x shifted left by one

Legend: B = batch size, S = sequence length, N = tokens in a split.

Public API (``prepare_data`` is the one call the training loop makes):
    train_tokenizer(documents, vocab_size, path=None, quiet=True) -> tokenizers.Tokenizer
    load_tokenizer(path) -> Tokenizer;  encode(tokenizer, text) -> list[int];  decode(tokenizer, ids) -> str
    tokenizer_sha256(tokenizer) -> str                  the identity of a tokenizer (its JSON form)
    build_token_file(documents, tokenizer, out_dir, val_fraction=0.05, quiet=False, extra_meta=None,
                     total_bytes=None) -> TokenData
    TokenData(cache_dir, val_fraction)  .train / .val memmaps, .get_batch, .iter_eval_batches, .metadata
    prepare_data(corpus, out_dir, vocab_size, max_bytes=None, val_fraction=0.05, quiet=False, tokenizer=None)
        -> (Tokenizer, TokenData)
    unigram_entropy(tokens) -> float                    nats per token of the unigram distribution

Stream layout: every document is preceded by ``END_OF_TEXT``: ``[eot] doc1 [eot] doc2 ...``, which equals
``encode(EOT + EOT.join(documents))``. A document containing the literal text ``<|endoftext|>`` gets the
special id there too. Documents are tokenized in chunks of about a million characters, so neither all text
nor all ids are ever held in memory. Because every document starts after an end-of-text token, a prompt is
encoded as ``[eot] + encode(prompt)`` to be continued as the start of a document (`moelab.inference.generate`).

Split: validation is the last ``val_fraction`` of the tokens (a contiguous tail, which may begin mid-document);
train is everything before it. Nothing is shared between the two.

Sampling: ``get_batch`` draws window starts only from the ``torch.Generator`` it is given. The sampler has
no other state, so ``generator.get_state()`` (a uint8 tensor) is all a checkpoint needs to resume it exactly.

Cache: ``prepare_data`` records the SHA-256 of the corpus text and of the tokenizer in ``tokens.json``. If
either changes, or the requested vocabulary size changes, or ``tokens.bin`` has the wrong length, it rebuilds
everything. A stale cache is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from moelab.data.corpus import Corpus
from moelab.data.tokenizer import END_OF_TEXT, load_tokenizer, tokenizer_sha256, train_tokenizer

FORMAT_VERSION = 1
TOKENIZER_TRAIN_CHARS = 100_000_000  # the tokenizer learns its merges from the corpus's first ~100 M characters
_CHUNK_CHARS = 1 << 20  # text handed to one encode_batch call














# ------------------------------------------------------------------------------------------ token stream
def _chunks(documents: Iterable[str], chars: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def build_token_file(documents: Iterable[str], tokenizer: Tokenizer, out_dir: str | Path, val_fraction: float = 0.05,
                     quiet: bool = False, extra_meta: dict[str, Any] | None = None,
                     total_bytes: int | None = None, separator: int | None = None) -> TokenData:
    """Tokenize `documents` into ``out_dir/tokens.bin`` and ``out_dir/tokens.json``, streaming in chunks.

    ``tokens.bin`` is the flat stream ``[eot] doc1 [eot] doc2 ...``. Its dtype is uint16 when the vocabulary
    fits (<= 65536 ids), else uint32. ``tokens.json`` holds format, vocab_size, dtype, n_tokens, n_documents,
    n_bytes, corpus_sha256 (over the documents' lengths and UTF-8 bytes), tokenizer_sha256 and fingerprint,
    plus `extra_meta`. `total_bytes` only sizes the progress bar. `separator`: the id written before every
    document instead of ``END_OF_TEXT``'s (a foreign tokenizer's end-of-text, for a run started from a
    checkpoint). The metadata is written last, so an interrupted build leaves no metadata and is rebuilt.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eot = tokenizer.token_to_id(END_OF_TEXT) if separator is None else separator
    if eot is None:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT} token; train it with train_tokenizer")
    vocab_size = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    meta_path, bin_path = out_dir / "tokens.json", out_dir / "tokens.bin"
    meta_path.unlink(missing_ok=True)
    tmp = bin_path.with_name(bin_path.name + ".tmp")
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast = without offsets
    corpus_hash, n_tokens, n_docs, n_bytes = hashlib.sha256(), 0, 0, 0
    with open(tmp, "wb") as f, tqdm(desc="tokenizing", total=total_bytes, unit="B", unit_scale=True,
                                    disable=quiet, file=sys.stderr) as bar:
        for batch in _chunks(documents, _CHUNK_CHARS):
            for doc in batch:
                raw = doc.encode("utf-8")
                corpus_hash.update(len(raw).to_bytes(8, "little") + raw)
                n_bytes += len(raw)
                bar.update(len(raw))
            for enc in encode_batch(batch, add_special_tokens=False):
                ids = np.empty(len(enc.ids) + 1, dtype=dtype)
                ids[0], ids[1:] = eot, enc.ids
                ids.tofile(f)
                n_tokens += len(ids)
            n_docs += len(batch)
    if n_docs == 0:
        tmp.unlink()
        raise ValueError("the corpus is empty: no documents to tokenize")
    os.replace(tmp, bin_path)
    meta = {"format": FORMAT_VERSION, "vocab_size": vocab_size, "dtype": dtype.name, "n_tokens": n_tokens,
            "n_documents": n_docs, "n_bytes": n_bytes, "corpus_sha256": corpus_hash.hexdigest(),
            "tokenizer_sha256": tokenizer_sha256(tokenizer), **(extra_meta or {})}
    meta["fingerprint"] = _fingerprint(meta["corpus_sha256"], meta["tokenizer_sha256"])
    _write_json(meta_path, meta)
    return TokenData(out_dir, val_fraction)


def _fingerprint(corpus_sha256: str, tokenizer_sha256: str) -> str:
    return hashlib.sha256(f"{FORMAT_VERSION}:{corpus_sha256}:{tokenizer_sha256}".encode()).hexdigest()


class TokenData:
    """A token stream on disk (``cache_dir/tokens.bin`` + ``tokens.json``) as train/validation memmaps.

    ``tokens`` is the whole stream [N]. ``train`` is ``tokens[:N - n_val]`` and ``val`` is the tail
    ``tokens[N - n_val:]``, with ``n_val = max(1, round(N · val_fraction))``. Both are read-only memmaps,
    so the data are paged in from disk as needed.
    """

    def __init__(self, cache_dir: str | Path, val_fraction: float = 0.05) -> None:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        cache_dir = Path(cache_dir)
        meta_path, bin_path = cache_dir / "tokens.json", cache_dir / "tokens.bin"
        if not meta_path.is_file() or not bin_path.is_file():
            raise FileNotFoundError(f"{cache_dir} holds no token stream (tokens.json + tokens.bin); "
                                    "build it with build_token_file or prepare_data")
        self.metadata: dict[str, Any] = json.loads(meta_path.read_text())
        if self.metadata.get("format") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format {self.metadata.get('format')!r}, expected {FORMAT_VERSION}")
        n, dtype = self.metadata["n_tokens"], np.dtype(self.metadata["dtype"])
        if bin_path.stat().st_size != n * dtype.itemsize:
            raise ValueError(f"{bin_path} has {bin_path.stat().st_size} bytes but tokens.json says {n} "
                             f"{dtype.name} tokens; the cache is corrupt, rebuild it")
        n_val = max(1, round(n * val_fraction))
        if n - n_val < 2:
            raise ValueError(f"the corpus has only {n} tokens, too few to split with val_fraction={val_fraction}")
        self.val_fraction, self.cache_dir = val_fraction, cache_dir
        self.tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,))
        self.train, self.val = self.tokens[: n - n_val], self.tokens[n - n_val:]

    @property
    def vocab_size(self) -> int:
        return int(self.metadata["vocab_size"])

    def split(self, name: str, seq_len: int | None = None) -> np.ndarray:
        """The "train" or "val" memmap; given `seq_len`, also check that it holds one window of S + 1 tokens."""
        if name not in ("train", "val"):
            raise ValueError(f"split={name!r}; expected 'train' or 'val'")
        data = self.train if name == "train" else self.val
        if seq_len is not None:
            if seq_len < 1:
                raise ValueError(f"seq_len={seq_len} must be >= 1")
            if len(data) < seq_len + 1:
                raise ValueError(f"seq_len={seq_len} needs {seq_len + 1} tokens but the {name} split has only "
                                 f"{len(data)}; use a shorter seq_len or a larger corpus (--data, max_bytes)"
                                 + (" or val_fraction" if name == "val" else ""))
        return data

    @staticmethod
    def _windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))  # [B, S + 1]
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # x [B, S], y [B, S]

    def get_batch(self, split: str, batch_size: int, seq_len: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` random windows of `split`: x = tokens[s : s+S], y = tokens[s+1 : s+S+1] (int64, [B, S]).

        The starts s are uniform over the split. They come from ``torch.randint(..., generator=generator)``
        and nothing else, so the same generator state always gives the same batch.
        """
        data = self.split(split, seq_len)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator).numpy()  # [B]
        return self._windows(data, starts, seq_len)

    def iter_eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None,
                          split: str = "val") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed, non-overlapping windows of `split` in order, `batch_size` per batch (the last may be smaller).

        Window i starts at i·S, for i < W = (N - 1) // S. With `max_batches`, K = max_batches · batch_size
        windows are used, evenly spaced over the split (``i = k·W // K``), so a short evaluation still covers
        the whole split. The windows are always the same ones.
        """
        data = self.split(split, seq_len)
        n_windows = (len(data) - 1) // seq_len
        n_use = n_windows if max_batches is None else min(n_windows, max_batches * batch_size)
        starts = np.arange(n_use, dtype=np.int64) * n_windows // max(n_use, 1) * seq_len
        for i in range(0, n_use, batch_size):
            yield self._windows(data, starts[i: i + batch_size], seq_len)


def unigram_entropy(tokens: np.ndarray | torch.Tensor) -> float:
    """Entropy of the token frequencies in `tokens`, in nats per token: H = -Σ_v p_v ln p_v, p_v = c_v / N.

    This is the loss of the best model that ignores context, so a trained LM's validation loss should fall
    below it. The counting is done in chunks, so a memmap larger than RAM is fine.
    """
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.cpu().numpy()
    counts = np.zeros(0, dtype=np.int64)
    for start in range(0, len(tokens), 1 << 24):
        c = np.bincount(np.asarray(tokens[start: start + (1 << 24)]).astype(np.int64))
        if len(c) > len(counts):
            counts = np.pad(counts, (0, len(c) - len(counts)))
        counts[: len(c)] += c
    if counts.sum() == 0:
        raise ValueError("unigram_entropy of an empty token sequence")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------------------------------- one call
def _take_chars(documents: Iterable[str], limit: int) -> Iterator[str]:
    total = 0
    for doc in documents:
        if total >= limit:
            return
        yield doc
        total += len(doc)


def _load_cache(cache_dir: Path, tokenizer: Tokenizer | None, tok_path: Path, val_fraction: float,
                vocab_size: int | None, corpus_sha: str) -> tuple[Tokenizer, TokenData] | str:
    """The cached tokenizer and token stream if they are current, else why not ("" when there is no cache)."""
    if not (cache_dir / "tokens.json").exists():
        return ""
    try:
        data = TokenData(cache_dir, val_fraction)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tok_path)
        meta = data.metadata
        if vocab_size is not None and meta.get("vocab_size_requested") != vocab_size:
            return f"vocab_size {meta.get('vocab_size_requested')} -> {vocab_size}"
        if meta["fingerprint"] != _fingerprint(corpus_sha, tokenizer_sha256(tokenizer)):
            return "the corpus or tokenizer.json changed"
    except Exception as e:  # a corrupt tokens.* or tokenizer.json (tokenizers raises a plain Exception)
        return f"unreadable: {e}"
    return tokenizer, data


def prepare_data(corpus: Corpus | str | Path | None, out_dir: str | Path, vocab_size: int,
                 max_bytes: int | None = None, val_fraction: float = 0.05, quiet: bool = False,
                 tokenizer: Tokenizer | None = None, separator: int | None = None) -> tuple[Tokenizer, TokenData]:
    """Tokenizer and token stream for a run: reuse ``out_dir``'s cache if it is current, else rebuild it.

    `corpus`: a `Corpus`, or a data path (None = the default corpus capped at `max_bytes`; a user's corpus is
    used whole). Writes ``out_dir/tokenizer.json`` (trained on the corpus's first ~100 M characters) and
    ``out_dir/data/tokens.{bin,json}``. Given a `tokenizer`, it is used as it is: nothing is trained and
    ``tokenizer.json`` is not written (a resumed run keeps its own). The cache is reused only if the corpus
    hash, the tokenizer hash and the requested vocab_size all match, and tokens.bin has the right length.
    `separator`: as in `build_token_file`.
    """
    if not isinstance(corpus, Corpus):
        corpus = Corpus(corpus, max_bytes)
    out_dir = Path(out_dir)
    corpus_sha, n_bytes = corpus.fingerprint(quiet)
    if n_bytes == 0:
        raise ValueError(f"the corpus ({corpus.describe()}) is empty")
    tok_path, cache_dir = out_dir / "tokenizer.json", out_dir / "data"
    cached = _load_cache(cache_dir, tokenizer, tok_path, val_fraction, None if tokenizer else vocab_size, corpus_sha)
    if not isinstance(cached, str):
        return cached
    if cached and not quiet:
        print(f"moelab.data: the cache in {cache_dir} is stale ({cached}); rebuilding it", file=sys.stderr)
    (cache_dir / "tokens.json").unlink(missing_ok=True)
    if tokenizer is None:
        tokenizer = train_tokenizer(_take_chars(corpus.documents(), TOKENIZER_TRAIN_CHARS), vocab_size, tok_path,
                                    quiet)
    data = build_token_file(corpus.documents(), tokenizer, cache_dir, val_fraction, quiet,
                            extra_meta={"source": corpus.describe(), "source_spec": corpus.source,
                                        "vocab_size_requested": vocab_size}, total_bytes=n_bytes,
                            separator=separator)
    if data.metadata["corpus_sha256"] != corpus_sha:
        raise RuntimeError(f"the corpus ({corpus.describe()}) changed while it was being read; run again")
    return tokenizer, data
