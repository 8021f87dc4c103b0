"""Corpora: the default corpus (the Python standard library), a user's files (sorted, text only, strict
UTF-8 with the bad byte's file and offset named), and the errors that name the path."""

from __future__ import annotations

import pydoc_data.topics

import pytest

from moelab.data import corpus as C
from moelab.data import tokens as D

VOCAB = 512


def _write_corpus(root, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


# ---------------------------------------------------------------------------------------------------- corpora
def test_default_corpus_mixes_code_and_prose():
    docs = list(C.default_corpus(max_bytes=60_000))
    assert docs == list(C.default_corpus(max_bytes=60_000))
    assert sum(len(d.encode()) for d in docs) <= 60_000
    topics = set(pydoc_data.topics.topics.values())
    prose = [d for d in docs if d in topics]
    code = [d for d in docs if d not in topics]
    assert prose and code
    for src in code:  # every code document is a Python source file
        compile(src, "<stdlib>", "exec")
    # both kinds in each half, so the validation tail is not only one of them
    half = len(docs) // 2
    assert any(d in topics for d in docs[half:]) and any(d not in topics for d in docs[half:])


def test_default_corpus_rejects_bad_cap():
    with pytest.raises(ValueError, match="max_bytes=0"):
        C.default_corpus(max_bytes=0)


def test_read_corpus_recursive_sorted_text_only(tmp_path):
    _write_corpus(tmp_path, {"b.txt": "second", "a/z.md": "first", "c/d/e.py": "x = 1\n", "bad.txt": b"ok \xff end",
                             "img.png": b"\x89PNG\r\n\x1a\n\x00\x00", ".git/config": "hidden", "empty.txt": ""})
    assert list(C.read_corpus(tmp_path, errors="replace")) == ["first", "second", "ok \ufffd end", "x = 1\n"]
    assert list(C.read_corpus(tmp_path / "b.txt")) == ["second"]


def test_invalid_utf8_is_an_error_naming_the_file_and_offset(tmp_path):
    """Strict by default: no silent U+FFFD; the file and the first bad byte's offset are named."""
    _write_corpus(tmp_path, {"a.txt": "fine", "bad.txt": "é" * 700_000 + "\n" + "x", "z.txt": "after"})
    raw = (tmp_path / "bad.txt").read_bytes()
    (tmp_path / "bad.txt").write_bytes(raw[:1_400_001] + b"\xff" + raw[1_400_001:])  # past the first 1 MiB read
    with pytest.raises(ValueError, match=r"bad\.txt.*not valid UTF-8 \(byte 0xff at offset 1400001\).*--data-errors"):
        list(C.read_corpus(tmp_path))
    docs = list(C.read_corpus(tmp_path, errors="replace"))
    assert docs[0] == "fine" and "\ufffd" in "".join(docs[1:-1]) and docs[-1] == "after"
    with pytest.raises(ValueError, match="errors='ignore'.*'strict', 'replace'"):
        C.read_corpus(tmp_path, errors="ignore")
    # the whole pipeline refuses it before writing anything
    with pytest.raises(ValueError, match="bad.txt"):
        D.prepare_data(tmp_path, tmp_path / "out", VOCAB, quiet=True)
    assert not (tmp_path / "out").exists()


def test_read_corpus_cuts_long_files_at_line_ends(tmp_path, monkeypatch):
    text = "".join(f"line {i} ü\r\n" for i in range(300))
    _write_corpus(tmp_path, {"big.txt": text})
    monkeypatch.setattr(C, "_MAX_DOC_CHARS", 100)
    docs = list(C.read_corpus(tmp_path))
    assert len(docs) > 10 and "".join(docs) == text
    assert all(d.endswith("\r\n") for d in docs)


def test_corpus_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        C.read_corpus(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        D.prepare_data(missing, tmp_path / "out", VOCAB, quiet=True)
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        C.read_corpus(empty_dir)
    _write_corpus(tmp_path / "blank", {"a.txt": "", "b/c.txt": ""})
    with pytest.raises(ValueError, match="blank.*empty"):
        D.prepare_data(tmp_path / "blank", tmp_path / "out", VOCAB, quiet=True)
    _write_corpus(tmp_path / "bin", {"x.bin": b"\x00\x01\x02"})
    with pytest.raises(ValueError, match="bin"):
        C.read_corpus(tmp_path / "bin")
    with pytest.raises(ValueError, match="binary"):
        C.read_corpus(tmp_path / "bin" / "x.bin")


