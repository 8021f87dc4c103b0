"""How fast can the expert products of one decode step read their weights? Products only, no routing.

For one token, the MoE layer's experts compute, per chosen expert e, h = x·W_in[e], a = SwiGLU(h),
y += a·W_out[e] — reading k expert matrices, exactly the bytes of the dense twin (hidden width k·f),
which reads one large matrix per projection instead. This script times, side by side in one run:

- dense:        the twin, `FeedForward(d, k·f)` (`nn.Linear`, weights [out, in]);
- stacked-mm:   what the stacked store computes per expert (`moelab.layer.experts.Experts.ffn`): `torch.mm` on
                views of the stacked [E, D, H] / [E, F, D] weights, i.e. [in, out] matrices;
- linear-[out,in]: `F.linear` on a transposed copy of the stacks, [E, H, D] / [E, D, F] — the
                `nn.Linear` / transformers 5 expert layout;
- onednn-[out,in]: the same copy through oneDNN's inner product (`torch.ops.mkldnn._linear_pointwise`).

Every call draws its own k random experts and starts from a cold cache (a 128 MiB buffer is
read before it, untimed), as in a model's decode step, whose weights exceed the cache.
Candidates run in a shuffled order each repetition; the table shows medians and ratios to the twin.

    python benchmarks/decode_kernels.py                      # float32 and bfloat16, 8x2 and 64x8
    python benchmarks/decode_kernels.py --dtypes bfloat16 --sizes 64x8 --reps 500
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from moelab.layer.expert_ops import activate, onednn_matmul_available
from moelab.layer.experts import FeedForward

D_MODEL, D_EXPERT = 1024, 512
EVICT_BYTES = 4 * 32 * 2**20  # 4x this machine's 32 MiB L3


def candidates(dtype: torch.dtype, E: int, k: int) -> dict:
    """name → f(experts) running one token's expert products (the dense twin ignores the experts)."""
    torch.manual_seed(0)
    w_in = torch.randn(E, D_MODEL, 2 * D_EXPERT, dtype=dtype) * 0.02  # moelab's stacked layout
    w_out = torch.randn(E, D_EXPERT, D_MODEL, dtype=dtype) * 0.02
    w_in_t, w_out_t = w_in.transpose(1, 2).contiguous(), w_out.transpose(1, 2).contiguous()
    dense = FeedForward(D_MODEL, k * D_EXPERT).to(dtype)
    x = torch.randn(1, D_MODEL, dtype=dtype)
    weights = [1.0 / k] * k

    def linear_out_in(experts):
        return sum(F.linear(activate(F.linear(x, w_in_t[e]), "swiglu"), w_out_t[e]) for e in experts)

    def onednn_out_in(experts):
        lin = torch.ops.mkldnn._linear_pointwise
        return sum(lin(activate(lin(x, w_in_t[e], None, "none", [], ""), "swiglu"), w_out_t[e], None, "none", [], "")
                   for e in experts)

    out = {
        "dense": lambda experts: dense(x),
        "stacked-mm": lambda experts: sum(w * (activate(x @ w_in[e], "swiglu") @ w_out[e])
                                          for e, w in zip(experts, weights)),
        "linear-[out,in]": linear_out_in,
    }
    if onednn_matmul_available(dtype):
        out["onednn-[out,in]"] = onednn_out_in
    return out


def run(dtype: torch.dtype, E: int, k: int, reps: int) -> dict[str, float]:
    cands = candidates(dtype, E, k)
    random.seed(0)  # the same expert draws and orders in every run
    evict = torch.zeros(EVICT_BYTES // 4)
    times: dict[str, list[float]] = {name: [] for name in cands}
    with torch.no_grad():
        for rep in range(reps + 5):
            order = list(cands.items())
            random.shuffle(order)
            for name, f in order:
                experts = random.sample(range(E), k)
                evict.sum()  # read, not written: no dirty lines to write back inside the timed call
                t0 = time.perf_counter()
                f(experts)
                if rep >= 5:  # warm-up
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--sizes", default="8x2,64x8", help="comma-separated ExK")
    p.add_argument("--reps", type=int, default=300)
    args = p.parse_args()
    print(f"# decode expert products, d={D_MODEL}, f={D_EXPERT}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.reps} reps, random experts, cold cache")
    print("| dtype | E, k | candidate | µs | / dense | weight GB/s |")
    print("|---|---|---|---|---|---|")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for size in args.sizes.split(","):
            E, k = map(int, size.split("x"))
            med = run(dtype, E, k, args.reps)
            nbytes = 3 * k * D_MODEL * D_EXPERT * torch.finfo(dtype).bits // 8
            for name, s in med.items():
                print(f"| {dtype_name} | {E}, {k} | {name} | {s * 1e6:.0f} | {s / med['dense']:.2f} | "
                      f"{nbytes / s / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
