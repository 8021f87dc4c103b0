"""Expert parallelism: where a training step's time goes on 1, 2, 4 gloo ranks (CPU).

    python benchmarks/expert_parallel.py                        # ranks 1 2 4, the model below
    python benchmarks/expert_parallel.py --ranks 1 2 --steps 10 --d-model 512 --n-experts 32

Every configuration trains the same model on the same global batch (B sequences of S tokens, split over
the ranks) for a few steps after warm-up; each rank times its phases and rank 0 prints, per rank:
    step        wall time of one optimizer step
    fwd+bwd     forward and backward (including the all-to-alls inside them)
    a2a         time inside the expert-parallel all-to-alls (counts and rows, forward and backward)
    sync+clip   the all-reduce of the replicated gradients and the global-norm clipping
    optim       AdamW step
    rows out/in rows this rank sent to / received from other ranks per step
and, per configuration, the step time relative to one process and the all-to-all share of the step.
Each rank runs one thread, so N ranks use N cores: on a 2-core machine N = 4 is oversubscribed and
says so in the output. gloo over loopback is the transport here; NCCL over NVLink/InfiniBand has
other constants (see `moelab card --expert-parallel N` for the paper model).
"""

from __future__ import annotations

import argparse
import json
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
from moelab.config.train import TrainConfig
from moelab.model.transformer import MoETransformer
from moelab.parallel import ParallelContext, exchange_stats
from moelab.training.optim import make_optimizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_cfg(args) -> ModelConfig:
    moe = MoEConfig(d_model=args.d_model, d_expert=args.d_expert, n_experts=args.n_experts, top_k=args.top_k,
                    route_scale=float(args.top_k), aux_loss_coef=0.01, z_loss_coef=1e-3)
    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                       n_kv_heads=args.n_heads, d_ff=args.top_k * args.d_expert, max_seq_len=args.seq_len, moe=moe)


def _rank_main(rank: int, world: int, port: int, args, out_path: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
    ctx = ParallelContext(rank, world, None, owns_group=world > 1)
    torch.manual_seed(0)
    model = ctx.wrap(MoETransformer(_model_cfg(args)))
    opt = make_optimizer(model, TrainConfig(lr=1e-3))  # the training loop's AdamW (fused where torch has it)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen)  # the global batch
        exchange_stats(model, reset=True)
        t0 = time.perf_counter()
        out = model(ctx.shard(ids[:, :-1]), targets=ctx.shard(ids[:, 1:]))
        (out.loss + out.aux_loss).backward()
        t1 = time.perf_counter()
        ctx.clip_grads_(model, 1.0)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step >= args.warmup:
            a2a = exchange_stats(model)
            rows.append([t3 - t0, t1 - t0, a2a.seconds, t2 - t1, t3 - t2, a2a.rows_sent, a2a.rows_received])
    mine = [statistics.median(col) for col in zip(*rows)]
    per_rank = ctx.gather(mine)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(per_rank, f)
    ctx.close()


def run(world: int, args) -> list[list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        mp.spawn(_rank_main, args=(world, _free_port(), args, path), nprocs=world, join=True)
        with open(path) as f:
            return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-expert", type=int, default=256)
    p.add_argument("--n-experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    print(f"model: d={args.d_model}, {args.n_layers} layers, E={args.n_experts}, k={args.top_k}, f={args.d_expert}; "
          f"global batch {args.batch} x {args.seq_len} tokens; one thread per rank; {cores} cores; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    base = None
    for world in args.ranks:
        per_rank = run(world, args)
        step = max(r[0] for r in per_rank)  # the slowest rank sets the pace
        if base is None:
            base = step
        note = "  (oversubscribed: more ranks than cores)" if world > cores else ""
        print(f"\nN = {world}: step {step * 1e3:.1f} ms, {step / base:.2f}x the N = {args.ranks[0]} step, "
              f"all-to-all share {max(r[2] / r[0] for r in per_rank):.1%} (max over ranks){note}")
        print("  rank |  step ms | fwd+bwd ms |  a2a ms | sync+clip ms | optim ms | rows out | rows in")
        for rank, r in enumerate(per_rank):
            print(f"  {rank:4d} | {r[0] * 1e3:8.1f} | {r[1] * 1e3:10.1f} | {r[2] * 1e3:7.1f} | {r[3] * 1e3:12.1f} | "
                  f"{r[4] * 1e3:8.1f} | {int(r[5]):8d} | {int(r[6]):7d}")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
