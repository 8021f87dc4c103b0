"""A trained run small enough to make in seconds, through the `moelab` command as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def moelab(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m moelab ARGS` in a subprocess, output captured as text."""
    return subprocess.run([sys.executable, "-m", "moelab", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def train_tiny_run(out: Path, n_layers: int = 2, steps: int = 3) -> Path:
    """`moelab train` of a d_model-32 MoE (4 experts of width 32, vocabulary 300) into `out`."""
    res = moelab("train", "--preset", "tiny", "--d-model", "32", "--n-heads", "2", "--n-kv-heads", "2",
                 "--n-layers", n_layers, "--d-ff", "64", "--moe-d-expert", "32", "--moe-n-experts", "4",
                 "--vocab-size", "300", "--batch-size", "4", "--seq-len", "32", "--max-corpus-bytes", "100000",
                 "--steps", steps, "--eval-batches", "1", "--threads", "1", "--quiet", "--out", out)
    assert res.returncode == 0, res.stderr
    return out
