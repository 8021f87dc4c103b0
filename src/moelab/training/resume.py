"""The rules of a resumed run: its model must not change, its checkpoint's format must fit the launch, and
its data — its corpus record, its own tokenizer, and its token cache, rebuilt or continued on new data
(README, "Runs never lose work")."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moelab.data.corpus import Corpus
from moelab.data.tokenizer import load_tokenizer, tokenizer_sha256
from moelab.data.tokens import TokenData
from moelab.runs.rundir import TOKENIZER, RunDir


def model_changes(saved: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """'field: old -> new' for every ModelConfig field (nested: moe.field) that differs."""
    out = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += model_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def check_format(latest: Path, sharded: bool, on_mesh: bool, distributed: bool) -> None:
    """A sharded checkpoint (moelab.runs.sharded) resumes on a mesh or in one process; a gathered one
    (one process or expert parallelism alone) without a mesh. ValueError naming the flag otherwise."""
    if sharded and not on_mesh and distributed:
        raise ValueError(f"{latest.name} is a sharded checkpoint (written on a --data-parallel-shard mesh): resume "
                         "it with --data-parallel-shard D --expert-parallel N, or in one process")
    if not sharded and on_mesh:
        raise ValueError(f"{latest.name} is a gathered checkpoint (one process or --expert-parallel alone): "
                         "resume it without --data-parallel-shard")


# ----------------------------------------------------------------------------------------- the run's data
def data_record(data: TokenData) -> dict[str, Any]:
    """The corpus record config.json keeps of a token stream (see the module docstring)."""
    meta = data.metadata
    return {"source": meta.get("source_spec"), "description": meta.get("source"),
            "corpus_sha256": meta["corpus_sha256"], "tokenizer_sha256": meta["tokenizer_sha256"],
            "n_tokens": meta["n_tokens"]}


def adopt_tokenizer(run: RunDir, data: TokenData) -> None:
    """Copy the tokenizer of a token stream prepared elsewhere (`prepare_data` writes it beside the stream's
    directory) into the run, so that the run holds what it was trained with."""
    src = data.cache_dir.parent / TOKENIZER
    if src.resolve() == run.tokenizer_path.resolve():
        return
    if not src.is_file() or tokenizer_sha256(load_tokenizer(src)) != data.metadata["tokenizer_sha256"]:
        raise ValueError(f"the token stream in {data.cache_dir} has no matching {TOKENIZER} beside it ({src}); "
                         "prepare it with moelab.data.tokens.prepare_data")
    tmp = run.tokenizer_path.with_name(f".{TOKENIZER}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, run.tokenizer_path)


def run_tokenizer(run: RunDir, saved: dict[str, Any]):
    """The run's tokenizer.json, checked against the sha256 its corpus record holds."""
    path = run.tokenizer_path
    if not path.is_file():
        raise ValueError(f"{path} is missing: a resumed run needs the tokenizer it was trained with (its token "
                         "ids mean nothing under another one); restore that file")
    tokenizer = load_tokenizer(path)
    if saved and tokenizer_sha256(tokenizer) != saved["tokenizer_sha256"]:
        raise ValueError(f"{path} is not the tokenizer this run was trained with (its sha256 differs from the one "
                         "config.json records); restore the run's own tokenizer.json")
    return tokenizer


def resume_data(run: RunDir, saved: dict[str, Any], corpus: Corpus | None, new_data: bool,
                prepare: Callable[[Corpus, Any], TokenData], val_fraction: float,
                quiet: bool = True) -> tuple[TokenData, dict[str, Any]]:
    """The token stream a resumed run trains on, and its corpus record.

    `saved`: the run's corpus record ({} for runs that predate it). `corpus` None: the run's own token
    cache when intact, else rebuilt from the recorded corpus, which must still have its fingerprint.
    A `corpus` with another fingerprint is refused unless `new_data`. Text is always tokenized with the
    run's own tokenizer, by `prepare(corpus, tokenizer)`; the record keeps earlier corpora in "previous".
    """
    tokenizer = run_tokenizer(run, saved)
    previous = saved.get("previous", [])
    if corpus is None:
        if new_data:
            raise ValueError("new_data (--new-data) needs the new text: pass --data PATH")
        data = _cached_data(run, saved, tokenizer, val_fraction)
        if data is None:
            if not saved.get("source"):
                raise ValueError(f"{run.data_dir} (the run's token cache) is missing or stale and config.json does "
                                 "not record its corpus: pass the run's text again with --data PATH")
            corpus = _corpus_from_source(saved["source"])
            if corpus.fingerprint(quiet)[0] != saved["corpus_sha256"]:
                raise ValueError(f"the run's token cache is missing and its corpus ({saved.get('description')}) no "
                                 "longer reads the same (its fingerprint differs); pass --data PATH --new-data to "
                                 "continue on other text with the run's tokenizer")
            data = prepare(corpus, tokenizer)
    else:
        sha = corpus.fingerprint(quiet)[0]
        if saved and sha != saved["corpus_sha256"]:
            if not new_data:
                raise ValueError(f"--data {corpus.describe()} is not the text this run was trained on "
                                 f"({saved.get('description')}; corpus sha256 {saved['corpus_sha256'][:12]}…, this "
                                 f"one {sha[:12]}…) — nothing was changed. To continue training on it with the run's "
                                 "tokenizer, add --new-data; to train on it from scratch, start a new run")
            previous = [*previous, {k: v for k, v in saved.items() if k != "previous"}]
        data = prepare(corpus, tokenizer)
    return data, {**data_record(data), **({"previous": previous} if previous else {})}


def _cached_data(run: RunDir, saved: dict[str, Any], tokenizer, val_fraction: float) -> TokenData | None:
    """The run's token cache if it was made with this tokenizer from the recorded corpus, else None."""
    try:
        data = TokenData(run.data_dir, val_fraction)
    except (OSError, ValueError):
        return None
    meta = data.metadata
    if meta.get("tokenizer_sha256") != tokenizer_sha256(tokenizer):
        return None
    if saved and meta.get("corpus_sha256") != saved["corpus_sha256"]:
        return None
    return data


def _corpus_from_source(source: dict[str, Any]) -> Corpus:
    if source.get("kind") == "path":
        return Corpus(source["path"], errors=source.get("errors", "strict"))
    return Corpus(None, source.get("max_bytes"))
