"""Expert parallelism (moelab.parallel) against the single-process run on the concatenated global batch.

Every check runs inside gloo ranks spawned on the loopback interface (2 and 4 ranks, one thread each).
Each rank builds the same single-process model from the same seed, runs it on the whole global batch as
the reference, and compares its expert-parallel copy's outputs, losses and gradients on its own shard:
outputs slice by slice, losses as the mean over ranks, replicated gradients after `sync_gradients`,
expert gradients slice by slice. Layer checks run in float64 (routing decisions identical by
construction); the model and training checks in float32.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelab import ModelConfig, MoEConfig
from moelab.config.train import TrainConfig
from moelab.layer.moe import MoE
from moelab.model.transformer import MoETransformer
from moelab.parallel import (
    AllToAllPath,
    apply_expert_parallel,
    clip_grad_norm_,
    exchange_stats,
    gather_expert_state,
    setup_from_env,
    shard_batch,
    shard_expert_state,
    sync_gradients,
)
from moelab.training.train import train

D, I = 8, 8

LAYER_CONFIGS = {
    "topk": dict(router="topk_softmax", top_k=2),
    "topk_capacity": dict(router="topk_softmax", top_k=2, capacity_factor=0.5),
    "switch_capacity": dict(router="switch", top_k=1, capacity_factor=1.0),
    "deepseek": dict(router="sigmoid", top_k=2, n_groups=2, topk_groups=1, route_scale=2.5, expert_bias=True,
                     n_shared=1, seq_aux_loss_coef=1e-3, aux_loss_coef=0.0),
    "qwen_shared_gate": dict(router="topk_softmax", top_k=2, n_shared=1, shared_gate=True, norm_topk_prob=False),
}


# ------------------------------------------------------------------------------------------------ harness


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, rendezvous: str, fn, args, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank destroys its group while a peer may still be inside a collective
    finally:
        dist.destroy_process_group()


def spawn(world: int, fn, *args, timeout_s: float = 60.0) -> None:
    """Run fn(rank, world, *args) in `world` processes of one gloo group, which meet through a fresh file (no
    port to pick before it is bound, so no race with other processes for it)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "rendezvous"), fn, args, timeout_s), nprocs=world, join=True)


def close(a, b, name: str, atol: float = 1e-10, rtol: float = 1e-8) -> None:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"{name}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    if not torch.allclose(a.to(b.dtype), b, atol=atol, rtol=rtol):
        raise AssertionError(f"{name}: max abs diff {(a.to(b.dtype) - b).abs().max().item():.3g}")


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


# ------------------------------------------------------------------------------------------------ layer


def make_moe(name: str, n_experts: int, seed: int = 0, starve: bool = False) -> MoE:
    torch.manual_seed(seed)
    kw = dict(d_model=D, d_expert=I, n_experts=n_experts, z_loss_coef=1e-3) | LAYER_CONFIGS[name]
    if starve:  # selection only among the first half of the experts: the upper ranks receive no rows
        kw |= dict(expert_bias=True)
    moe = MoE(MoEConfig(**kw)).double()
    with torch.no_grad():  # O(1) weights so that outputs and gradients are not tiny
        for p in moe.parameters():
            p.normal_(0, 0.5)
        if moe.cfg.expert_bias:
            moe.router.bias.normal_(0, 0.1)
        if starve:
            moe.router.bias[n_experts // 2:] = -1e4
    return moe


def _layer_check(rank: int, world: int, name: str, n_experts: int, B: int, S: int, starve: bool) -> None:
    ref = make_moe(name, n_experts, starve=starve)
    ep = apply_expert_parallel(copy.deepcopy(ref))
    assert isinstance(ep.path, AllToAllPath) and ep.experts.w_in.shape[0] == n_experts // world
    assert apply_expert_parallel(ep) is ep and ep.experts.w_in.shape[0] == n_experts // world  # applied once
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(world * B, S, D, generator=gen, dtype=torch.float64)
    proj = torch.randn(D, generator=gen, dtype=torch.float64)

    x_ref = x_all.clone().requires_grad_()
    y_ref, aux_ref = ref(x_ref)
    loss_ref = (y_ref * proj).sum(-1).mean() + aux_ref.total_loss
    loss_ref.backward()

    x = shard_batch(x_all, rank, world).clone().requires_grad_()
    y, aux = ep(x)
    loss = (y * proj).sum(-1).mean() + aux.total_loss
    loss.backward()
    sync_gradients(ep)

    tag = f"{name} N={world} rank={rank}"
    close(y, shard_batch(y_ref.detach(), rank, world), f"{tag} output")
    close(mean_over_ranks(loss), loss_ref.detach(), f"{tag} loss")
    for k, v in aux_ref.losses.items():
        close(mean_over_ranks(aux.losses[k]), v.detach(), f"{tag} aux {k}")
    assert set(aux.losses) == set(aux_ref.losses)
    close(aux.load, aux_ref.load, f"{tag} load")
    close(aux.dropped_frac, aux_ref.dropped_frac, f"{tag} dropped_frac", atol=1e-6)
    close(aux.router_entropy, aux_ref.router_entropy, f"{tag} entropy", atol=1e-6)
    assert aux.n_tokens == aux_ref.n_tokens
    close(x.grad / world, shard_batch(x_ref.grad, rank, world), f"{tag} input grad")
    El = n_experts // world
    for pname, p in ep.named_parameters():
        p_ref = ref.get_parameter(pname)
        if p_ref.grad is None:
            assert p.grad is None or not p.grad.any(), f"{tag} {pname}: gradient where the reference has none"
            continue
        want = p_ref.grad[rank * El:(rank + 1) * El] if pname.startswith("experts.") else p_ref.grad
        close(p.grad, want, f"{tag} grad {pname}")
    a2a = exchange_stats(ep, reset=True)  # this forward's and backward's exchanges
    assert a2a.calls == 5 and exchange_stats(ep).calls == 0  # counts, rows out and back, and their backward
    sent = torch.tensor([a2a.rows_sent, a2a.rows_received], dtype=torch.float64)
    dist.all_reduce(sent)
    assert sent[0] == sent[1]  # every row that leaves a rank arrives at another
    if starve:
        assert not aux.load[n_experts // 2:].any()
        if rank >= world // 2:
            assert a2a.rows_received == 0
            assert not ep.experts.w_in.grad.any()


def _layer_suite(rank: int, world: int) -> None:
    n_experts = 8 if world == 2 else 8
    for name in LAYER_CONFIGS:
        _layer_check(rank, world, name, n_experts, B=2, S=5, starve=False)
    _layer_check(rank, world, "topk", n_experts, B=1, S=3, starve=True)  # upper ranks get no rows at all
    _layer_check(rank, world, "switch_capacity", n_experts, B=1, S=2, starve=False)  # most experts empty
    _layer_check(rank, world, "topk_capacity", n_experts, B=1, S=4, starve=True)


@pytest.mark.parametrize("world", [2, 4])
def test_layer_matches_single_process(world):
    spawn(world, _layer_suite)


# ------------------------------------------------------------------------------------------------ model


def model_cfg(n_experts: int = 8, **moe_over) -> ModelConfig:
    moe = MoEConfig(**(dict(d_model=32, d_expert=16, n_experts=n_experts, top_k=2, route_scale=2.0,
                            aux_loss_coef=0.01, z_loss_coef=1e-3) | moe_over))
    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16, d_ff=32,
                       moe=moe)


def _grads_match(ep_model, ref, rank, world, tag, atol=2e-6, rtol=1e-4) -> None:
    for pname, p in ep_model.named_parameters():
        g_ref = ref.get_parameter(pname).grad
        if getattr(p, "expert_parallel", False):
            El = p.shape[0]
            g_ref = g_ref[rank * El:(rank + 1) * El]
        close(p.grad, g_ref, f"{tag} grad {pname}", atol=atol, rtol=rtol)


def _train_check(rank: int, world: int, opt_name: str, moe_over: dict, steps: int = 4) -> None:
    cfg = model_cfg(**moe_over)
    torch.manual_seed(0)
    ref = MoETransformer(cfg)
    ep_model = apply_expert_parallel(copy.deepcopy(ref), expert_parallel=world)

    def make_opt(m):
        if opt_name == "sgd":
            return torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
        return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)

    opt_ref, opt = make_opt(ref), make_opt(ep_model)
    gen = torch.Generator().manual_seed(2)
    tag = f"{opt_name} {moe_over} N={world} rank={rank}"
    for step in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (4, 9), generator=gen)  # global batch: 4 sequences
        x_all, y_all = ids[:, :-1], ids[:, 1:]
        out_ref = ref(x_all, targets=y_all)
        (out_ref.loss + out_ref.aux_loss).backward()

        out = ep_model(shard_batch(x_all, rank, world), targets=shard_batch(y_all, rank, world))
        (out.loss + out.aux_loss).backward()
        sync_gradients(ep_model)
        if step == 0:
            _grads_match(ep_model, ref, rank, world, f"{tag} step 0 (before clipping)")
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        norm = clip_grad_norm_(ep_model, 1.0)
        close(norm, norm_ref, f"{tag} step {step} grad norm", atol=1e-6, rtol=1e-4)
        close(mean_over_ranks(out.loss + out.aux_loss), (out_ref.loss + out_ref.aux_loss).detach(),
              f"{tag} step {step} loss", atol=1e-6, rtol=1e-5)
        for a, a_ref in zip(out.aux, out_ref.aux, strict=True):
            close(a.load, a_ref.load, f"{tag} step {step} load")
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
        if cfg.moe.expert_bias:
            ref.update_expert_biases([a.load for a in out_ref.aux])
            ep_model.update_expert_biases([a.load for a in out.aux])
    full = gather_expert_state(ep_model)
    for k, v in ref.state_dict().items():
        close(full[k], v, f"{tag} final state {k}", atol=2e-4, rtol=1e-3)  # Adam: lr-sized steps from tiny grads


def _checkpoint_check(rank: int, world: int) -> None:
    """A state saved in the single-process layout loads into any N: gather ↔ shard round trip, and an
    EP model built from another seed computes the reference output once the sharded state is loaded."""
    cfg = model_cfg()
    torch.manual_seed(0)
    ref = MoETransformer(cfg).eval()
    torch.manual_seed(123)
    ep_model = apply_expert_parallel(MoETransformer(cfg)).eval()
    ep_model.load_state_dict(shard_expert_state(ref.state_dict(), rank, world))
    ids = torch.randint(0, cfg.vocab_size, (world * 2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        close(ep_model(shard_batch(ids, rank, world)).logits, shard_batch(ref(ids).logits, rank, world),
              f"checkpoint N={world} logits", atol=1e-5, rtol=1e-4)
    full = gather_expert_state(ep_model)
    assert full.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(full[k], v), k


def _model_suite(rank: int, world: int) -> None:
    _train_check(rank, world, "adamw", {})
    _train_check(rank, world, "sgd", dict(router="switch", top_k=1, capacity_factor=1.0))
    if world == 2:
        _train_check(rank, world, "adamw", dict(router="sigmoid", expert_bias=True, n_shared=1,
                                                 seq_aux_loss_coef=1e-3, aux_loss_coef=0.0))
    _checkpoint_check(rank, world)
    _errors_check(rank, world)


def _errors_check(rank: int, world: int) -> None:
    n_experts = {2: 7, 4: 6}[world]  # not divisible by the world size
    with pytest.raises(ValueError, match=rf"n_experts={n_experts} is not divisible .* world size {world}"):
        apply_expert_parallel(MoETransformer(model_cfg(n_experts=n_experts)))
    with pytest.raises(ValueError, match=rf"expert_parallel=3 does not match .* {world}"):
        apply_expert_parallel(MoETransformer(model_cfg()), expert_parallel=3)
    with pytest.raises(ValueError, match="expert_choice"):
        apply_expert_parallel(MoE(MoEConfig(d_model=D, d_expert=I, router="expert_choice", capacity_factor=1.0)))
    with pytest.raises(ValueError, match="batch_size=3 is not divisible"):
        shard_batch(torch.zeros(3, 2), rank, world)


@pytest.mark.parametrize("world", [2, 4])
def test_model_training_matches_single_process(world):
    spawn(world, _model_suite)


# ------------------------------------------------------------------------------------------------ errors


def test_shard_expert_state_errors_and_layout():
    state = {"blocks.0.ffn.experts.w_in": torch.arange(8.0).view(4, 2), "blocks.0.ffn.router.weight": torch.ones(4, 2),
             "blocks.0.ffn.shared.w_in.weight": torch.ones(3, 2)}
    part = shard_expert_state(state, 1, 2)
    assert torch.equal(part["blocks.0.ffn.experts.w_in"], state["blocks.0.ffn.experts.w_in"][2:])
    assert part["blocks.0.ffn.router.weight"] is state["blocks.0.ffn.router.weight"]
    assert part["blocks.0.ffn.shared.w_in.weight"].shape == (3, 2)
    with pytest.raises(ValueError, match="n_experts=4 is not divisible .* world size 3"):
        shard_expert_state(state, 0, 3)
    with pytest.raises(ValueError, match="rank=2 is invalid for world=2"):
        shard_expert_state(state, 2, 2)


def test_setup_from_env_errors(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert setup_from_env().world == 1
    with pytest.raises(ValueError, match="expert_parallel=2 needs 2 processes"):
        setup_from_env(expert_parallel=2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="expert_parallel=2 does not match WORLD_SIZE=4"):
        setup_from_env(expert_parallel=2)


def _dead_rank(rank: int, world: int, result_path: str) -> None:
    moe = apply_expert_parallel(make_moe("topk", 4))
    x = torch.randn(3, D, dtype=torch.float64)
    moe(x)  # one step together
    if rank == 1:
        os._exit(0)  # dies without a word
    t0 = time.perf_counter()
    try:
        moe(x)
        outcome = "no error"
    except RuntimeError as e:  # gloo: connection closed / timed out
        outcome = f"error {type(e).__name__}: {str(e)[:200]!r}"
    with open(result_path, "w") as f:
        f.write(f"{time.perf_counter() - t0:.3f}\n{outcome}\n")
    os._exit(0)  # the group cannot be destroyed cleanly without its peer


def test_dead_rank_stops_others_within_timeout():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.txt")
        spawn(2, _dead_rank, path, timeout_s=10.0)
        with open(path) as f:
            seconds, outcome = f.read().split("\n", 1)
    assert outcome.startswith("error"), outcome
    assert float(seconds) < 15.0, seconds


# ------------------------------------------------------------------------------------------------ training loop

TRAIN_MODEL = ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=32,
                          moe=MoEConfig(d_model=32, d_expert=32, n_experts=4, top_k=2, route_scale=2.0,
                                        aux_loss_coef=0.01, z_loss_coef=1e-3))


CLI_TRAIN_MODEL = ["--preset", "tiny", "--vocab-size", "384", "--d-model", "32", "--n-layers", "2", "--n-heads", "2",
                   "--n-kv-heads", "2", "--d-ff", "64", "--max-seq-len", "32", "--moe-d-expert", "32",
                   "--moe-n-experts", "4", "--steps", "20", "--batch-size", "4", "--seq-len", "32",
                   "--max-corpus-bytes", "150000", "--log-every", "1", "--eval-every", "10", "--eval-batches", "2",
                   "--warmup-steps", "3", "--save-every", "10", "--threads", "1"]


def train_cfg(n: int, **over) -> TrainConfig:
    return TrainConfig(**(dict(steps=20, batch_size=4, seq_len=32, max_corpus_bytes=150_000, log_every=1,
                               eval_every=10, eval_batches=2, warmup_steps=3, save_every=10, threads=1,
                               expert_parallel=n) | over))


def _torchrun_like(rank: int, world: int, port: int, fn, args) -> None:
    """What torchrun gives a worker: the env:// variables; moelab.training.train sets the group up itself."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), MOELAB_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    fn(rank, world, *args)


def spawn_env(world: int, fn, *args) -> None:
    mp.spawn(_torchrun_like, args=(world, _free_port(), fn, args), nprocs=world, join=True)


def _train_worker(rank: int, world: int, run_dir: str, resume: bool, steps: int) -> None:
    train(TRAIN_MODEL, train_cfg(world, steps=steps), run_dir, resume=resume, progress=False)


def records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(got: list[dict], want: list[dict], what: str, rtol: float = 2e-5) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want], what
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "val_loss", "aux_load_balance", "aux_z"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=rtol, abs=1e-6), f"{what} step {w['step']} {key}"


def test_training_loop_same_curve_on_1_2_4_processes_and_resume_across_n(tmp_path):
    """20 steps with the same global batch: 4 processes (library), 2 processes (`torchrun ... -m moelab
    train --expert-parallel 2`) and one process give the same loss curve; the 4-process step-10
    checkpoint resumes with 2 and with 1 process to the same losses."""
    ref = train(TRAIN_MODEL, train_cfg(1), tmp_path / "one", progress=False)
    want = records(tmp_path / "one")
    assert len(want) == 20 and want[-1]["val_loss"] == pytest.approx(ref.final_val_loss)

    spawn_env(4, _train_worker, str(tmp_path / "four"), False, 20)
    got4 = records(tmp_path / "four")
    assert_same_curve(got4, want, "N=4")
    for r in got4:  # the straggler view: one entry per rank
        assert len(r["ep_step_s"]) == 4 and len(r["ep_rows_sent"]) == 4 and len(r["ep_load_per_rank"]) == 2
        assert all(0 <= s <= 1 for s in r["ep_a2a_share"]) and sum(r["ep_rows_sent"]) > 0
        assert sum(r["ep_rows_sent"]) == sum(r["ep_rows_received"])  # every row that leaves a rank arrives
        assert sum(r["ep_load_per_rank"][0]) == pytest.approx(1.0)
    assert (tmp_path / "four" / "expert_parallel.png").stat().st_size > 0

    port = _free_port()
    cli = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "moelab", "train", "--expert-parallel", "2", "--quiet",
           "--out", str(tmp_path / "two"), *CLI_TRAIN_MODEL]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "two" / "config.json").read_text())
    assert {k: saved[k] for k in ("model", "train")} == {"model": TRAIN_MODEL.to_dict(),
                                                          "train": train_cfg(2).to_dict()}  # the same run, by flags
    assert_same_curve(records(tmp_path / "two"), want, "torchrun N=2")

    for n in (2, 1):  # resume the 4-process run from its step-10 checkpoint with fewer processes
        run = tmp_path / f"four_to_{n}"
        shutil.copytree(tmp_path / "four", run)
        shutil.rmtree(run / "checkpoints" / "step_00000020")
        if n == 1:
            train(TRAIN_MODEL, train_cfg(1), run, resume=True, progress=False)
        else:
            spawn_env(n, _train_worker, str(run), True, 20)
        assert_same_curve(records(run), want, f"N=4 → N={n}")
