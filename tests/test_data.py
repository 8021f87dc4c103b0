"""Data: corpora, byte-level BPE round trips, the memmap token stream against direct encoding, splits,
batch sampling (shift, determinism, resume), the stale-cache check and user-facing errors."""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.data import corpus as C
from moelab.data import tokenizer as T
from moelab.data import tokens as D
from moelab.data.tokenizer import END_OF_TEXT
from moelab.data.tokens import TokenData

VOCAB = 512
UNUSUAL = ["", " ", "a", "hello world", "  leading and trailing  ", "héllo wörld ß", "日本語のテキスト",
           "emoji 👩‍👩‍👧 🏳️‍🌈 🙂🙂🙂", "e\u0301 combining, Å vs A\u030a", "مرحبا بالعالم", "\u200b\u200d zero width",
           "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters", "\x00\x01\x7f control", "tabs\tand\r\nCRLF\n", "\ufffd replacement",
           "\U0010ffff last code point", f"text {END_OF_TEXT} inside", "ab" * 500]


def _docs() -> list[str]:
    """A small mixed corpus: stdlib text plus unusual characters (some repeated so they get merges)."""
    return list(C.default_corpus(max_bytes=40_000)) + UNUSUAL * 2


@pytest.fixture(scope="module")
def tok():
    return D.train_tokenizer(_docs(), VOCAB)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tok):
    """(documents, TokenData) for a few hundred small documents, built in several chunks."""
    docs = _docs()
    mp = pytest.MonkeyPatch()
    mp.setattr(D, "_CHUNK_CHARS", 5_000)  # force many encode_batch calls
    try:
        data = D.build_token_file(docs, tok, tmp_path_factory.mktemp("tokens"), val_fraction=0.1, quiet=True)
    finally:
        mp.undo()
    return docs, data


def _write_corpus(root, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


# ------------------------------------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize("text", UNUSUAL)
def test_round_trip(tok, text):
    ids = T.encode(tok, text)
    assert all(0 <= i < tok.get_vocab_size() for i in ids)
    assert T.decode(tok, ids) == text


def test_empty_string(tok):
    assert T.encode(tok, "") == []
    assert T.decode(tok, []) == ""


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=60))
def test_round_trip_any_text(tok, text):
    assert T.decode(tok, T.encode(tok, text)) == text


def test_vocabulary(tok):
    assert tok.token_to_id(END_OF_TEXT) is not None
    assert T.encode(tok, END_OF_TEXT) == [tok.token_to_id(END_OF_TEXT)]
    assert 257 < tok.get_vocab_size() <= VOCAB
    # every byte has its own token: a character never seen in training still encodes, byte by byte
    assert len(T.encode(tok, "\U0001f99c")) == 4


def test_tokenizer_deterministic_and_loadable(tmp_path, tok):
    a, b = tmp_path / "a" / "tokenizer.json", tmp_path / "b" / "tokenizer.json"
    D.train_tokenizer(_docs(), VOCAB, a)
    D.train_tokenizer(iter(_docs()), VOCAB, b)
    assert a.read_bytes() == b.read_bytes()
    from tokenizers import Tokenizer

    text = "def f(x):\n    return x  # naïve 🙂"
    assert Tokenizer.from_file(str(a)).encode(text).ids == T.encode(tok, text)
    assert T.encode(T.load_tokenizer(a), text) == T.encode(tok, text)


def test_transformers_loads_tokenizer_json(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    text = "import os\nprint('héllo')  # 日本"
    assert hf(text, add_special_tokens=False)["input_ids"] == T.encode(tok, text)
    assert hf.convert_tokens_to_ids(END_OF_TEXT) == tok.token_to_id(END_OF_TEXT)


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size=100"):
        D.train_tokenizer(["abc"], 100)


# ---------------------------------------------------------------------------------------------- token stream
def test_stream_equals_direct_encoding(built, tok):
    docs, data = built
    eot = tok.token_to_id(END_OF_TEXT)
    reference = tok.encode(END_OF_TEXT + END_OF_TEXT.join(docs), add_special_tokens=False).ids
    assert data.tokens.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(data.tokens), np.array(reference))
    assert data.metadata["n_tokens"] == len(reference)
    assert data.metadata["n_documents"] == len(docs)
    assert data.vocab_size == tok.get_vocab_size()
    assert int((np.asarray(data.tokens) == eot).sum()) >= len(docs)  # + the literal one inside a document
    bin_path = os.path.join(os.path.dirname(data.tokens.filename), "tokens.bin")
    assert os.path.getsize(bin_path) == 2 * len(reference)


def test_stream_deterministic(built, tok, tmp_path):
    docs, data = built
    again = D.build_token_file(iter(docs), tok, tmp_path, val_fraction=0.1, quiet=True)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(data.tokens))
    assert again.metadata == data.metadata


def test_empty_document_list(tok, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        D.build_token_file([], tok, tmp_path, quiet=True)


def test_split_sizes_and_no_overlap(built):
    _, data = built
    n = data.metadata["n_tokens"]
    n_val = round(0.1 * n)
    assert (len(data.train), len(data.val)) == (n - n_val, n_val)
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), np.asarray(data.tokens))
    np.testing.assert_array_equal(data.val, np.asarray(data.tokens)[n - n_val:])  # the tail
    assert not np.shares_memory(data.train, data.val)
    other = TokenData(os.path.dirname(data.tokens.filename), val_fraction=0.3)
    assert len(other.val) == round(0.3 * n)


def _window_starts(split: np.ndarray, row: np.ndarray) -> list[int]:
    """Every s with split[s : s + len(row)] == row (brute force)."""
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(split).astype(np.int64), len(row))
    return np.flatnonzero((windows == row).all(axis=1)).tolist()


def test_get_batch_shapes_shift_and_source(built):
    _, data = built
    g = torch.Generator().manual_seed(0)
    x, y = data.get_batch("train", 5, 16, g)
    assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    for row_x, row_y in zip(x, y):
        row = torch.cat([row_x, row_y[-1:]]).numpy()
        assert _window_starts(data.train, row)  # a contiguous window of the train split
    xv, yv = data.get_batch("val", 3, 8, g)
    assert all(_window_starts(data.val, torch.cat([a, b[-1:]]).numpy()) for a, b in zip(xv, yv))


def test_get_batch_deterministic_and_resumable(built):
    _, data = built
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    first = [data.get_batch("train", 4, 12, g1) for _ in range(3)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(first, [data.get_batch("train", 4, 12, g2) for _ in range(3)]))
    state = g1.get_state().clone()  # what a checkpoint stores
    expected = data.get_batch("train", 4, 12, g1)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert torch.equal(data.get_batch("train", 4, 12, resumed)[0], expected[0])
    other = data.get_batch("train", 4, 12, torch.Generator().manual_seed(8))
    assert not torch.equal(other[0], first[0][0])


def test_eval_batches_cover_val_in_fixed_windows(built):
    _, data = built
    seq_len, batch = 10, 4
    batches = list(data.iter_eval_batches(batch, seq_len))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    n_windows = (len(data.val) - 1) // seq_len
    val = torch.from_numpy(np.asarray(data.val).astype(np.int64))
    assert x.shape == (n_windows, seq_len) and all(b[0].shape[0] <= batch for b in batches)
    for i in range(n_windows):  # window i is val[i·S : i·S + S + 1]: in order, disjoint, covering
        assert torch.equal(x[i], val[i * seq_len: (i + 1) * seq_len])
        assert torch.equal(y[i], val[i * seq_len + 1: (i + 1) * seq_len + 1])
    again = list(data.iter_eval_batches(batch, seq_len))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    limited = list(data.iter_eval_batches(2, seq_len, max_batches=3))
    assert len(limited) == 3
    starts = [_window_starts(data.val, torch.cat([a, b[-1:]]).numpy()) for bx, by in limited for a, b in zip(bx, by)]
    first = [s[0] for s in starts]
    assert first == sorted(first) and first[-1] > len(data.val) // 2  # spread over the split, not its head


def test_seq_len_too_long(built):
    _, data = built
    with pytest.raises(ValueError, match=f"seq_len={len(data.val)}"):
        next(data.iter_eval_batches(2, len(data.val)))
    with pytest.raises(ValueError, match="train split"):
        data.get_batch("train", 2, len(data.train), torch.Generator())
    # the longest windows that fit: the starts 0..3 are all drawn, and none beyond
    seq_len = len(data.train) - 4
    x, _ = data.get_batch("train", 100, seq_len, torch.Generator().manual_seed(0))
    train = torch.from_numpy(np.asarray(data.train).astype(np.int64))
    starts = {s for row in x for s in range(4) if torch.equal(row, train[s: s + seq_len])}
    assert starts == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="split='test'"):
        data.get_batch("test", 2, 4)


def test_unigram_entropy():
    tokens = np.array([0, 1, 1, 2, 2, 2, 2, 7], dtype=np.uint16)
    counts = Counter(tokens.tolist())
    expected = -sum(c / len(tokens) * math.log(c / len(tokens)) for c in counts.values())
    assert D.unigram_entropy(tokens) == pytest.approx(expected, rel=1e-12)
    assert D.unigram_entropy(torch.arange(16)) == pytest.approx(math.log(16))
    assert D.unigram_entropy(np.zeros(5, dtype=np.uint32)) == 0.0
    with pytest.raises(ValueError):
        D.unigram_entropy(np.array([], dtype=np.uint16))


# --------------------------------------------------------------------------------------------- prepare_data
def test_prepare_data_caches_and_detects_stale(tmp_path, monkeypatch):
    corpus, out = tmp_path / "corpus", tmp_path / "run"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu "
    _write_corpus(corpus, {"one.txt": words * 40, "sub/two.txt": "def f(x):\n    return x * 2\n" * 60})
    tok, data = D.prepare_data(corpus, out, 300, val_fraction=0.1, quiet=True)
    assert (out / "tokenizer.json").is_file() and (out / "data" / "tokens.bin").is_file()
    docs = list(C.read_corpus(corpus))
    assert np.array_equal(data.tokens, tok.encode(END_OF_TEXT + END_OF_TEXT.join(docs)).ids)

    real_train = D.train_tokenizer

    def no_training(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(D, "train_tokenizer", no_training)
    tok2, data2 = D.prepare_data(corpus, out, 300, val_fraction=0.1, quiet=True)
    assert tok2.to_str() == tok.to_str() and np.array_equal(data2.tokens, data.tokens)

    calls = []
    monkeypatch.setattr(D, "train_tokenizer", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    (corpus / "sub" / "two.txt").write_text("class C:\n    pass\n" * 60)  # the corpus changed
    tok3, data3 = D.prepare_data(corpus, out, 300, val_fraction=0.1, quiet=True)
    docs = list(C.read_corpus(corpus))
    assert calls and np.array_equal(data3.tokens, tok3.encode(END_OF_TEXT + END_OF_TEXT.join(docs)).ids)

    cases = [("tokenizer.json corrupt", lambda: (out / "tokenizer.json").write_text(json.dumps({"bad": 1})), 300),
             ("other tokenizer.json", lambda: real_train(["xyz xyz xyz"] * 9, 270, out / "tokenizer.json"), 300),
             ("tokens.bin truncated", lambda: (out / "data" / "tokens.bin").write_bytes(b"\x00\x00"), 300),
             ("another vocab_size", lambda: None, 290)]
    for name, tamper, vocab in cases:
        calls.clear()
        tamper()
        tok4, data4 = D.prepare_data(corpus, out, vocab, val_fraction=0.1, quiet=True)
        assert calls, f"a stale cache was reused ({name})"
        assert data4.metadata["vocab_size_requested"] == vocab
        assert np.array_equal(data4.tokens, tok4.encode(END_OF_TEXT + END_OF_TEXT.join(docs)).ids)


def test_prepare_data_default_corpus(tmp_path):
    tok, data = D.prepare_data(None, tmp_path, VOCAB, max_bytes=30_000, val_fraction=0.1, quiet=True)
    docs = list(C.default_corpus(max_bytes=30_000))
    assert data.metadata["n_documents"] == len(docs)
    assert np.array_equal(data.tokens, tok.encode(END_OF_TEXT + END_OF_TEXT.join(docs)).ids)
    assert D.unigram_entropy(data.train) > 3.0  # a real text distribution, not a degenerate one
