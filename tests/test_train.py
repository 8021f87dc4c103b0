"""Training: it learns, it resumes bit-for-bit after SIGKILL, it refuses bad input without losing data."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import run_cli
from moelab import ModelConfig, MoEConfig
from moelab.cli.generate import generate_text
from moelab.config.train import TrainConfig
from moelab.data.tokens import prepare_data, unigram_entropy
from moelab.model.transformer import MoETransformer
from moelab.runs.load import load_run
from moelab.training.optim import lr_at
from moelab.training.train import train

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


def train_cli(args: list[str], env: dict | None = None, wait: bool = True):
    """`moelab train ARGS`: in this process (conftest.run_cli, the command's exit status and output), or with
    `wait=False` a process of its own (with `env` added to its environment) to be killed."""
    if wait:
        assert env is None
        return run_cli("train", *args)
    cmd = [sys.executable, "-m", "moelab", "train", *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


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
    done = train_cli([*CLI_TINY, *steps, "--out", str(ref)])
    assert done.returncode == 0, done.stderr
    expected = losses(ref)
    assert sorted(expected) == list(range(1, 19))

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    # 1) killed between checkpoint writes: once step 8 is on disk
    proc = train_cli([*CLI_TINY, *steps, "--out", str(run)], wait=False)
    wait_for(lambda: (ckpts / "step_00000008").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # 2) resumed, then killed while the step-12 checkpoint is being written
    proc = train_cli([*CLI_TINY, *steps, "--out", str(run), "--resume"],
                     env={"MOELAB_TEST_CHECKPOINT_PAUSE": "5"}, wait=False)
    wait_for(lambda: any(p.name.startswith(".tmp-step_00000012") for p in ckpts.iterdir()), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpts / "step_00000012").exists()  # never a half-written directory under the final name
    # 3) resumed to the end
    done = train_cli([*CLI_TINY, *steps, "--out", str(run), "--resume"])
    assert done.returncode == 0, done.stderr
    assert losses(run) == expected  # bit-for-bit the same losses as the uninterrupted run
    assert not list(ckpts.glob(".tmp-*"))


def test_bad_input_is_a_clear_error_and_nothing_is_lost(tmp_path):
    missing = train_cli([*CLI_TINY, "--steps", "2", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "a")])
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    res = train_cli([*CLI_TINY, "--steps", "2", "--data", str(empty), "--out", str(tmp_path / "b")])
    assert res.returncode == 2 and "empty" in res.stderr and "Traceback" not in res.stderr

    res = train_cli([*CLI_TINY, "--steps", "2", "--seq-len", "999", "--out", str(tmp_path / "c")])
    assert res.returncode == 2 and "seq_len=999" in res.stderr and "max_seq_len" in res.stderr

    res = train_cli([*CLI_TINY, "--steps", "2", "--device", "tpu", "--out", str(tmp_path / "d")])
    assert res.returncode == 2 and "device='tpu'" in res.stderr and "'cuda:N'" in res.stderr
    absent = f"cuda:{torch.cuda.device_count()}"  # one past the last CUDA device: absent on any machine
    res = train_cli([*CLI_TINY, "--steps", "2", "--device", absent, "--out", str(tmp_path / "e")])
    assert res.returncode == 2 and f"device='{absent}'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()  # refused before writing anything

    run = tmp_path / "run"
    assert train_cli([*CLI_TINY, "--steps", "4", "--out", str(run)]).returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = train_cli([*CLI_TINY, "--steps", "4", "--out", str(run)])  # same dir without --resume
    assert res.returncode == 2 and "--resume" in res.stderr
    res = train_cli([*CLI_TINY, "--steps", "8", "--out", str(run), "--resume", "--moe-n-experts", "8"])
    assert res.returncode == 2 and "moe.n_experts: 4 -> 8" in res.stderr and "Traceback" not in res.stderr
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
    assert train_cli([*CLI_TINY, "--steps", "3", "--out", str(run)]).returncode == 0
    gen = run_cli("generate", run, "--prompt", "import ", "--max-new-tokens", "5")
    assert gen.returncode == 0 and gen.stdout.startswith("import ")
    for device in ("tpu", f"cuda:{torch.cuda.device_count()}"):  # not a device; a device this machine lacks
        gen = run_cli("generate", run, "--device", device)
        assert gen.returncode == 2 and f"device='{device}'" in gen.stderr and "Traceback" not in gen.stderr
    weights = next((run / "checkpoints").iterdir()) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    gen = run_cli("generate", run, "--prompt", "x")
    assert gen.returncode == 2 and "truncated" in gen.stderr and "Traceback" not in gen.stderr
    torch.manual_seed(0)


# ------------------------------------------------------------------------- the step, against a hand-written one
STEP_MODEL = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                         moe=MoEConfig(d_model=32, d_expert=32, n_experts=4, top_k=2, aux_loss_coef=0.05,
                                       z_loss_coef=1e-2))


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    return prepare_data(None, tmp_path_factory.mktemp("data"), vocab_size=512, max_bytes=150_000, quiet=True)[1]


def hand_training(model_cfg: ModelConfig, cfg: TrainConfig, data, steps: int) -> dict[str, torch.Tensor]:
    """`steps` optimizer steps written out by hand: the batches drawn from the seeded sampler, the loss plus
    the weighted aux losses averaged over micro-batches, global-norm clipping, the warm-up + cosine learning
    rate, and AdamW (Loshchilov & Hutter 2019) in float64 with decay on matrices only."""
    torch.manual_seed(cfg.seed)
    model = MoETransformer(model_cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = dict(model.named_parameters())
    state = {n: (torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64))
             for n, p in params.items()}
    master = {n: p.detach().double().clone() for n, p in params.items()}
    for step in range(steps):
        for _ in range(cfg.grad_accum):
            x, y = data.get_batch("train", cfg.batch_size, cfg.seq_len, gen)
            out = model(x, targets=y)
            total = out.loss + sum(v for a in out.aux for v in a.losses.values())
            (total / cfg.grad_accum).backward()
        grads = {n: p.grad.double() for n, p in params.items()}
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
        coef = min(1.0, cfg.grad_clip / (norm + 1e-6))
        if step < cfg.warmup_steps:
            lr = cfg.lr * (step + 1) / cfg.warmup_steps
        else:
            progress = (step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps)
            lr = cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2)
        t = step + 1
        for n, p in params.items():
            g = grads[n] * coef
            m, v = state[n]
            m.mul_(cfg.beta1).add_((1 - cfg.beta1) * g)
            v.mul_(cfg.beta2).add_((1 - cfg.beta2) * g * g)
            decay = cfg.weight_decay if p.dim() >= 2 else 0.0
            w = master[n] * (1 - lr * decay)
            master[n] = w - lr * (m / (1 - cfg.beta1 ** t)) / ((v / (1 - cfg.beta2 ** t)).sqrt() + 1e-8)
            with torch.no_grad():
                p.copy_(master[n])
            p.grad = None
    return master


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_steps_equal_hand_written_steps(tmp_path, token_data, grad_accum):
    """Three steps of `train` (warm-up, then cosine; clipping active) equal the hand-written ones; with
    grad_accum = 2 each step is the mean over two micro-batches drawn in turn, as one step on the doubled
    batch (the switch loss here is per micro-batch in both)."""
    cfg = TrainConfig(steps=3, batch_size=4, seq_len=16, grad_accum=grad_accum, lr=3e-2, warmup_steps=1,
                      min_lr_ratio=0.2, weight_decay=0.1, grad_clip=0.5, eval_every=3, eval_batches=1, log_every=1,
                      seed=7)
    threads = torch.get_num_threads()
    result = train(STEP_MODEL, cfg, tmp_path / "run", data=token_data, progress=False)
    torch.set_num_threads(threads)
    expected = hand_training(STEP_MODEL, cfg, token_data, 3)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx([3e-2, 3e-2, 3e-2 * (0.2 + 0.8 * 0.5)])
    assert records[0]["grad_norm"] > cfg.grad_clip  # clipping did something
    for name, p in result.model.named_parameters():
        torch.testing.assert_close(p.detach().double(), expected[name], atol=1e-5, rtol=1e-5, msg=name)


def test_accumulated_gradient_equals_one_big_batch(tmp_path, token_data):
    """grad_accum = 2 micro-batches of 4 with clipping off: the gradient the optimizer steps on (captured by a
    global optimizer pre-step hook) equals the gradient of one batch of the same 8 sequences, and so does the
    logged norm. (The aux losses are off: the Switch loss is per micro-batch, so it would differ.) A dropped
    1/grad_accum doubles it — the step alone cannot show that: AdamW ignores a uniform scale of the gradient."""
    model_cfg = STEP_MODEL.replace(moe=STEP_MODEL.moe.replace(aux_loss_coef=0.0, z_loss_coef=0.0))
    cfg = TrainConfig(steps=1, batch_size=4, seq_len=16, grad_accum=2, grad_clip=0.0, warmup_steps=1, eval_every=1,
                      eval_batches=1, log_every=1, seed=11)
    seen = {}

    def capture(optimizer, args, kwargs):
        seen.update({id(p): p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]})

    handle = register_optimizer_step_pre_hook(capture)
    threads = torch.get_num_threads()
    try:
        result = train(model_cfg, cfg, tmp_path / "run", data=token_data, progress=False)
    finally:
        handle.remove()
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)  # the model train builds, before its step
    model = MoETransformer(model_cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = [token_data.get_batch("train", cfg.batch_size, cfg.seq_len, gen) for _ in range(cfg.grad_accum)]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    model(x, targets=y).loss.backward()
    trained = dict(result.model.named_parameters())
    norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
    assert len(seen) == len(trained)
    for name, p in model.named_parameters():
        torch.testing.assert_close(seen[id(trained[name])], p.grad, atol=1e-6, rtol=1e-5, msg=name)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["grad_norm"] == pytest.approx(norm, rel=1e-5)


def test_resume_with_dropout_reproduces_the_uninterrupted_losses(tmp_path, token_data):
    """Dropout draws from torch's RNG: a resumed run restores that state, so steps 4-6 draw the same masks."""
    model_cfg = STEP_MODEL.replace(dropout=0.2)
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=16, warmup_steps=1, eval_every=6, eval_batches=1, log_every=1,
                      save_every=3, keep_checkpoints=3)
    train(model_cfg, cfg, tmp_path / "run", data=token_data, progress=False)
    want = losses(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000006")
    torch.manual_seed(123)  # whatever state the process is in, the checkpoint's is restored
    train(model_cfg, cfg, tmp_path / "run", resume=True, progress=False)
    assert losses(tmp_path / "run") == want and len(want) == 6


def test_bounded_routing_figures_and_tensorboard(tmp_path, token_data):
    """Each logged line has per-layer load entropy, max share, dead and dropped fractions in [0, 1], equal to
    a hand computation from the logged load shares; --tensorboard writes the same scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(steps=4, batch_size=4, seq_len=16, warmup_steps=1, eval_every=4, eval_batches=1, log_every=2,
                      tensorboard=True)
    train(STEP_MODEL, cfg, tmp_path / "run", data=token_data, progress=False)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        for i, share in enumerate(r["expert_load"]):
            entropy = -sum(p * math.log(p) for p in share if p > 0) / math.log(len(share))
            assert r["load_entropy"][i] == pytest.approx(entropy, abs=1e-6)
            assert r["max_share"][i] == pytest.approx(max(share))
            assert r["dead_frac"][i] == sum(p == 0 for p in share) / len(share)
            for key in ("load_entropy", "max_share", "dead_frac", "dropped_frac"):
                assert 0 <= r[key][i] <= 1
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "val_loss", "lr", "moe/load_entropy/layer0", "moe/max_share/layer1"} <= set(tags)
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in recs])


def test_tensorboard_missing_is_a_named_error_before_anything_is_written(tmp_path, token_data, monkeypatch):
    import sys as _sys

    monkeypatch.setitem(_sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    cfg = TrainConfig(steps=2, batch_size=4, seq_len=16, tensorboard=True)
    with pytest.raises(ValueError, match=r"tensorboard.*pip install 'moelab\[tensorboard\]'"):
        train(STEP_MODEL, cfg, tmp_path / "run", data=token_data, progress=False)
    assert not (tmp_path / "run").exists()


def test_train_gives_the_callers_thread_count_back(tmp_path, token_data):
    """cfg.threads holds for the run only: the process's thread count is the caller's again afterwards (it used to
    stay at cfg.threads for everything the process did next)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = TrainConfig(steps=1, batch_size=2, seq_len=8, threads=1, eval_every=1, eval_batches=1, log_every=1)
        train(STEP_MODEL, cfg, tmp_path / "run", data=token_data, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
