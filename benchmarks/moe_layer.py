"""Time the moelab MoE layer against its dense twin and against transformers' sparse MoE blocks.

The dense twin is a SwiGLU FFN with the MoE layer's *active* size: hidden width k·f (plus the shared
experts' width where the layer has them), `moelab.layer.experts.FeedForward` on torch's ordinary path.
Ratio = time / dense twin's time, so 1.0 means the layer costs exactly its active parameters.

Every candidate runs in one process on the same input, interleaved (one run of each, in a shuffled order), repeated;
the table shows medians. Only ratios measured side by side mean anything on a shared, noisy machine.

Candidates per cell (dtype, E, k, T, mode):
- dense: the dense twin, torch's ordinary path (`nn.Linear` → `torch.mm`).
- dense-oneDNN (float32 only): the same twin with its matmuls on oneDNN, the kernel moelab's experts
  use in float32 — the apples-to-apples ratio. In bfloat16 `torch.mm` already runs oneDNN, so the
  ordinary twin is that comparison.
- moelab: `moelab.MoE` (router "topk_softmax", backend "auto"), aux losses included in fwd+bwd.
- transformers (when installed): MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock and DeepseekV3MoE built
  from their modeling modules with a config of the same sizes, holding the moelab layer's weights (so
  both route every token to the same experts; the notes give how far their outputs are from moelab's,
  ~1e-6 relative in float32 — a whole-layer check against transformers). Each experts implementation
  ("grouped_mm", "eager", "batched_mm") is screened with one timed run; the best joins the
  interleaved timing and the table names it. DeepSeek-V3 always has a shared expert (here one, width f):
  it is compared, with moelab configured the same way (sigmoid router, selection bias, one shared
  expert, route scale 2.5), against a dense twin of width k·f + f.

Decode sizes (T = 1, 8) time forward only, each call from a cold cache (a 128 MiB buffer is
read before it, untimed): in a model's decode step every layer's weights come from memory, since
the model exceeds the cache, whereas a single layer called in a loop would keep a dense twin of 12 MiB
in this machine's 32 MiB L3 and time compute instead of weight reads. At T = 8 a batch touches more
distinct experts than k, so the layer must read more weight bytes than its twin; the decode table
reports the experts touched, the bytes ratio, and the time ratio per byte read.

    python benchmarks/moe_layer.py                 # full run (float32 and bfloat16; ~15-20 min)
    python benchmarks/moe_layer.py --quick         # a few minutes
    python benchmarks/moe_layer.py --sizes 64x8 --tokens 4096 --dtypes bfloat16 --modes fwd+bwd
    python benchmarks/moe_layer.py --contended --tokens 4096 --dtypes float32 --modes fwd+bwd --no-hf

`--contended` starts one busy background process per core (a pure-Python spin loop) before the first
cell and stops them at the end: the layer's speed when it shares the CPU with data loaders and other
jobs, which stalls a layer made of many small parallel regions far more than a dense one.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from moelab import MoEConfig
from moelab.layer.expert_ops import activate, fast_linear, onednn_matmul_available
from moelab.layer.experts import FeedForward
from moelab.layer.moe import MoE

D_MODEL, D_EXPERT = 1024, 512
TARGETS = {("fwd+bwd", 8): 1.15, ("fwd+bwd", 64): 1.15, ("fwd+bwd", 256): 1.35}  # (mode, E) at T = 4096
DECODE_TARGET_T1 = 1.2
CONTENDED_TARGET = 1.5  # fwd+bwd float32 at T = 4096, every E, with one busy process per core (--contended)
DECODE_MAX_T = 64  # token counts up to this are decode sizes: forward only, the bytes table
EVICT_BYTES = 4 * 32 * 2**20  # read before each decode-size call: 4x this machine's 32 MiB L3
HF_IMPLS = ("grouped_mm", "eager", "batched_mm")


# ----------------------------------------------------------------------------------------------------
# Candidates
# ----------------------------------------------------------------------------------------------------

class DenseTwinSameKernel(nn.Module):
    """The dense twin's weights, computed with the experts' float32 matmul kernel (oneDNN), forward and
    backward (`moelab.layer.expert_ops.fast_linear`)."""

    def __init__(self, twin: FeedForward) -> None:
        super().__init__()
        self.twin = twin

    def forward(self, x):
        h = fast_linear(x.reshape(-1, x.shape[-1]), self.twin.w_in.weight)
        return fast_linear(activate(h, self.twin.activation), self.twin.w_out.weight).view(x.shape)


def hf_block(model: str, E: int, k: int, impl: str, twin: MoE):
    """A transformers sparse MoE block of our sizes holding the weights of the moelab layer `twin`
    (`copy_weights`), experts implementation `impl`."""
    if model == "Mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        cfg = MixtralConfig(hidden_size=D_MODEL, intermediate_size=D_EXPERT, num_local_experts=E,
                            num_experts_per_tok=k, router_jitter_noise=0.0)
    elif model == "Qwen3-MoE":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
        cfg = Qwen3MoeConfig(hidden_size=D_MODEL, moe_intermediate_size=D_EXPERT, num_experts=E,
                             num_experts_per_tok=k, norm_topk_prob=True)
    else:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block
        cfg = DeepseekV3Config(hidden_size=D_MODEL, moe_intermediate_size=D_EXPERT, n_routed_experts=E,
                               num_experts_per_tok=k, n_shared_experts=1, n_group=1, topk_group=1,
                               routed_scaling_factor=2.5, norm_topk_prob=True)
    cfg._experts_implementation = impl
    block = Block(cfg)
    copy_weights(twin, block)
    return block


@torch.no_grad()
def copy_weights(layer: MoE, block: nn.Module) -> None:
    """Give a transformers block the moelab layer's weights, so both route every token to the same
    experts: at decode sizes the time depends on how many distinct experts a batch touches, and two
    independently drawn routers touch different numbers (measured at T = 8: 42 vs 40 of 64 experts)."""
    block.gate.weight.copy_(layer.router.weight)
    block.experts.gate_up_proj.copy_(layer.experts.w_in.transpose(1, 2))  # [E, 2f, D]: gate rows, then up
    block.experts.down_proj.copy_(layer.experts.w_out.transpose(1, 2))  # [E, D, f]
    if hasattr(block.gate, "e_score_correction_bias"):
        block.gate.e_score_correction_bias.copy_(layer.router.bias)
    if layer.shared is not None:
        gate, up = layer.shared.w_in.weight.chunk(2, dim=0)
        block.shared_experts.gate_proj.weight.copy_(gate)
        block.shared_experts.up_proj.weight.copy_(up)
        block.shared_experts.down_proj.weight.copy_(layer.shared.w_out.weight)


def moelab_layer(E: int, k: int, deepseek: bool) -> MoE:
    if deepseek:
        cfg = MoEConfig(d_model=D_MODEL, d_expert=D_EXPERT, n_experts=E, top_k=k, router="sigmoid",
                        expert_bias=True, n_shared=1, route_scale=2.5, aux_loss_coef=0.0,
                        seq_aux_loss_coef=1e-4, z_loss_coef=0.0)
    else:
        cfg = MoEConfig(d_model=D_MODEL, d_expert=D_EXPERT, n_experts=E, top_k=k)
    return MoE(cfg)


def hf_skip_reason(model: str, impl: str, E: int, k: int, T: int, mode: str, dtype: torch.dtype) -> str | None:
    """Configurations that would exhaust memory, with the estimate that rules them out."""
    expert_bytes = 3 * D_MODEL * D_EXPERT * torch.empty((), dtype=dtype).element_size()
    if impl == "batched_mm":
        need = T * k * expert_bytes * (2 if mode == "fwd+bwd" else 1)  # a weight copy per assignment
        if need > 0.25 * available_memory():
            return f"batched_mm gathers a weight copy per assignment: ~{need / 2**30:.0f} GiB"
    if impl == "eager" and mode == "fwd+bwd" and E >= 256:
        return "eager loop backward: indexing w[e] per expert zero-fills full-size gradients (~384 GiB)"
    return None


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------

@contextmanager
def busy_cores(n: int):
    """n background processes that each keep one core busy (a Python spin loop), stopped on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def make_runner(module: nn.Module, x: torch.Tensor, g: torch.Tensor, backward: bool, inner: int = 1,
                evict: torch.Tensor | None = None):
    """A closure running `inner` forwards (no grad) or forward+backwards; returns the mean seconds one
    took. With `evict`, that buffer is read before each call, outside the timed region, so the
    call reads its weights from memory (a decode step of a model whose layers exceed the cache)."""
    params = [p for p in module.parameters() if p.requires_grad]

    def run() -> float:
        for p in params:
            p.grad = None
        x.grad = None
        elapsed = 0.0
        for _ in range(inner):
            if evict is not None:
                evict.sum()  # read, not written: no dirty lines to write back inside the timed call
            t0 = time.perf_counter()
            if backward:
                out = module(x)
                y, aux = out if isinstance(out, tuple) else (out, None)
                if aux is not None and aux.losses:
                    torch.autograd.backward([y, aux.total_loss], [g, None])
                else:
                    y.backward(g)
            else:
                with torch.no_grad():
                    module(x)
            elapsed += time.perf_counter() - t0
        return elapsed / inner

    return run


def interleaved_medians(runners: dict, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per candidate; each repetition runs every candidate once, in a fresh random order
    (seeded), so that no candidate always follows the same one: in a fixed order, what one candidate
    freed or left in the caches lands on the same neighbour every time."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    order = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(reps):
        names = list(runners)
        order.shuffle(names)
        for name in names:
            times[name].append(runners[name]())
    return {name: statistics.median(ts) for name, ts in times.items()}


# ----------------------------------------------------------------------------------------------------
# One cell of the table
# ----------------------------------------------------------------------------------------------------

@dataclass
class Cell:
    dtype: str
    E: int
    k: int
    T: int
    mode: str
    ms: dict[str, float] = field(default_factory=dict)
    hf_impl: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    touched: int = 0

    def ratio(self, name: str, base: str = "dense") -> float | None:
        if name in self.ms and base in self.ms:
            return self.ms[name] / self.ms[base]
        return None


def run_cell(dtype: torch.dtype, E: int, k: int, T: int, mode: str, args, hf_ok: bool) -> Cell:
    cell = Cell(str(dtype).replace("torch.", ""), E, k, T, mode)
    backward = mode == "fwd+bwd"
    torch.manual_seed(0)
    x = torch.randn(1, T, D_MODEL, dtype=dtype, requires_grad=backward)
    g = torch.randn(1, T, D_MODEL, dtype=dtype)
    decode = T <= DECODE_MAX_T
    inner = max(1, min(10, 4096 // (T * 64))) if decode else 1  # decode: average a few calls,
    evict = torch.zeros(EVICT_BYTES // 4) if decode else None  # each from a cold cache

    def mod(m: nn.Module) -> nn.Module:
        return m.to(dtype).train(backward)

    dense = mod(FeedForward(D_MODEL, k * D_EXPERT))
    modules: dict[str, nn.Module] = {"dense": dense}
    if dtype == torch.float32 and onednn_matmul_available(dtype):
        modules["dense-oneDNN"] = DenseTwinSameKernel(dense)
    modules["moelab"] = mod(moelab_layer(E, k, deepseek=False))
    if args.deepseek:
        modules["dense+shared"] = mod(FeedForward(D_MODEL, (k + 1) * D_EXPERT))
        modules["moelab-DS"] = mod(moelab_layer(E, k, deepseek=True))

    with torch.no_grad():  # distinct experts this batch touches (routing is what the layer computed)
        cell.touched = int((modules["moelab"](x, stats=True)[1].load > 0).sum())

    if hf_ok:
        for model in args.hf_models:
            twin = modules["moelab-DS" if model == "DeepSeek-V3" else "moelab"]
            best = screen_hf(model, twin, args.hf_impls, dtype, E, k, T, mode, x, g, inner, evict, cell)
            if best is not None:
                modules[model] = best

    runners = {name: make_runner(m, x, g, backward, inner, evict) for name, m in modules.items()}
    reps = args.reps if args.reps else (3 if (backward and T >= 2048) else 5 if T >= 2048 else 15)
    cell.ms = {name: 1e3 * s for name, s in interleaved_medians(runners, reps).items()}
    del modules, runners
    gc.collect()
    return cell


def screen_hf(model: str, twin: MoE, impls: list[str], dtype, E, k, T, mode, x, g, inner, evict, cell: Cell):
    """Time each experts implementation once (after a warm-up run); keep the fastest block, and note how
    far its output is from the moelab layer `twin` whose weights it holds."""
    backward = mode == "fwd+bwd"
    best, best_t, tried = None, math.inf, []
    for impl in impls:
        reason = hf_skip_reason(model, impl, E, k, T, mode, dtype)
        if reason:
            cell.notes.append(f"{model} {impl}: skipped ({reason})")
            continue
        try:
            block = hf_block(model, E, k, impl, twin).to(dtype).train(backward)
            run = make_runner(block, x, g, backward, inner, evict)
            t_warm = run()
            t = t_warm if t_warm > 3 * best_t else min(t_warm, run())  # clearly slower: one run settles it
        except (RuntimeError, NotImplementedError, KeyError, TypeError, ValueError) as err:
            cell.notes.append(f"{model} {impl}: failed ({type(err).__name__}: {str(err).splitlines()[0][:80]})")
            continue
        tried.append(f"{impl} {1e3 * t:.0f} ms")
        if t < best_t:
            best, best_t, cell.hf_impl[model] = block, t, impl
        else:
            del block
        gc.collect()
    if tried:
        cell.notes.append(f"{model} screening: " + ", ".join(tried))
    if best is not None:
        with torch.no_grad():
            ref, out = twin(x)[0].float(), best(x).float()
        cell.notes.append(f"{model}: output vs moelab's, max |diff| / max |y| = "
                          f"{float((out - ref).abs().max() / ref.abs().max()):.1e} (same weights)")
    return best


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------

def fmt(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}"


def target_for(c: Cell, contended: bool) -> float | None:
    if contended:
        return CONTENDED_TARGET if (c.mode, c.dtype) == ("fwd+bwd", "float32") and c.T >= 2048 else None
    return TARGETS.get((c.mode, c.E)) if c.T >= 2048 else (DECODE_TARGET_T1 if c.T == 1 else None)


def report(cells: list[Cell], hf_models: list[str], contended: bool = False) -> str:
    lines = []
    head = ["dtype", "E, k", "T", "mode", "dense ms", "moelab/dense", "target", "moelab/dense-oneDNN"]
    head += [f"{m}/dense" for m in hf_models if m != "DeepSeek-V3"]
    if any("moelab-DS" in c.ms for c in cells):
        head += ["moelab-DS/dense+sh"] + (["DeepSeek-V3/dense+sh"] if "DeepSeek-V3" in hf_models else [])
    head += ["moelab fastest?"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for c in cells:
        target = target_for(c, contended)
        r = c.ratio("moelab")
        tgt = "—" if target is None else f"≤ {target:.2f} " + ("✓" if r is not None and r <= target else "✗")
        row = [c.dtype, f"{c.E}, {c.k}", str(c.T), c.mode, f"{c.ms['dense']:.1f}", fmt(r), tgt,
               fmt(c.ratio("moelab", "dense-oneDNN"))]
        wins: list[bool] = []  # moelab faster than each transformers block measured in this cell
        for m in hf_models:
            if m == "DeepSeek-V3":
                continue
            hr = c.ratio(m)
            row.append("—" if hr is None else f"{hr:.2f} ({c.hf_impl[m]})")
            if hr is not None:
                wins.append(r is not None and r < hr)
        if "moelab-DS" in c.ms:
            rds = c.ratio("moelab-DS", "dense+shared")
            row.append(fmt(rds))
            if "DeepSeek-V3" in hf_models:
                hr = c.ratio("DeepSeek-V3", "dense+shared")
                row.append("—" if hr is None else f"{hr:.2f} ({c.hf_impl['DeepSeek-V3']})")
                if hr is not None:
                    wins.append(rds is not None and rds < hr)
        row.append("—" if not wins else "yes" if all(wins) else "NO")
        lines.append("| " + " | ".join(row) + " |")

    decode = [c for c in cells if c.T <= DECODE_MAX_T]
    if decode:
        lines += ["", "Decode (forward): a batch that touches more experts must read more weight bytes.", "",
                  "| dtype | E, k | T | experts touched | weight bytes moelab/dense | time moelab/dense "
                  "| (time ratio)/(bytes ratio) |", "|---|---|---|---|---|---|---|"]
        for c in decode:
            bytes_ratio = c.touched / c.k  # expert weights read vs the twin's k·f-wide weights
            r = c.ratio("moelab")
            per_byte = None if r is None else r / bytes_ratio
            lines.append(f"| {c.dtype} | {c.E}, {c.k} | {c.T} | {c.touched} | {bytes_ratio:.2f} | {fmt(r)} "
                         f"| {fmt(per_byte)} |")
    notes = sorted({f"{c.dtype} E={c.E} T={c.T} {c.mode}: {n}" for c in cells for n in c.notes})
    if notes:
        lines += ["", "Notes (transformers experts implementations: screening times and skips):"]
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="E,k in {8x2, 64x8}, T in {1024, 8, 1}, float32, 3 reps")
    p.add_argument("--sizes", default="8x2,64x8,256x8", help="comma-separated ExK (default: 8x2,64x8,256x8)")
    p.add_argument("--tokens", default="4096,8,1", help="comma-separated T (default: 4096,8,1)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd (decode sizes run fwd only)")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions per candidate (0: by size)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--contended", action="store_true",
                   help="one busy background process per core while timing (targets: CONTENDED_TARGET)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers blocks")
    p.add_argument("--hf-models", default="Mixtral,Qwen3-MoE,DeepSeek-V3")
    p.add_argument("--hf-impls", default=",".join(HF_IMPLS))
    p.add_argument("--no-deepseek", dest="deepseek", action="store_false",
                   help="skip the shared-expert (DeepSeek-V3-style) comparison")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.tokens, args.dtypes = "8x2,64x8", "1024,8,1", "float32"
        args.reps = args.reps or 3
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.hf_impls = args.hf_impls.split(",")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    modes = args.modes.split(",")
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    hf_ok = hf_version is not None and not args.no_hf
    args.hf_models = args.hf_models.split(",") if hf_ok else []
    if not args.deepseek:
        args.hf_models = [m for m in args.hf_models if m != "DeepSeek-V3"]

    print(f"# moelab MoE layer benchmark: d={D_MODEL}, f={D_EXPERT}; torch {torch.__version__}, "
          f"transformers {hf_version or 'not installed'}; {torch.get_num_threads()} threads; "
          f"{platform.processor() or platform.machine()}; python {platform.python_version()}")
    print("# command: python " + " ".join([os.path.relpath(sys.argv[0])] + (argv or sys.argv[1:])))
    print("# load average at start: {:.2f} {:.2f} {:.2f} (a busy machine stalls the many small parallel "
          "ops of a sparse layer more than a dense one's few large ones)".format(*os.getloadavg()))
    cells = []
    t_start = time.perf_counter()
    busy = os.cpu_count() or 1
    if args.contended:
        print(f"# contended: {busy} busy background processes (one per core) while timing")
    try:
        with busy_cores(busy if args.contended else 0):
            run_all(cells, dtypes, sizes, tokens, modes, args, hf_ok)
    except KeyboardInterrupt:  # Ctrl-C: report the cells measured so far
        print("\n# interrupted: partial results")
    print()
    print(report(cells, args.hf_models, args.contended))
    print(f"\nTotal time {time.perf_counter() - t_start:.0f} s; load average at the end: "
          "{:.2f} {:.2f} {:.2f}.".format(*os.getloadavg()))


def run_all(cells: list[Cell], dtypes, sizes, tokens, modes, args, hf_ok: bool) -> None:
    """Every cell of the table, in order, appended to `cells` as it is measured."""
    for dtype in dtypes:
        for E, k in sizes:
            for T in tokens:
                for mode in (modes if T > DECODE_MAX_T else ["fwd"]):
                    t0 = time.perf_counter()
                    cell = run_cell(dtype, E, k, T, mode, args, hf_ok)
                    cells.append(cell)
                    parts = ", ".join(f"{n} {v:.1f}" for n, v in cell.ms.items())
                    print(f"{cell.dtype} E={E} k={k} T={T} {mode}: {parts} ms "
                          f"[{time.perf_counter() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
