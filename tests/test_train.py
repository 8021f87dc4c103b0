"""Training: it learns, it resumes bit-for-bit after SIGKILL, it refuses bad input without losing data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moelab import ModelConfig, MoEConfig
from moelab.config import TrainConfig
from moelab.data import prepare_data, unigram_entropy
from moelab.generate import generate_text
from moelab.train import load_run, lr_at, train

TINY = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64,
                   moe=MoEConfig(d_model=64, d_expert=64, n_experts=4, top_k=2))
# flags of `moelab train` for a model small enough to train in seconds
CLI_TINY = ["--preset", "tiny", "--d-model", "32", "--n-heads", "2", "--n-kv-heads", "2", "--n-layers", "2",
            "--d-ff", "64", "--moe-d-expert", "32", "--moe-n-experts", "4", "--vocab-size", "384",
            "--batch-size", "4", "--seq-len", "32", "--max-corpus-bytes", "150000", "--log-every", "1",
            "--eval-every", "6", "--eval-batches", "2", "--warmup-steps", "3", "--threads", "1", "--quiet"]


def test_tiny_model_learns_well_below_unigram_entropy(tmp_path):
    cfg = TrainConfig(steps=400, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=10, eval_every=200,
                      eval_batches=8, log_every=50, max_corpus_bytes=400_000)
    result = train(TINY, cfg, tmp_path / "run", progress=False)
    _, data = prepare_data(None, tmp_path / "run", vocab_size=512, max_bytes=400_000)
    h1 = unigram_entropy(data.train)
    assert result.final_val_loss < h1 - 0.8, (result.final_val_loss, h1)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    for key in ("step", "loss", "aux_load_balance", "aux_z", "tokens_per_s", "expert_load", "max_mean_load",
                "dropped_frac", "router_entropy", "val_loss"):
        assert key in last, key
    assert len(last["expert_load"]) == 2 and abs(sum(last["expert_load"][0]) - 1) < 1e-6
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0 and (tmp_path / "run" / "expert_load.png").exists()

    # generation from the trained run: an empty prompt and characters the corpus never had
    for prompt in ("", "ℵ∰ 🙂 \x00"):
        text = generate_text(tmp_path / "run", prompt, max_new_tokens=10, seed=0)
        assert isinstance(text, str)
    model, config = load_run(tmp_path / "run")
    assert config["model"] == TINY.to_dict() and not model.training


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # cosine midpoint


def run_cli(args: list[str], env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "moelab", "train", *args]
    full_env = {**os.environ, **(env or {})}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=full_env)


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def wait_for(predicate, proc, timeout=300.0):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before the kill point: {proc.stderr.read()}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the kill point")
        time.sleep(0.02)


def test_sigkill_between_and_during_checkpoints_then_resume_is_exact(tmp_path):
    steps = ["--steps", "18", "--save-every", "4", "--seed", "3"]
    ref = tmp_path / "ref"
    done = run_cli([*CLI_TINY, *steps, "--out", str(ref)])
    assert done.returncode == 0, done.stderr
    expected = losses(ref)
    assert sorted(expected) == list(range(1, 19))

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    # 1) killed between checkpoint writes: once step 8 is on disk
    proc = run_cli([*CLI_TINY, *steps, "--out", str(run)], wait=False)
    wait_for(lambda: (ckpts / "step_00000008").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # 2) resumed, then killed while the step-12 checkpoint is being written
    proc = run_cli([*CLI_TINY, *steps, "--out", str(run), "--resume"],
                   env={"MOELAB_TEST_CHECKPOINT_PAUSE": "5"}, wait=False)
    wait_for(lambda: any(p.name.startswith(".tmp-step_00000012") for p in ckpts.iterdir()), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpts / "step_00000012").exists()  # never a half-written directory under the final name
    # 3) resumed to the end
    done = run_cli([*CLI_TINY, *steps, "--out", str(run), "--resume"])
    assert done.returncode == 0, done.stderr
    assert losses(run) == expected  # bit-for-bit the same losses as the uninterrupted run
    assert not list(ckpts.glob(".tmp-*"))


def test_bad_input_is_a_clear_error_and_nothing_is_lost(tmp_path):
    missing = run_cli([*CLI_TINY, "--steps", "2", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "a")])
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    res = run_cli([*CLI_TINY, "--steps", "2", "--data", str(empty), "--out", str(tmp_path / "b")])
    assert res.returncode == 2 and "empty" in res.stderr and "Traceback" not in res.stderr

    res = run_cli([*CLI_TINY, "--steps", "2", "--seq-len", "999", "--out", str(tmp_path / "c")])
    assert res.returncode == 2 and "seq_len=999" in res.stderr and "max_seq_len" in res.stderr

    res = run_cli([*CLI_TINY, "--steps", "2", "--device", "tpu", "--out", str(tmp_path / "d")])
    assert res.returncode == 2 and "device='tpu'" in res.stderr and "'cuda:N'" in res.stderr
    absent = f"cuda:{torch.cuda.device_count()}"  # one past the last CUDA device: absent on any machine
    res = run_cli([*CLI_TINY, "--steps", "2", "--device", absent, "--out", str(tmp_path / "e")])
    assert res.returncode == 2 and f"device='{absent}'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()  # refused before writing anything

    run = tmp_path / "run"
    assert run_cli([*CLI_TINY, "--steps", "4", "--out", str(run)]).returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = run_cli([*CLI_TINY, "--steps", "4", "--out", str(run)])  # same dir without --resume
    assert res.returncode == 2 and "--resume" in res.stderr
    res = run_cli([*CLI_TINY, "--steps", "8", "--out", str(run), "--resume", "--moe-n-experts", "8"])
    assert res.returncode == 2 and "different" in res.stderr and "Traceback" not in res.stderr
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # nothing on disk changed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_matches_cpu(tmp_path):
    """The same run on the GPU and on the CPU: same data, same initialisation, the same losses to float32
    rounding (a run whose batches or model stayed on the wrong device would raise)."""
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=32, warmup_steps=1, eval_every=4, eval_batches=2, log_every=1,
                      max_corpus_bytes=150_000)
    runs = {dev: train(TINY, cfg.replace(device=dev), tmp_path / dev, progress=False) for dev in ("cpu", "cuda")}
    losses = {dev: [json.loads(x)["loss"] for x in (tmp_path / dev / "metrics.jsonl").read_text().splitlines()]
              for dev in runs}
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3)
    assert runs["cuda"].final_val_loss == pytest.approx(runs["cpu"].final_val_loss, rel=1e-3)


def test_generate_cli_and_tampered_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert run_cli([*CLI_TINY, "--steps", "3", "--out", str(run)]).returncode == 0
    gen = subprocess.run([sys.executable, "-m", "moelab", "generate", str(run), "--prompt", "import ",
                          "--max-new-tokens", "5"], capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0 and gen.stdout.startswith("import ")
    for device in ("tpu", f"cuda:{torch.cuda.device_count()}"):  # not a device; a device this machine lacks
        gen = subprocess.run([sys.executable, "-m", "moelab", "generate", str(run), "--device", device],
                             capture_output=True, text=True, timeout=300)
        assert gen.returncode == 2 and f"device='{device}'" in gen.stderr and "Traceback" not in gen.stderr
    weights = next((run / "checkpoints").iterdir()) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    gen = subprocess.run([sys.executable, "-m", "moelab", "generate", str(run), "--prompt", "x"],
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 2 and "truncated" in gen.stderr and "Traceback" not in gen.stderr
    torch.manual_seed(0)
