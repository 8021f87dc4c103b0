"""Sparse upcycling on this machine: a dense tiny model, then its upcycled MoE and the dense model trained on.

    python benchmarks/upcycle.py                  # N = 200 steps per phase
    python benchmarks/upcycle.py --steps 100 --out runs/upcycle_bench --plot docs/img/upcycle.png

Phase 1: a dense model (moe=None) trained N steps on the default corpus. Phase 2, from its checkpoint, each N more
steps on the same token windows (same tokenizer, same sampler seed): the dense model continued (`moelab train
--init-from`), its upcycle (E = 8 copies of each FFN, renormalised top-2 softmax router; `moelab upcycle`) with the
Switch load-balancing loss (aux_loss_coef 0.01), and the same upcycle without it (aux_loss_coef 0). Printed: the
validation loss of each against training compute (6 · active parameters without the input embedding · tokens,
attention scores left out), the experts' mean pairwise cosine similarity (each expert's w_in and w_out flattened,
averaged over the pairs and the layers) at every checkpoint, and the largest expert's load share. The ratio line
compares the upcycle's validation-loss drop over phase 2 with the dense model's, per unit of compute.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from moelab.accounting import count_params
from moelab.config.model import ModelConfig
from moelab.config.train import TrainConfig
from moelab.training.init import load_init
from moelab.training.train import train
from moelab.training.upcycle import upcycle


def expert_cosine(ckpt: Path) -> float:
    """Mean over MoE layers and expert pairs of cos(expert i, expert j), weights flattened."""
    state = load_file(str(ckpt / "model.safetensors"))
    layers = sorted({k.rsplit(".experts.", 1)[0] for k in state if ".experts.w_in" in k})
    sims = []
    for p in layers:
        w = torch.cat([state[f"{p}.experts.w_in"].flatten(1), state[f"{p}.experts.w_out"].flatten(1)], dim=1)
        w = torch.nn.functional.normalize(w.double(), dim=1)
        sims += [float(w[i] @ w[j]) for i, j in itertools.combinations(range(w.shape[0]), 2)]
    return sum(sims) / len(sims)


def metrics(run: Path) -> list[dict]:
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


def flops_per_token(cfg: ModelConfig) -> float:
    return 6.0 * count_params(cfg).active_no_input_embedding


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per phase")
    ap.add_argument("--out", default="runs/upcycle_bench")
    ap.add_argument("--plot", default=None, help="write the figure here (PNG)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    out, N = Path(args.out), args.steps
    dense_cfg = ModelConfig(vocab_size=2048, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256,
                            max_seq_len=128, moe=None)
    every = max(1, N // 10)
    common = dict(batch_size=16, seq_len=64, eval_every=every, eval_batches=8, log_every=every, threads=args.threads,
                  max_corpus_bytes=2_000_000)
    first = TrainConfig(steps=N, lr=3e-3, warmup_steps=N // 10, seed=0, **common)
    # phase 2: other windows than phase 1 (seed 1), the same ones for every phase-2 run
    cont = TrainConfig(steps=N, lr=1e-3, warmup_steps=N // 20, save_every=every, keep_checkpoints=100, seed=1, **common)
    res = train(dense_cfg, first, out / "dense", progress=False)
    base_tokens = res.train_tokens
    print(f"phase 1: dense, {N} steps, validation loss {res.final_val_loss:.4f}")
    runs = {}
    init = load_init(out / "dense")
    runs["dense (continued)"] = train(init.model.cfg, cont, out / "dense_cont", init=init, progress=False).run_dir
    for name, aux in (("upcycled E=8 top-2, aux 0.01", 0.01), ("upcycled E=8 top-2, aux 0", 0.0)):
        tag = "up_aux" if aux else "up_noaux"
        upcycle(out / "dense", out / f"{tag}_init", n_experts=8, top_k=2, aux_loss_coef=aux)
        init = load_init(out / f"{tag}_init")
        runs[name] = train(init.model.cfg, cont, out / tag, init=init, progress=False).run_dir
    table, curves = [], {}
    for name, run in runs.items():
        cfg = ModelConfig.from_dict(json.loads((run / "config.json").read_text())["model"])
        fpt, base = flops_per_token(cfg), flops_per_token(dense_cfg) * base_tokens
        lines = metrics(run)
        pts = [(base + fpt * r["tokens"], r["val_loss"]) for r in lines if "val_loss" in r]
        cos = [(int(c.name.split("_")[1]), expert_cosine(c)) for c in sorted((run / "checkpoints").glob("step_*"))
               ] if cfg.moe else []
        up_cos = [(0, expert_cosine(out / f"{'up_aux' if 'aux 0.01' in name else 'up_noaux'}_init" / "checkpoints"
                                    / "step_00000000"))] if cfg.moe else []
        share = [max(x) for x in lines[-1]["expert_load"]] if cfg.moe else []
        curves[name] = {"loss": pts, "cosine": up_cos + cos}
        table.append((name, fpt, pts[0][1], pts[-1][1], pts[-1][0], share, up_cos + cos))
    print(f"\n{'run':<32} {'FLOPs/token':>12} {'val@0':>8} {'val@N':>8} {'total FLOPs':>12}  max load share per layer")
    for name, fpt, v0, v1, total, share, _ in table:
        print(f"{name:<32} {fpt:>12.3g} {v0:>8.4f} {v1:>8.4f} {total:>12.3g}  {[round(s, 3) for s in share]}")
    print("\nmean pairwise cosine of the upcycled experts (step: value)")
    for name, *_, cos in table:
        if cos:
            print(f"  {name}: " + ", ".join(f"{s}: {c:.4f}" for s, c in cos))
    d, u = table[0], table[1]
    drop_d, drop_u = d[2] - d[3], u[2] - u[3]
    print(f"\nstep 0 of phase 2: validation loss dense {d[2]:.6f}, upcycled {u[2]:.6f} (the same function)")
    print(f"phase-2 validation-loss drop: dense {drop_d:.4f}, upcycled (aux 0.01) {drop_u:.4f}, ratio "
          f"{drop_u / drop_d:.2f} at {u[1] / d[1]:.2f}x the compute per token; per unit of compute: ratio "
          f"{(drop_u / u[1]) / (drop_d / d[1]):.2f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for name, c in curves.items():
            xs, ys = zip(*c["loss"])
            a.plot(xs, ys, marker="o", label=name)
            if c["cosine"]:
                s, v = zip(*c["cosine"])
                b.plot(s, v, marker="o", label=name)
        a.set(xlabel="training FLOPs (6 · active params · tokens, phase 1 included)", ylabel="validation loss",
              title="phase 2: dense continued vs upcycled")
        b.set(xlabel="phase-2 step", ylabel="mean pairwise cosine of experts", title="how fast the copies diverge")
        a.legend(fontsize=8)
        b.legend(fontsize=8)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"figure: {args.plot}")


if __name__ == "__main__":
    main()
