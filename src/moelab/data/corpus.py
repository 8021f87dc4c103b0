"""Corpora: the text a run trains on — the running Python's own standard library, or a user's files.

    Corpus(None, max_bytes)      the default corpus (below); no download, present on every machine
    Corpus(path)                 a user's text file or directory (``--data PATH``)
    corpus.documents()           the documents as strings, streamed
    corpus.fingerprint()         SHA-256 over the documents' lengths and UTF-8 bytes, and their total size
    corpus.source                a JSON-able description (what the run directory records)

Default corpus: code and English prose from the Python standard library (`default_corpus`). A user's corpus
(`read_corpus`) is every text file of a file or directory, read as strict UTF-8: a file that is not valid
UTF-8 is an error naming the file and the byte offset, unless ``errors="replace"`` asks for the bad bytes
to be replaced by U+FFFD (``--data-errors replace``).
"""

from __future__ import annotations

import codecs
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from tqdm.auto import tqdm

ENCODING_ERRORS = ("strict", "replace")
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                        "encodings"})  # encodings/: mostly generated codec tables, not code people write
_MAX_DOC_CHARS = 1 << 21  # a user file longer than this is cut at line ends into several documents


# ------------------------------------------------------------------------------------------ default corpus
class _Doc(NamedTuple):
    kind: str  # "prose" (a pydoc topic) or "code" (a stdlib .py file)
    name: str  # topic key or path relative to the stdlib directory
    size: int  # bytes (UTF-8)
    path: Path | None


def _stdlib_docs(max_bytes: int | None) -> list[_Doc]:
    """Which stdlib documents the default corpus uses, in order (deterministic; stat only, no reading)."""
    import pydoc_data.topics

    root = Path(sysconfig.get_paths()["stdlib"])
    topics = pydoc_data.topics.topics
    prose = [_Doc("prose", k, len(topics[k].encode()), None) for k in sorted(topics)]
    code = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if name.endswith(".py") and not name.startswith("_sysconfigdata") and rel != "pydoc_data/topics.py":
                try:
                    code.append(_Doc("code", rel, path.stat().st_size, path))
                except OSError:  # a broken symlink
                    continue
    code.sort()
    if max_bytes is not None:
        prose = _fit(prose, max_bytes // 2)
        # Spread the capped code sample over the whole library: fill the budget in the order of a hash of
        # the path (a fixed pseudo-random order), then restore the sorted order.
        by_hash = sorted(code, key=lambda d: hashlib.sha1(d.name.encode()).hexdigest())
        code = sorted(_fit(by_hash, max_bytes - sum(d.size for d in prose)))
    return _interleave(prose, code)


def _fit(docs: list[_Doc], budget: int) -> list[_Doc]:
    """The documents, in order, that fit in `budget` bytes (a document that does not fit is skipped)."""
    out = []
    for d in docs:
        if 0 < d.size <= budget:
            out.append(d)
            budget -= d.size
    return out


def _interleave(a: list[_Doc], b: list[_Doc]) -> list[_Doc]:
    """Merge two lists keeping each in order, so that each list's bytes are spread evenly over the result."""
    total_a, total_b = max(1, sum(d.size for d in a)), max(1, sum(d.size for d in b))
    out, i, j, done_a, done_b = [], 0, 0, 0, 0
    while i < len(a) or j < len(b):
        if j == len(b) or (i < len(a) and done_a * total_b <= done_b * total_a):
            out.append(a[i])
            done_a, i = done_a + a[i].size, i + 1
        else:
            out.append(b[j])
            done_b, j = done_b + b[j].size, j + 1
    return out


def default_corpus(max_bytes: int | None = None) -> Iterator[str]:
    """The running Python's standard library as documents: code and English prose, no download.

    Code: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]``, one document per file, sorted by
    relative path. Skipped: site-packages, test directories, ``encodings/`` (generated codec tables),
    ``_sysconfigdata*`` and ``pydoc_data/topics.py``. Prose: each ``pydoc_data.topics.topics`` entry (the
    language reference text behind ``help()``), one document per topic, sorted by key. Both lists are merged
    so that each one's bytes are spread evenly, so any prefix, and so the validation tail, has both kinds.

    ``max_bytes`` caps the total UTF-8 size. Prose gets at most half the budget. Code fills the rest with a
    fixed hash-ordered sample of files, so the sample covers the whole library. Files are never cut. The
    selection is deterministic for a given Python installation. The library's files are UTF-8 (PEP 3120);
    a byte that is not is replaced by U+FFFD.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} must be a positive number of bytes (or None for no cap)")
    return _read_stdlib(_stdlib_docs(max_bytes))


def default_corpus_tail(kind: str, max_bytes: int | None = None) -> Iterator[str]:
    """Documents of one kind ("code" or "prose") of the default corpus, from its end backwards: the text a
    run's validation split (the tail of the stream) is made of comes first, so held-out text for analyses."""
    if kind not in ("code", "prose"):
        raise ValueError(f"kind={kind!r} is invalid: allowed 'code', 'prose'")
    return _read_stdlib([d for d in reversed(_stdlib_docs(max_bytes)) if d.kind == kind])


def _read_stdlib(docs: list[_Doc]) -> Iterator[str]:
    import pydoc_data.topics

    for d in docs:
        yield pydoc_data.topics.topics[d.name] if d.path is None else d.path.read_text("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------- user corpora
def _text_files(path: Path) -> list[Path]:
    """The text files of `path` (a file or a directory, recursively), sorted; raises if there are none."""
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    if path.is_file():
        if _looks_binary(path):
            raise ValueError(f"data file {str(path)!r} looks binary (it contains NUL bytes); pass a text file")
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _looks_binary(p)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise ValueError(f"data directory {str(path)!r} holds no text files (hidden and binary files are "
                             "skipped)")
    if sum(p.stat().st_size for p in files) == 0:
        raise ValueError(f"the corpus at {str(path)!r} is empty: its {len(files)} text file(s) hold no text")
    return files


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def read_corpus(path: str | Path, errors: str = "strict") -> Iterator[str]:
    """A user's corpus as documents: one per text file of `path` (a file, or a directory searched recursively).

    Files are sorted by path and read as UTF-8, keeping newlines exactly as they are. Hidden files and
    directories (a name starting with ".") and binary files (a NUL byte in the first 8 KiB) are skipped. A
    file longer than ~2 M characters is cut at line ends into several documents. `errors`: "strict" (a file
    that is not valid UTF-8 raises ValueError naming it and the offset of its first bad byte) or "replace"
    (bad bytes become U+FFFD). The path is checked right away: a missing path raises FileNotFoundError, and a
    path without text raises ValueError. Both name the path.
    """
    if errors not in ENCODING_ERRORS:
        raise ValueError(f"errors={errors!r} is invalid: allowed {', '.join(map(repr, ENCODING_ERRORS))}")
    return _read_files(_text_files(Path(path)), errors)


def _read_files(files: list[Path], errors: str) -> Iterator[str]:
    for p in files:
        try:
            with open(p, encoding="utf-8", errors=errors, newline="") as f:
                while piece := f.read(_MAX_DOC_CHARS):
                    yield piece + f.readline()  # finish the line so that long files break at line ends
        except UnicodeDecodeError as e:
            raise ValueError(f"data file {str(p)!r} is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset "
                             f"{_first_bad_byte(p)}): convert it to UTF-8, or pass --data-errors replace to "
                             "replace bad bytes with U+FFFD") from None


def _first_bad_byte(path: Path) -> int:
    """Offset of the first byte of `path` that is not valid UTF-8 (-1 when there is none)."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character from the last chunk
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:  # e.start indexes the pending bytes + this chunk
                return offset - pending + e.start
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:  # the file ends inside a character
        return offset - len(decoder.getstate()[0]) + e.start
    return -1


# ------------------------------------------------------------------------------------------------ Corpus
class Corpus:
    """The corpus of a run: the default one (`data_path` None, capped at `max_bytes`) or a user's path.

    The path is checked on construction (a missing or empty path raises at once). `source` is the
    JSON-able description a run directory records; `fingerprint()` reads the corpus once and returns
    (sha256 over every document's length and UTF-8 bytes, total bytes) — the corpus's identity.
    """

    def __init__(self, data_path: str | Path | None = None, max_bytes: int | None = None,
                 errors: str = "strict") -> None:
        if errors not in ENCODING_ERRORS:
            raise ValueError(f"errors={errors!r} is invalid: allowed {', '.join(map(repr, ENCODING_ERRORS))}")
        self.path = None if data_path is None else Path(data_path)
        self.max_bytes, self.errors = max_bytes, errors
        if self.path is not None:
            _text_files(self.path)  # fail now on a missing or empty path
        self._fingerprint: tuple[str, int] | None = None

    @property
    def source(self) -> dict[str, Any]:
        if self.path is None:
            return {"kind": "default", "python": sys.version.split()[0], "max_bytes": self.max_bytes}
        return {"kind": "path", "path": str(self.path.resolve()), "errors": self.errors}

    def describe(self) -> str:
        s = self.source
        if s["kind"] == "default":
            return f"Python {s['python']} standard library, max_bytes={s['max_bytes']}"
        return s["path"]

    def documents(self) -> Iterator[str]:
        if self.path is None:
            return default_corpus(self.max_bytes)
        return read_corpus(self.path, self.errors)

    def fingerprint(self, quiet: bool = True) -> tuple[str, int]:
        """(sha256 hex, bytes) of the corpus; computed on first call."""
        if self._fingerprint is None:
            h, n_bytes = hashlib.sha256(), 0
            with tqdm(desc="reading corpus", unit="B", unit_scale=True, disable=quiet, file=sys.stderr) as bar:
                for doc in self.documents():
                    raw = doc.encode("utf-8")
                    h.update(len(raw).to_bytes(8, "little") + raw)
                    n_bytes += len(raw)
                    bar.update(len(raw))
            self._fingerprint = (h.hexdigest(), n_bytes)
        return self._fingerprint
