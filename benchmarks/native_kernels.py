"""How fast does each kernel read its weights? moelab's own CPU kernels (`moelab.inference.native`) against
torch's, side by side in one process, at the shapes of a real MoE decode step, with the memory-read bound measured
in between.

For every format (bf16, int8, int4 g32) and row count M of x, one product x [M, K] · Wᵀ is timed over a pool of
distinct weights larger than the last-level cache (as in a model, whose weights exceed it), cycling through them,
so every product reads its weight from memory:

- native:  `moelab.inference.native.linear` (int8 / int4: activations quantized per block of 32 to int8);
- torch:   bf16 — oneDNN's prepacked inner product (`mkldnn._linear_pointwise`), the float path before;
           int8 — `aten._weight_int8pack_mm`; int4 — `aten._weight_int4pack_mm_for_cpu` (both bfloat16 x);
- and one MoE layer's k = 8 experts at M = 1: `native.moe_decode` (one call) against the per-expert loop
  `quant_experts.decode_experts` on torch's kernels (2k products).

The bandwidth probe is `torch.sum` over a fresh 1 GiB buffer (best of 3), before and after each format; "% of
probe" = (weight bytes / time) / the probe's median. `NATIVE_MAX_ROWS` in `moelab.inference.formats` comes from the M
sweep (where the native column stops winning).

    python benchmarks/native_kernels.py                 # Qwen3-MoE-30B-A3B-like widths: D 2048, expert 768
    python benchmarks/native_kernels.py --rows 1,2,4,8,16,64 --formats int8
    python benchmarks/native_kernels.py --formats bf16 --f-linear --shapes 32000x2048,3072x2048 --rows 4,8,16,32
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from moelab.inference import native
from moelab.inference.formats import Int4Weight, Int8Weight
from moelab.inference.quantized_experts import ExpertWeights, decode_experts

POOL_BYTES = 192 * 2**20  # 6x this machine's 32 MiB L3


def probe() -> float:
    t = torch.ones(2**28)
    t.sum()
    best = min(_time(t.sum) for _ in range(3))
    return 2**30 / best / 1e9


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weights(fmt: str, N: int, K: int, count: int, f_linear: bool = False
            ) -> list[tuple[native.NativeWeight, object, int]]:
    """(native weight, torch-kernel callable x ↦ y, bytes) for `count` random [N, K] weights; bf16 with `f_linear`:
    F.linear on the plain weight (what `FloatWeight` runs past NATIVE_MAX_ROWS where moelab's kernels run)."""
    out = []
    for _ in range(count):
        W = torch.randn(N, K) * 0.02
        if fmt == "bf16":
            w = W.bfloat16()
            packed = None if f_linear else torch.ops.mkldnn._reorder_linear_weight(w, 1)
            out.append((native.NativeWeight("bf16", w),
                        (lambda x, w=w: torch.nn.functional.linear(x.bfloat16(), w)) if f_linear else
                        lambda x, p=packed: torch.ops.mkldnn._linear_pointwise(x.bfloat16(), p, None, "none", [], ""),
                        N * K * 2))
        elif fmt == "int8":
            q = Int8Weight.quantize(W)
            out.append((native.NativeWeight("int8", q.q, q.scale),
                        lambda x, q=q: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q.q, q.scale), q.nbytes))
        else:
            q4 = Int4Weight.quantize(W, 32)
            codes, sz = q4.codes(), q4.scales_zeros().contiguous()
            torch_pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
            tiled = native.tile_int4(codes, *sz.transpose(0, 1).unbind(-1))
            out.append((native.NativeWeight("int4", *tiled, 32),
                        lambda x, p=torch_pack, sz=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(
                            x.bfloat16(), p, 32, sz), q4.nbytes))
            del q4
    return out


def median_time(pool, call, x, reps: int) -> float:
    for w in pool[:4]:
        call(w, x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for w in pool:
            call(w, x)
        times.append((time.perf_counter() - t0) / len(pool))
    return statistics.median(times)


def linear_rows(fmt: str, shapes: list[tuple[int, int]], rows: list[int], reps: int, f_linear: bool = False) -> None:
    for N, K in shapes:
        nbytes_one = N * K * {"bf16": 2, "int8": 1, "int4": 0.5}[fmt]
        pool = weights(fmt, N, K, max(8, int(POOL_BYTES // nbytes_one)), f_linear)
        gb = [p() for p in [probe] * 3]
        med = statistics.median(gb)
        for M in rows:
            x = torch.randn(M, K)
            t_nat = median_time(pool, lambda w, x: native.linear(w[0], x), x, reps)
            t_tor = median_time(pool, lambda w, x: w[1](x), x, reps)
            nb = pool[0][2]
            print(f"| {fmt} | [{N}, {K}] | {M} | {t_nat * 1e6:.0f} | {nb / t_nat / 1e9:.1f} | "
                  f"{100 * nb / t_nat / 1e9 / med:.0f} % | {t_tor * 1e6:.0f} | {nb / t_tor / 1e9:.1f} | "
                  f"{100 * nb / t_tor / 1e9 / med:.0f} % | {t_tor / t_nat:.2f} | {med:.0f} |", flush=True)
        del pool


def moe_layer(fmt: str, D: int, I: int, k: int, reps: int) -> None:
    """One token through k random experts of a pool of E, per layer: one native call vs 2k torch products."""
    quant = {"bf16": None, "int8": "int8", "int4": "int4"}[fmt]
    per_expert = 3 * D * I * {"bf16": 2, "int8": 1, "int4": 0.5}[fmt]
    E = max(2 * k, int(POOL_BYTES // per_expert))
    native_experts, torch_experts = [], []
    for gu, dn in zip(weights(fmt, 2 * I, D, E), weights(fmt, D, I, E)):
        native_experts.append((gu[0], dn[0]))
        torch_experts.append(ExpertWeights(_Fixed(gu[1], gu[2], quant), _Fixed(dn[1], dn[2], quant), "swiglu"))
    x = torch.randn(1, D, dtype=torch.bfloat16)
    route = [1.0 / k] * k
    rng = random.Random(0)
    draws = [rng.sample(range(E), k) for _ in range(64)]
    nbytes = sum(torch_experts[0].gate_up.nbytes + torch_experts[0].down.nbytes for _ in range(k))

    def run(fn) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for d in draws:
                fn(d)
            times.append((time.perf_counter() - t0) / len(draws))
        return statistics.median(times)

    med = statistics.median(probe() for _ in range(3))
    t_nat = run(lambda d: native.moe_decode([native_experts[e][0] for e in d], [native_experts[e][1] for e in d],
                                            route, x, "swiglu"))
    t_tor = run(lambda d: decode_experts([torch_experts[e] for e in d], route, "swiglu", x))
    print(f"| {fmt} | MoE layer, k={k} of {E}, D {D}, I {I} | 1 | {t_nat * 1e6:.0f} | {nbytes / t_nat / 1e9:.1f} | "
          f"{100 * nbytes / t_nat / 1e9 / med:.0f} % | {t_tor * 1e6:.0f} | {nbytes / t_tor / 1e9:.1f} | "
          f"{100 * nbytes / t_tor / 1e9 / med:.0f} % | {t_tor / t_nat:.2f} | {med:.0f} |", flush=True)


class _Fixed:
    """A LinearWeight stand-in that runs a given torch-kernel callable (decode_experts' per-product path)."""

    def __init__(self, fn, nbytes: int, quant) -> None:
        self.fn, self.nbytes, self.quant, self.native = fn, nbytes, quant, None

    def __call__(self, x):
        return self.fn(x).to(x.dtype)

    def add(self, x, y):
        return self(x).add_(y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="bf16,int8,int4")
    p.add_argument("--rows", default="1,2,4,8,32")
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--d-expert", type=int, default=768)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default=None, help="N×K,... (None: the expert's two products)")
    p.add_argument("--f-linear", action="store_true", help="bf16's torch column: F.linear on the plain weight, as "
                   "FloatWeight runs it past NATIVE_MAX_ROWS (None: oneDNN prepacked, the backend without the kernels)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if not native.available():
        raise SystemExit(f"moelab's CPU kernels do not run here: {native.why_unavailable()}")
    D, I = a.d_model, a.d_expert
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  threads {a.threads}  pool "
          f"{POOL_BYTES >> 20} MiB per shape (cold weights)")
    print("| format | weight | M | native µs | GB/s | % of probe | torch µs | GB/s | % of probe | torch / native "
          "| probe GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for fmt in a.formats.split(","):
            shapes = ([tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes else
                      [(2 * I, D), (D, I)])
            linear_rows(fmt, shapes, [int(m) for m in a.rows.split(",")], a.reps, a.f_linear)
            if not a.shapes:
                moe_layer(fmt, D, I, 8, a.reps)


if __name__ == "__main__":
    main()
