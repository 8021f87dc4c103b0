"""The run directory: one training run on disk — its layout, its configuration, its lock, and loading it.

    RUN/
      config.json        {"model": ModelConfig, "train": TrainConfig, "data": the corpus record (below)}
      tokenizer.json     the tokenizer the model was trained with (never retrained on resume)
      data/              the token cache (tokens.bin + tokens.json, `moelab.data`)
      metrics.jsonl      one JSON object per logged step (at least "step" and "loss")
      checkpoints/step_XXXXXXXX/   safetensors + JSON, written atomically (`moelab.runs.checkpoint`); a quantized
                         run (`moelab convert --quant`, config.json "quant") holds its quantized weights in
                         the layout of `moelab.runs.quantized` and is for inference only
      loss.png, expert_load.png    plots made from metrics.jsonl
      run.lock           present while a process writes the run: {"pid", "host", "started", "command"}

The corpus record says what the run trained on: the source (`moelab.data.corpus.Corpus.source`: the default
corpus of a Python version with its byte cap, or a path), the corpus fingerprint (SHA-256 of its
documents) and the tokenizer's SHA-256. A resumed run is held to it: the tokenizer must be the same file,
and new text is refused unless asked for (`moelab.training.train`).

The lock is an advisory `flock` on run.lock: a second writer is refused at once with the holder named; a
lock left by a process that died is recognised (the kernel released its flock) and taken over. Where
`fcntl` does not exist (Windows), the holder's pid is checked instead (same host only).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from moelab.runs import checkpoint as ckpt_io

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

    def require_new(self, hint: str = "pass --resume to continue it or choose another --out") -> None:
        """ValueError (FileExistsError) when a run already lives here: a new run never overwrites one. `hint`:
        what the user can do instead (the message ends with it)."""
        if self.holds_run():
            raise FileExistsError(f"{self.path} already holds a run (config.json, metrics.jsonl or checkpoints); "
                                  f"{hint} — nothing was overwritten")

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
















