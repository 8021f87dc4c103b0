"""The run directory: the lock (held, refused, stale, released), the resumable/new checks, load_run's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from moelab.runs.load import load_run
from moelab.runs.rundir import RunDir, RunLock, RunLockedError

HOLD = """
import sys, time
from pathlib import Path
from moelab.runs.rundir import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path, capfd):
    path = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        info = json.loads(path.read_text())
        assert info["pid"] == holder.pid and info["host"] and info["started"]
        with pytest.raises(RunLockedError, match=rf"in use by another training \(pid {holder.pid} on"):
            RunLock(path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert path.exists()  # a killed holder leaves its file behind: a stale lock
    with RunLock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert f"stale lock of pid {holder.pid}" in capfd.readouterr().err
        with pytest.raises(RunLockedError):  # one holder, even within a process
            RunLock(path).acquire()
    assert not path.exists()  # released on exit


def test_lock_release_lets_the_next_writer_in(tmp_path):
    path = tmp_path / "run.lock"
    for _ in range(3):
        started = time.time()
        with RunLock(path):
            pass
        assert time.time() - started < 5 and not path.exists()


def test_new_and_resumable_checks(tmp_path):
    run = RunDir(tmp_path / "r")
    run.require_new()
    with pytest.raises(ValueError, match="does not exist.*nothing to resume"):
        run.require_resumable()
    run.path.mkdir()
    (run.path / "metrics.jsonl").write_text("")
    with pytest.raises(FileExistsError, match="already holds a run.*--resume"):
        run.require_new()
    with pytest.raises(ValueError, match="never reached its first checkpoint"):
        run.require_resumable()


def test_load_run_errors_say_what_the_directory_is(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a moelab run: it holds no checkpoint"):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(ValueError, match="Hugging Face model directory.*convert --from-hf"):
        load_run(tmp_path)
