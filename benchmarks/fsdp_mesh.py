"""FSDP2 × expert parallelism on a (dp_shard, ep) mesh: per-rank memory and where a step's time goes on
1, 2, 4 gloo ranks (CPU), then the same figures on paper for a DeepSeek-V3-shaped model on 256 GPUs.

    python benchmarks/fsdp_mesh.py                          # meshes 1x1, 2x1, 1x2, 2x2 of the model below
    python benchmarks/fsdp_mesh.py --meshes 1x1 2x2 --steps 4 --d-model 128

Every mesh trains the same model on the same global batch (split over the ranks) for a few steps after
warm-up (`moelab.parallel.mesh.apply_fsdp`; 1x1 is the plain one-process model, no FSDP). Per rank:
    params / optim  bytes of the local shards of the parameters and of AdamW's state (measured from the
                    tensors: `moelab.parallel.mesh.local_bytes`)
    saved acts      bytes the forward saves for the backward (a saved_tensors_hooks sum over one forward:
                    the peak of activation memory, FSDP's gathered weights included where it saves them)
    step            median wall time of an optimizer step
    a2a / AG / RS   the share of the step inside the expert all-to-alls, FSDP's all-gathers and its
                    reduce-scatters (timers around the collectives; FSDP's asynchronous calls are waited
                    for inside the timer, so this measures the collective and removes any overlap)
One thread per rank; on a 2-core machine 4 ranks are oversubscribed, and the output says so.

The paper part uses `moelab card`'s counts (moelab.accounting) for DeepSeek-V3 (671 B parameters without
the MTP module) trained in FSDP's mixed precision: float32 sharded weights (4 B), gradients (4 B) and AdamW
moments (8 B) — 16 B per parameter, every parameter sharded over all W ranks — plus, per step and rank,
the bf16 all-gathers (forward and backward re-gather), the fp32 reduce-scatter, and the all-to-all bytes
of `moelab.accounting.expert_parallel` for the paper's batch (15360 sequences × 4096 tokens, §4.2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelab import ModelConfig, MoEConfig
from moelab.accounting.counts import count_params, to_spec
from moelab.accounting.expert_parallel import expert_parallel_plan
from moelab.config.train import TrainConfig
from moelab.model.transformer import MoETransformer
from moelab.parallel import exchange_stats, shard_batch
from moelab.parallel.mesh import apply_fsdp, clip_grad_norm_, local_bytes, make_mesh
from moelab.training.optim import make_optimizer

TIMES = {"all_gather": 0.0, "reduce_scatter": 0.0}


def _timed(name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        work = fn(*args, **kwargs)
        if work is not None:
            work.wait()
        TIMES[name] += time.perf_counter() - t0
        return work
    return wrapper


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_cfg(args) -> ModelConfig:
    moe = MoEConfig(d_model=args.d_model, d_expert=args.d_expert, n_experts=args.n_experts, top_k=args.top_k,
                    route_scale=float(args.top_k), aux_loss_coef=0.01, z_loss_coef=1e-3)
    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                       n_kv_heads=args.n_heads, d_ff=args.top_k * args.d_expert, max_seq_len=args.seq_len, moe=moe)


def _rank_main(rank: int, world: int, port: int, dp_shard: int, ep: int, args, out_path: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MoETransformer(_model_cfg(args))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=300))
        model = apply_fsdp(model, make_mesh(dp_shard, ep))
        dist.all_gather_single = _timed("all_gather", dist.all_gather_single)
        dist.reduce_scatter_single = _timed("reduce_scatter", dist.reduce_scatter_single)
    opt = make_optimizer(model, TrainConfig(lr=1e-3))
    gen = torch.Generator().manual_seed(1)
    rows, saved = [], [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen)  # the global batch
        exchange_stats(model, reset=True)
        TIMES.update(all_gather=0.0, reduce_scatter=0.0)
        saved[0] = 0
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(shard_batch(ids[:, :-1], rank, world), targets=shard_batch(ids[:, 1:], rank, world))
        acts = saved[0]
        (out.loss + out.aux_loss).backward()
        if world > 1:
            clip_grad_norm_(model, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            rows.append([dt, exchange_stats(model).seconds, TIMES["all_gather"], TIMES["reduce_scatter"], acts])
    mine = [statistics.median(col) for col in zip(*rows)] + list(local_bytes(model, opt))
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        dist.barrier()
        dist.destroy_process_group()
    else:
        parts = [mine]
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(parts, f)


def run(dp_shard: int, ep: int, args) -> list[list[float]]:
    world = dp_shard * ep
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        mp.spawn(_rank_main, args=(world, _free_port(), dp_shard, ep, args, path), nprocs=world, join=True)
        with open(path) as f:
            return json.load(f)


def paper(ranks: int = 256, ep: int = 64, memory_gb: float = 80.0) -> None:
    """DeepSeek-V3 on a (dp_shard = ranks / ep, ep) mesh, on paper (see the module doc)."""
    counts, spec = count_params("deepseek-v3"), to_spec("deepseek-v3")
    P, P_exp = counts.total, counts.breakdown["routed_experts"]
    P_rest, D = P - P_exp, ranks // ep
    tokens = 15360 * 4096
    state = 16 * P  # fp32 weights + fp32 gradients + AdamW's two fp32 moments
    min_ranks = math.ceil(state / (memory_gb * 1e9))
    plan = expert_parallel_plan(spec, ep, tokens=tokens)  # bytes per token for experts split over ep ranks
    # bytes each rank receives (all-gather) / sends (reduce-scatter) per step: its units' shards times (n-1)/n
    ag = 2 * 2 * (P_rest * (ranks - 1) / ranks + P_exp / ep * (D - 1) / D)  # bf16, forward + backward re-gather
    rs = 4 * (P_rest * (ranks - 1) / ranks + P_exp / ep * (D - 1) / D)  # fp32 gradients
    # each rank holds T / W tokens (not T / N: the batch is split over the whole mesh) and exchanges them
    # inside its ep group of N ranks
    a2a = plan.per_assignment.to_dict()["bytes_per_token_training"] * tokens / ranks
    print(f"\nDeepSeek-V3 on paper (moelab card counts: {P / 1e9:.1f} B parameters, {P_exp / 1e9:.1f} B in routed "
          f"experts; MTP module not counted), mesh dp_shard {D} × ep {ep} = {ranks} ranks:")
    print(f"  weights + gradients + AdamW (16 B/param, sharded over all ranks): {state / 1e12:.2f} TB in total, "
          f"{state / ranks / 1e9:.1f} GB per rank; at least {min_ranks} ranks of {memory_gb:.0f} GB hold it "
          "(before activations and the gathered bf16 layer being computed)")
    print(f"  per step and rank, batch {tokens / 1e6:.1f} M tokens: FSDP all-gather {ag / 1e9:.1f} GB received, "
          f"reduce-scatter {rs / 1e9:.1f} GB sent, expert all-to-all {a2a / 1e9:.1f} GB sent "
          f"(one copy per routed expert on another rank, forward + backward)")
    print(f"  the gathered bf16 weights of one MoE block on a rank: "
          f"{2 * (P_rest / spec.n_layers + P_exp / len([x for x in spec.layers if x.ffn.experts]) / ep) / 1e9:.2f} GB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--meshes", nargs="+", default=["1x1", "2x1", "1x2", "2x2"], help="dp_shard x ep")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-expert", type=int, default=128)
    p.add_argument("--n-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    print(f"model: d={args.d_model}, {args.n_layers} layers, E={args.n_experts}, k={args.top_k}, f={args.d_expert}, "
          f"vocab {args.vocab}; global batch {args.batch} x {args.seq_len} tokens; one thread per rank; {cores} "
          f"cores; load average at start {os.getloadavg()[0]:.2f}")
    base = None
    mb = 1 / 2**20
    for mesh in args.meshes:
        dp_shard, ep = map(int, mesh.split("x"))
        per_rank = run(dp_shard, ep, args)
        step = max(r[0] for r in per_rank)  # the slowest rank sets the pace
        base = base or (step, per_rank[0][5], per_rank[0][6])
        note = "  (oversubscribed: more ranks than cores)" if dp_shard * ep > cores else ""
        print(f"\nmesh {mesh} ({dp_shard * ep} process{'es' if dp_shard * ep > 1 else ''}): step {step * 1e3:.1f} ms "
              f"= {step / base[0]:.2f}x the {args.meshes[0]} step; params per rank {per_rank[0][5] / base[1]:.3f}x, "
              f"optimizer {per_rank[0][6] / base[2]:.3f}x of {args.meshes[0]}'s{note}")
        print("  rank | params MB | optim MB | saved acts MB | step ms | a2a % |  AG % |  RS %")
        for rank, r in enumerate(per_rank):
            print(f"  {rank:4d} | {r[5] * mb:9.2f} | {r[6] * mb:8.2f} | {r[4] * mb:13.2f} | {r[0] * 1e3:7.1f} | "
                  f"{100 * r[1] / r[0]:5.1f} | {100 * r[2] / r[0]:5.1f} | {100 * r[3] / r[0]:5.1f}")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    paper()


if __name__ == "__main__":
    main()
