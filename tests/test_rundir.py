"""The run directory: the lock (held, refused, stale, released), the resumable/new checks, load_run's errors; corrupt
files, a reader racing a checkpoint rotation, an interrupted conversion (issue 29)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import moelab, train_tiny_run
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


# -- New-user paths (issue 29) ------------------------------------------------------------------------------


def _one_line_error(res, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr and len(lines) == 1 and lines[0].startswith("moelab "), res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, res.stderr)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("tiny") / "run")


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory) -> Path:
    """A tiny Hugging Face directory (moelab.hf.save of a random model), no tokenizer."""
    import torch

    from moelab import hf
    from moelab.config.model import ModelConfig, MoEConfig
    from moelab.model.transformer import MoETransformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=32,
                      moe=MoEConfig(d_model=32, d_expert=32, n_experts=4, top_k=2))
    return hf.save(MoETransformer(cfg), tmp_path_factory.mktemp("hf") / "src")


def test_corrupt_files_are_one_line_errors_naming_the_file(tiny, hf_source, tmp_path):
    """A tokenizer.json that is not JSON was a traceback (exit 1) in generate and eval; an HF config.json that is
    not JSON was reported as "holds no checkpoint"."""
    run = Path(shutil.copytree(tiny, tmp_path / "run"))
    (run / "tokenizer.json").write_text("{not json")
    (tmp_path / "a.txt").write_text("hello world\n")
    for cmd in (["generate", run, "--prompt", "hi", "--max-new-tokens", "2"],
                ["eval", run, "--data", tmp_path / "a.txt"]):
        _one_line_error(moelab(*cmd), f"{run / 'tokenizer.json'}: not a readable tokenizer.json")
    src = Path(shutil.copytree(hf_source, tmp_path / "src"))
    (src / "config.json").write_text('{"model_type": "mixtral",')
    for cmd in (["generate", src, "--prompt", "hi"], ["eval", src, "--data", tmp_path / "a.txt"],
                ["routing", src, "--out", tmp_path / "r"]):
        res = moelab(*cmd)
        _one_line_error(res, f"{src / 'config.json'}: not valid JSON")
        assert "holds no checkpoint" not in res.stderr


def _copy_checkpoint(run: Path, src: str, step: int) -> Path:
    return Path(shutil.copytree(run / "checkpoints" / src, run / "checkpoints" / f"step_{step:08d}"))


def test_a_reader_skips_a_checkpoint_rotated_away_while_it_reads(tiny, tmp_path, monkeypatch, capsys):
    """`moelab generate RUN` while `moelab train --keep-checkpoints 1` rotates: the newest checkpoint listed is
    deleted before it is read (deterministic: inside verify). The reader takes the next newest; a damaged
    checkpoint that is still the newest stays an error."""
    from moelab.cli.main import main
    from moelab.runs import checkpoint as ckpt_io

    run = Path(shutil.copytree(tiny, tmp_path / "run"))
    (newest,) = ckpt_io.list_checkpoints(run)
    older = _copy_checkpoint(run, newest.name, 1)
    verify, seen = ckpt_io.verify, []

    def rotate_first(target):  # 1: the training deletes the newest (as a rotation that keeps an older one)
        seen.append(Path(target).name)
        if len(seen) == 1:
            shutil.rmtree(target)
        return verify(target)

    monkeypatch.setattr(ckpt_io, "verify", rotate_first)
    assert main(["generate", str(run), "--prompt", "def", "--max-new-tokens", "3", "--quiet"]) == 0
    assert seen == [newest.name, older.name]
    capsys.readouterr()

    _copy_checkpoint(run, older.name, 5)  # 2: a newer one lands while the one being read is half deleted
    seen.clear()

    def half_deleted(target):
        seen.append(Path(target).name)
        if len(seen) == 1:
            _copy_checkpoint(run, older.name, 9)
            (Path(target) / "trainer.safetensors").unlink()
        return verify(target)

    monkeypatch.setattr(ckpt_io, "verify", half_deleted)
    assert main(["generate", str(run), "--prompt", "def", "--max-new-tokens", "3", "--quiet"]) == 0
    assert seen == ["step_00000005", "step_00000009"]
    capsys.readouterr()

    monkeypatch.setattr(ckpt_io, "verify", verify)  # 3: damaged and still the newest: named, not retried
    (run / "checkpoints" / "step_00000009" / "trainer.safetensors").unlink()
    assert main(["generate", str(run), "--prompt", "def", "--max-new-tokens", "3"]) == 2
    assert "step_00000009: file trainer.safetensors is missing" in capsys.readouterr().err


def test_an_interrupted_convert_leaves_nothing_and_runs_again(hf_source, tmp_path):
    """SIGINT while `moelab convert --from-hf` writes its checkpoint (paused there by the test hook) left
    OUT/checkpoints/.tmp-step_* behind, and the plain re-run was refused as a non-empty OUT."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "moelab", "convert", "--from-hf", str(hf_source), str(out)]

    def interrupted(*extra: str) -> None:
        """Run the convert, SIGINT it while it sits in the middle of writing its checkpoint (the test hook's
        pause, after the safetensors files), and check it stops with 130."""
        # SIGINT at its default in the child: a shell without job control starts background jobs with it ignored,
        # and Python then installs no KeyboardInterrupt handler (the child would sleep through the signal)
        proc = subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "MOELAB_TEST_CHECKPOINT_PAUSE": "600"},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300  # not a timing threshold: how long to wait for a hung child
        while not list(out.glob("checkpoints/.tmp-step_*/trainer.safetensors")):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(proc.communicate())
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 130 and "interrupted" in err, err

    interrupted()
    assert not out.exists(), list(out.rglob("*"))  # created by the convert: removed
    out.mkdir()  # an empty OUT given by the user stays, empty
    interrupted()
    assert out.is_dir() and not any(out.iterdir())
    res = moelab("convert", "--from-hf", hf_source, out)
    assert res.returncode == 0, res.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000000"]
    interrupted("--overwrite")  # over a run: its checkpoints are replaced, and no partial one is left
    assert not list(out.glob("checkpoints/.tmp-*"))
