"""The run directory: one training run on disk — its layout, its configuration, its lock, and loading it.

    RUN/
      config.json        {"model": ModelConfig, "train": TrainConfig, "data": the corpus record (below)}
      tokenizer.json     the tokenizer the model was trained with (never retrained on resume)
      data/              the token cache (tokens.bin + tokens.json, `moelab.data`)
      metrics.jsonl      one JSON object per logged step (at least "step" and "loss")
      checkpoints/step_XXXXXXXX/   safetensors + JSON, written atomically (`moelab.checkpoint`); a quantized
                         run (`moelab convert --quant`, config.json "quant") holds its quantized weights in
                         the layout of `moelab.quant_io` and is for inference only
      loss.png, expert_load.png    plots made from metrics.jsonl
      run.lock           present while a process writes the run: {"pid", "host", "started", "command"}

The corpus record says what the run trained on: the source (`moelab.corpus.Corpus.source`: the default
corpus of a Python version with its byte cap, or a path), the corpus fingerprint (SHA-256 of its
documents) and the tokenizer's SHA-256. A resumed run is held to it: the tokenizer must be the same file,
and new text is refused unless asked for (`moelab.train`).

The lock is an advisory `flock` on run.lock: a second writer is refused at once with the holder named; a
lock left by a process that died is recognised (the kernel released its flock) and taken over. Where
`fcntl` does not exist (Windows), the holder's pid is checked instead (same host only).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moelab import checkpoint as ckpt_io
from moelab.corpus import Corpus
from moelab.data import TokenData, load_tokenizer, tokenizer_sha256

CONFIG, TOKENIZER, METRICS, LOCK, DATA_DIR = "config.json", "tokenizer.json", "metrics.jsonl", "run.lock", "data"


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunDir:
    """A run directory (it need not exist yet)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config_path = property(lambda self: self.path / CONFIG)
    tokenizer_path = property(lambda self: self.path / TOKENIZER)
    metrics_path = property(lambda self: self.path / METRICS)
    data_dir = property(lambda self: self.path / DATA_DIR)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return ckpt_io.list_checkpoints(self.path)

    def latest_checkpoint(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def holds_run(self) -> bool:
        """Whether a run was started here (its config, metrics or checkpoints exist)."""
        return self.config_path.exists() or self.metrics_path.exists() or bool(self.checkpoints())

    def read_config(self) -> dict[str, Any]:
        """config.json of the run ({"model", "train"[, "data"]}); ValueError when absent or unreadable."""
        try:
            config = json.loads(self.config_path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{self.path} holds no {CONFIG}: not a moelab run directory") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.config_path}: not valid JSON ({e})") from None
        if not isinstance(config, dict) or "model" not in config or "train" not in config:
            raise ValueError(f"{self.config_path}: not a moelab run config (needs 'model' and 'train')")
        return config

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.config_path, config)

    def require_resumable(self) -> Path:
        """The newest checkpoint to resume from; ValueError saying what is wrong when there is none."""
        if not self.path.is_dir():
            raise ValueError(f"--resume: {self.path} does not exist — nothing to resume (check --out, or drop "
                             "--resume to start a new run)")
        latest = self.latest_checkpoint()
        if latest is None:
            what = "a run that never reached its first checkpoint" if self.holds_run() else "no run"
            raise ValueError(f"--resume: {self.path} holds {what} (no checkpoints/step_*) — nothing to resume; "
                             "start a new run in another --out (or delete this one)")
        if not self.config_path.is_file():
            raise ValueError(f"--resume: {self.path} has checkpoints but no {CONFIG}; not a moelab run directory")
        return latest

    def require_new(self) -> None:
        """ValueError (FileExistsError) when a run already lives here: a new run never overwrites one."""
        if self.holds_run():
            raise FileExistsError(f"{self.path} already holds a run (config.json, metrics.jsonl or checkpoints); "
                                  "pass --resume to continue it or choose another --out — nothing was overwritten")

    def lock(self) -> RunLock:
        return RunLock(self.path / LOCK)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file beside `path` and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class RunLock:
    """An exclusive advisory lock on a run directory (a context manager); see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd, self.path):
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(f"{self.path.parent} is in use by another training (pid {holder.get('pid', '?')} "
                                     f"on {holder.get('host', '?')}, started {holder.get('started', '?')}): two "
                                     "processes cannot write one run; wait for it to end, or stop it")
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder released and removed the file between our open and lock: retry
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous:
            print(f"moelab: {self.path.parent}: taking over a stale lock of pid {previous.get('pid')} on "
                  f"{previous.get('host')} (that process is no longer running)", file=sys.stderr)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def _try_lock(fd: int, path: Path) -> bool:
    """Take the lock on `fd` without waiting; False when a live process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock: the holder's pid decides (same host only)
        holder = _read_holder(fd)
        if not holder or holder.get("host") != socket.gethostname():
            return not holder
        try:
            os.kill(int(holder["pid"]), 0)
        except (OSError, ValueError, KeyError):
            return True  # the holder is gone: a stale lock
        return int(holder["pid"]) == os.getpid()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


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
                         "prepare it with moelab.data.prepare_data")
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


def load_run(path: str | Path, *, max_memory_gb: float | None = None, policy: str = "lru", prefetch: bool = False):
    """The newest checkpoint of a run (or a checkpoint directory given directly) as a model in eval mode,
    and its config dict; the checkpoint is verified against its manifest, nothing is unpickled.
    max_memory_gb, policy, prefetch: a quantized run's routed experts stay on disk within that budget
    (`moelab.quant_io.load_quantized`); ValueError for a budget on a float run."""
    from moelab.config import ModelConfig
    from moelab.model import MoETransformer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run directory {path} does not exist")
    target = path if (path / "manifest.json").is_file() else RunDir(path).latest_checkpoint()
    if target is None:
        hint = (" — it looks like a Hugging Face model directory (config.json with model_type): convert it with "
                f"`moelab convert --from-hf {path} RUN`" if is_hf_dir(path) else "")
        raise ValueError(f"{path} is not a moelab run: it holds no checkpoint (checkpoints/step_*, written by "
                         f"`moelab train` or `moelab convert --from-hf`){hint}")
    ckpt_io.verify(target)
    config = ckpt_io.read_config(target)
    if "quant" in config:  # a quantized run (`moelab convert --quant`)
        from moelab.quant_io import load_quantized

        return load_quantized(target, config, max_memory_gb=max_memory_gb, policy=policy, prefetch=prefetch), config
    if max_memory_gb is not None:
        raise ValueError(f"max_memory_gb applies to a quantized run or a Hugging Face directory; {path} is a float "
                         "run: convert it with `moelab convert --to-hf` (or `--from-hf ... --quant`) first")
    model = MoETransformer(ModelConfig.from_dict(config["model"]))
    ckpt_io.load_model_state(model, target, verified=True)
    return model.eval(), config


def is_hf_dir(path: Path) -> bool:
    """A directory holding a Hugging Face config.json (one with a `model_type` string)."""
    try:
        return isinstance(json.loads((path / "config.json").read_text()).get("model_type"), str)
    except (OSError, ValueError, AttributeError):
        return False
