"""The (dp_shard, ep) mesh (moelab.parallel.mesh: FSDP2 × expert parallelism) and sharded checkpoints
(moelab.runs.sharded: torch.distributed.checkpoint) against the single-process run.

Library checks run a plain single-process model on the whole global batch inside every rank as the
reference; training-loop checks compare metrics.jsonl with a one-process run. gloo ranks on loopback,
one thread each, tiny models; few spawns (each costs seconds of process start-up).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import pickle
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelab.model.transformer import MoETransformer
from moelab.parallel import setup_from_env, shard_batch
from moelab.parallel.mesh import apply_fsdp, check_mesh, checkpoint_view, clip_grad_norm_, local_bytes, make_mesh
from moelab.runs.checkpoint import CheckpointError, _sha256, verify
from moelab.runs.convert import convert_to_hf
from moelab.runs.load import load_model, load_run
from moelab.runs.sharded import load_sharded, save_sharded
from moelab.training.train import train
from test_parallel import TRAIN_MODEL, _free_port, assert_same_curve, model_cfg, records, spawn, spawn_env, train_cfg

BIAS_CAPACITY = dict(router="sigmoid", expert_bias=True, n_groups=2, topk_groups=1, capacity_factor=1.0,
                     aux_loss_coef=0.0, seq_aux_loss_coef=1e-3)  # aux-loss-free bias, tokens dropped
SWITCH_LOSS = dict(router="topk_softmax")  # Switch load-balance loss, no capacity, no bias
# AdamW steps of each mesh check: every step compares losses, norms and loads with the plain model, and a few
# steps move the weights, the moments and the expert biases off their start (the bugs in docs/TESTING.md show
# at step 0 or in the saved state)
STEPS = 5


# ------------------------------------------------------------------------------------------------ library
def _mesh_check(rank: int, world: int, dp_shard: int, ep: int, moe_over: dict, steps: int,
                save_to: str | None = None) -> None:
    """`steps` AdamW steps of the mesh model and of the plain model on the whole batch: the same losses,
    gradient norms, expert loads and final weights; this rank holds 1/world of the bytes."""
    mesh = make_mesh(dp_shard, ep)
    cfg = model_cfg(n_experts=4, **moe_over)
    torch.manual_seed(0)
    ref = MoETransformer(cfg)
    model = apply_fsdp(copy.deepcopy(ref), mesh)
    opt_ref, opt = (torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (ref, model))
    gen = torch.Generator().manual_seed(2)
    tag = f"mesh {dp_shard}x{ep} {moe_over} rank {rank}"
    for step in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (4, 9), generator=gen)  # the global batch: 4 sequences
        x, y = ids[:, :-1], ids[:, 1:]
        out_ref = ref(x, targets=y)
        (out_ref.loss + out_ref.aux_loss).backward()
        out = model(shard_batch(x, rank, world), targets=shard_batch(y, rank, world))
        (out.loss + out.aux_loss).backward()
        norm_ref, norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0), clip_grad_norm_(model, 1.0)
        loss = (out.loss + out.aux_loss).detach().clone()
        dist.all_reduce(loss)
        torch.testing.assert_close(loss / world, (out_ref.loss + out_ref.aux_loss).detach(), atol=2e-6, rtol=2e-6,
                                   msg=lambda m, s=step: f"{tag} step {s} loss: {m}")
        torch.testing.assert_close(norm, norm_ref, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, s=step: f"{tag} step {s} norm: {m}")
        for a, a_ref in zip(out.aux, out_ref.aux, strict=True):
            torch.testing.assert_close(a.load, a_ref.load, msg=lambda m, s=step: f"{tag} step {s} load: {m}")
        for o in (opt_ref, opt):
            o.step()
            o.zero_grad()
        if cfg.moe.expert_bias:
            ref.update_expert_biases([a.load for a in out_ref.aux])
            model.update_expert_biases([a.load for a in out.aux])
    params, state = local_bytes(model, opt)
    params_ref, state_ref = local_bytes(ref, opt_ref)
    # FSDP pads each parameter's dim 0 to a multiple of its mesh: allow a few rows of slack
    assert params_ref / world <= params <= params_ref / world * 1.1, (tag, params, params_ref)
    assert state == 2 * params, (tag, state, params)  # AdamW: two moments per local element
    for name, b in ref.named_buffers():  # the expert biases moved alike everywhere
        torch.testing.assert_close(dict(model.named_buffers())[name], b, msg=lambda m, n=name: f"{tag} {n}: {m}")
    if save_to is not None:
        save_sharded(save_to, steps, model=model, optimizer=opt, config={}, trainer={},
                     rng={"torch": torch.get_rng_state()}, view=functools.partial(checkpoint_view, mesh=mesh))
        for p in model.parameters():  # saving left the optimizer's own state alone (its next step needs it)
            assert all(opt.state[p][k].device_mesh == p.device_mesh for k in ("exp_avg", "exp_avg_sq"))
        ep_group = mesh.device_mesh.get_group("ep")

        def full(t, name):  # the whole tensor, the experts' ep slices gathered in ep order
            t = t.full_tensor()
            if ".experts." not in name:
                return t
            parts = [torch.empty_like(t) for _ in range(ep)]
            dist.all_gather(parts, t, group=ep_group)
            return torch.cat(parts)

        saved = {n: (full(p, n), {k: full(opt.state[p][k], n) for k in ("exp_avg", "exp_avg_sq")})
                 for n, p in model.named_parameters()}
        saved |= {n: (b.clone(), None) for n, b in model.named_buffers()}  # the expert biases
        _reshard_check(rank, Path(save_to) / "checkpoints" / f"step_{steps:08d}", saved, moe_over)


def _reshard_check(rank: int, ckpt: Path, ref_state: dict, moe_over: dict) -> None:
    """The 2 × 2 checkpoint loaded on a 4 × 1 and a 1 × 4 mesh: every weight and AdamW moment is the
    saved one (experts compared slice by slice: ep rank e holds rows [e·El, (e+1)·El))."""
    for dp_shard, ep in ((4, 1), (1, 4)):
        mesh = make_mesh(dp_shard, ep)
        torch.manual_seed(99)  # other initial weights: the load must replace them all
        model = apply_fsdp(MoETransformer(model_cfg(n_experts=4, **moe_over)), mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        load_sharded(ckpt, model, opt, functools.partial(checkpoint_view, mesh=mesh))
        e = rank % ep
        for name, b in model.named_buffers():
            assert torch.equal(b, ref_state[name][0]), f"{dp_shard}x{ep} rank {rank} {name}"
        for name, p in model.named_parameters():
            want, want_state = ref_state[name]
            rows = slice(None)
            if ".experts." in name:
                El = want.shape[0] // ep
                rows = slice(e * El, (e + 1) * El)
            for got, exp in ((p, want), (opt.state[p]["exp_avg"], want_state["exp_avg"]),
                             (opt.state[p]["exp_avg_sq"], want_state["exp_avg_sq"])):
                assert torch.equal(got.full_tensor(), exp[rows]), f"{dp_shard}x{ep} rank {rank} {name}"


def _mesh_suite(rank: int, world: int) -> None:
    if world == 4:
        _mesh_check(rank, world, 2, 2, SWITCH_LOSS, steps=STEPS)
        save_to = [str(Path(tempfile.gettempdir()) / f"moelab-mesh-{os.getppid()}") if rank == 0 else None]
        dist.broadcast_object_list(save_to)
        try:
            _mesh_check(rank, world, 2, 2, BIAS_CAPACITY, steps=STEPS, save_to=save_to[0])
        finally:
            dist.barrier()
            if rank == 0:
                shutil.rmtree(save_to[0], ignore_errors=True)
    else:
        _mesh_check(rank, world, 2, 1, BIAS_CAPACITY, steps=STEPS)
        _mesh_check(rank, world, 1, 2, SWITCH_LOSS, steps=STEPS)
        _mixed_precision_check(rank, world)


def _mixed_precision_check(rank: int, world: int) -> None:
    """FSDP's MixedPrecisionPolicy on a 1 × 2 mesh: the forward computes in bfloat16 (logits bf16, the
    loss within bf16 rounding of the float32 one), weights and reduced gradients stay float32."""
    torch.manual_seed(0)
    ref = MoETransformer(model_cfg(n_experts=4))
    model = apply_fsdp(copy.deepcopy(ref), make_mesh(1, 2), mixed_precision=True)
    ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(2))
    x, y = ids[:, :-1], ids[:, 1:]
    out = model(shard_batch(x, rank, world), targets=shard_batch(y, rank, world))
    assert out.logits.dtype == torch.bfloat16
    loss = out.loss.detach().float().clone()
    dist.all_reduce(loss)
    torch.testing.assert_close(loss / world, ref(x, targets=y).loss.detach(), atol=3e-2, rtol=0)
    (out.loss + out.aux_loss).backward()
    assert {p.dtype for p in model.parameters()} == {p.grad.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("world", [2, 4])
def test_mesh_matches_single_process(world):
    spawn(world, _mesh_suite)


def test_mesh_refused_before_process_group(monkeypatch):
    with pytest.raises(ValueError, match=r"data_parallel_shard=3 × expert_parallel=2 = 6 does not match the world "
                                         r"size 4"):
        check_mesh(4, 3, 2)
    with pytest.raises(ValueError, match="n_experts=6 is not divisible by expert_parallel=4"):
        check_mesh(8, 2, 4, n_experts=6)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"n_experts=6 is not divisible by expert_parallel=4"):
        setup_from_env(4, data_parallel_shard=1, n_experts=6)
    assert not dist.is_initialized()
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match=r"data_parallel_shard=2 × expert_parallel=2 needs 4 processes"):
        setup_from_env(2, data_parallel_shard=2)


# ------------------------------------------------------------------------------------------------ sharded files
def _one_step_model(seed: int = 0, moe_over: dict = BIAS_CAPACITY):
    torch.manual_seed(seed)
    model = MoETransformer(model_cfg(n_experts=4, **moe_over))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    (out.loss + out.aux_loss).backward()
    opt.step()
    return model, opt


def test_sharded_checkpoint_in_one_process_round_trip_and_refusals(tmp_path):
    """One process writes and reads the sharded format (DCP without a process group): every tensor and
    every AdamW moment comes back; a changed byte, an unlisted file and a pickle that names anything but
    DCP's index classes are refused, the last without running it."""
    model, opt = _one_step_model(0)
    rng = {"torch": torch.get_rng_state(), "data": torch.Generator().manual_seed(5).get_state()}
    ckpt = save_sharded(tmp_path, 7, model=model, optimizer=opt, config={"model": {}}, trainer={"a": 1}, rng=rng)
    assert ckpt.name == "step_00000007" and not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert not (ckpt / "model.safetensors").exists() and (ckpt / "dcp" / ".metadata").is_file()
    fresh, fresh_opt = _one_step_model(1)
    trainer, got_rng = load_sharded(ckpt, fresh, fresh_opt)
    assert trainer["a"] == 1 and trainer["step"] == 7 and torch.equal(got_rng["torch"], rng["torch"])
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh_opt.state[q][name], opt.state[p][name]), name
    assert fresh_opt.param_groups[0]["betas"] == opt.param_groups[0]["betas"]

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    shard = bad / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        verify(bad)
    shutil.copy(ckpt / "dcp" / "__0_0.distcp", shard)
    (bad / "dcp" / "extra.distcp").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not listed in manifest.json"):
        verify(bad)
    (bad / "dcp" / "extra.distcp").unlink()

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (bad / "dcp" / ".metadata").write_bytes(pickle.dumps(Evil()))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["dcp/.metadata"] = {"sha256": _sha256(bad / "dcp" / ".metadata"),
                                 "bytes": (bad / "dcp" / ".metadata").stat().st_size}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_sharded(bad, fresh)
    assert not marker.exists()


def test_sharded_checkpoint_converts_to_hf(tmp_path):
    """`moelab convert --to-hf` (via load_run) reads a sharded checkpoint: the exported model computes
    the saved model's logits."""
    model, opt = _one_step_model(0, SWITCH_LOSS)
    ckpt = save_sharded(tmp_path, 1, model=model, optimizer=opt, trainer={},
                        config={"model": model_cfg(n_experts=4, **SWITCH_LOSS).to_dict()},
                        rng={"torch": torch.get_rng_state()})
    exported = load_model(convert_to_hf(ckpt, tmp_path / "hf")).model
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ training loop
@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """The reference: 20 steps of TRAIN_MODEL in one process."""
    run = tmp_path_factory.mktemp("fsdp") / "one"
    train(TRAIN_MODEL, train_cfg(1), run, progress=False)
    return run


def _mesh_train(rank: int, world: int, run_dir: str, resume: bool, dp_shard: int, ep: int) -> None:
    train(TRAIN_MODEL, train_cfg(ep, data_parallel_shard=dp_shard), run_dir, resume=resume, progress=False)


def test_training_loop_on_the_mesh_resumes_on_other_meshes(tmp_path, one_process_run):
    """20 steps on a 2 × 2 mesh give the one-process loss curve; its step-10 sharded checkpoint (4 shard
    files, nothing gathered) resumes on a 2 × 1 mesh and in one process to the same curve; `load_run`
    reads the sharded step-20 checkpoint as the one-process run's final weights."""
    want = records(one_process_run)
    spawn_env(4, _mesh_train, str(tmp_path / "four"), False, 2, 2)
    assert_same_curve(records(tmp_path / "four"), want, "mesh 2x2")
    ckpt = tmp_path / "four" / "checkpoints" / "step_00000020"
    verify(ckpt)
    assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [".metadata", *(f"__{r}_0.distcp" for r in range(4))]
    assert json.loads((ckpt / "trainer.json").read_text())["mesh"] == {"dp_shard": 2, "ep": 2}
    got, _ = load_run(tmp_path / "four")
    ref, _ = load_run(one_process_run)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, atol=2e-4, rtol=1e-3, msg=lambda m, k=k: f"{k}: {m}")

    for n in (2, 1):
        run = tmp_path / f"four_to_{n}"
        shutil.copytree(tmp_path / "four", run)
        shutil.rmtree(run / "checkpoints" / "step_00000020")
        if n == 1:
            train(TRAIN_MODEL, train_cfg(1), run, resume=True, progress=False)
        else:
            spawn_env(2, _mesh_train, str(run), True, 2, 1)
        assert_same_curve(records(run), want, f"mesh 2x2 -> {n} process(es)")


def _fault_worker(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), MOELAB_DIST_TIMEOUT="20", MOELAB_TEST_CHECKPOINT_PAUSE="3",
                      MOELAB_TEST_CHECKPOINT_PAUSE_STEP="20")
    torch.set_num_threads(1)
    try:
        train(TRAIN_MODEL, train_cfg(2, data_parallel_shard=1), run_dir, progress=False)
        outcome = "finished"
    except RuntimeError as e:
        outcome = f"error: {e}"
    Path(out).write_text(f"{time.time()}\n{outcome}")
    os._exit(0)  # the group cannot be torn down cleanly without its peer


def test_rank_killed_during_a_save_stops_the_other_and_the_previous_checkpoint_resumes(tmp_path, one_process_run):
    """kill -9 of rank 1 while the step-20 checkpoint is being written (its shards are on disk, the
    rename has not happened): rank 0 exits with the named error within the 20 s collective timeout
    (plus the 3 s test pause), only step 10 is complete, and resuming continues from it to the curve of
    an uninterrupted run."""
    run = tmp_path / "run"
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_fault_worker, args=(r, 2, port, str(run), str(tmp_path / f"out{r}")))
             for r in range(2)]
    for p in procs:
        p.start()
    index = run / "checkpoints" / ".tmp-step_00000020-sharded" / "dcp" / ".metadata"
    deadline = time.time() + 600
    while not index.exists() and time.time() < deadline and procs[1].is_alive():
        time.sleep(0.05)
    assert index.exists(), "the step-20 save never started"
    os.kill(procs[1].pid, signal.SIGKILL)
    killed = time.time()
    procs[0].join(timeout=60)
    alive = procs[0].is_alive()
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    assert not alive, "rank 0 still running 60 s after its peer was killed"
    ended, outcome = (tmp_path / "out0").read_text().split("\n", 1)
    assert outcome.startswith("error: rank 0 of 2: a collective failed"), outcome
    assert float(ended) - killed < 3 + 20 + 5, float(ended) - killed
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == [".tmp-step_00000020-sharded",
                                                                       "step_00000010"]
    train(TRAIN_MODEL, train_cfg(1), run, resume=True, progress=False)  # one process, from step 10
    assert_same_curve(records(run), records(one_process_run), "killed at 20, resumed from 10")
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the next save removed the torn one
