"""The decode step on the inference engine against the model's torch code, side by side in one process, and what the
engine's checks cost per token.

A random bfloat16 MoE model of a Qwen3-MoE-like shape is built in memory (no checkpoint; `--d-model`, `--layers`,
`--experts`, ... scale it), then one prompt is decoded greedily by each variant in turn, repeated and interleaved:
- `training model`: the model as built for training (stacked experts, nn.Linear), no inference conversion — what
  `hf.load` + `generate` ran before `hf.load` converted by default;
- `prepared, torch`: `prepare_inference(model, quant)` with the engine removed (`model.decoder = None`): the inference
  formats, every op through torch;
- `engine, per block`: the engine with its whole-step table disabled (one kernel call per attention and MoE block);
- `engine, one call`: the engine as installed (one `native.decode_layers` call per step).
It prints tokens/s (median over repetitions), the ratio to `training model`, and the Python cost per decode step
around the one-call kernel, with the kernel replaced by a no-op: in `native.decode_layers` (its argument checks) and
in the whole engine step.

    python benchmarks/engine.py                          # bf16, d 1024, 8 layers, 32 experts top-4
    python benchmarks/engine.py --quant int4 --layers 16 --reps 5
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

from moelab import ModelConfig, MoEConfig  # noqa: E402
from moelab.inference import native  # noqa: E402
from moelab.inference.native import build  # noqa: E402
from moelab.inference.prepare import prepare_inference  # noqa: E402
from moelab.model.cache import KVCache  # noqa: E402
from moelab.model.transformer import MoETransformer  # noqa: E402


def decode_rate(model: MoETransformer, steps: int, prompt: int = 16) -> float:
    """Greedy decode tokens/s after a prompt (the prompt's prefill untimed)."""
    ids = torch.arange(prompt)[None] % model.cfg.vocab_size
    cache = KVCache()
    with torch.no_grad():
        nxt = model(ids, cache=cache).logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = model(nxt, cache=cache).logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - t0)


class _NoKernel:
    """The kernels' library with every entry a no-op: what remains of a call is its Python side."""

    def __getattr__(self, name: str):
        return lambda *args: 0


def check_cost(model: MoETransformer, calls: int = 2000) -> tuple[float, float]:
    """µs of Python per decode step around the one kernel call, the kernel itself replaced by a no-op: in
    `native.decode_layers` (its argument checks, the output buffer, the rotary tables), and in the whole engine step
    (whether the step applies, whether the arguments are current, the cache reservations, that call)."""
    engine = model.decoder
    cache = KVCache()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        model(torch.tensor([[4]]), cache=cache)  # builds the table and sets the cache buffers
    L = cache.length
    x = torch.zeros(1, 1, model.cfg.d_model, dtype=model.embed.weight.dtype)
    cos, sin = model.rope_cos[L:L + 1], model.rope_sin[L:L + 1]
    real, build.library = build.library, _NoKernel
    try:
        out = []
        for f in (lambda: native.decode_layers(engine.table, x, cos, sin, L),
                  lambda: (engine(x, cos, sin, cache, cache.length, None), cache.lengths.__setitem__(
                      slice(None), [L] * len(cache.lengths)))):
            best = float("inf")
            with torch.no_grad():
                for _ in range(5):
                    t0 = time.perf_counter()
                    for _ in range(calls // 5):
                        f()
                    best = min(best, (time.perf_counter() - t0) / (calls // 5) * 1e6)
            out.append(best)
    finally:
        build.library = real
    return out[0], out[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quant", default="bf16", choices=["bf16", "int8", "int4"])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--d-expert", type=int, default=512)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if not native.available():
        sys.exit(f"moelab's kernels do not run here: {native.why_unavailable()}")
    torch.manual_seed(0)
    D = a.d_model
    cfg = ModelConfig(vocab_size=32000, d_model=D, n_layers=a.layers, n_heads=D // 128, n_kv_heads=max(1, D // 512),
                      head_dim=128, qk_norm="head", max_seq_len=a.steps + 64,
                      moe=MoEConfig(d_model=D, d_expert=a.d_expert, n_experts=a.experts, top_k=a.top_k,
                                    norm_topk_prob=True))
    with torch.no_grad():
        trained = MoETransformer(cfg).to(torch.bfloat16).eval()
        prepared = prepare_inference(copy.deepcopy(trained), None if a.quant == "bf16" else a.quant)
    variants = {"training model": (trained, None), "prepared, torch": (prepared, "torch"),
                "engine, per block": (prepared, "blocks"), "engine, one call": (prepared, "one call")}
    rates: dict[str, list[float]] = {k: [] for k in variants}
    engine = prepared.decoder
    for _ in range(a.reps):
        for name, (model, mode) in variants.items():
            prepared.decoder = None if mode == "torch" else engine
            if mode == "blocks":
                engine.refresh()
                engine.table = None
            elif mode == "one call":
                engine.invalidate()
            rates[name].append(decode_rate(model, a.steps))
    prepared.decoder = engine
    engine.invalidate()
    checked, raw = check_cost(prepared)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {a.quant}  d {D}  layers {a.layers}  experts {a.experts} top-{a.top_k}"
          f"  threads {a.threads}  load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    base = statistics.median(rates["training model"])
    print(f"{'variant':20s} {'tok/s':>8s} {'vs training model':>18s}")
    for name, r in rates.items():
        print(f"{name:20s} {statistics.median(r):8.1f} {statistics.median(r) / base:17.2f}x")
    print(f"Python per decode step around the kernel (the kernel a no-op): native.decode_layers {checked:.1f} µs, "
          f"the whole engine step {raw:.1f} µs")


if __name__ == "__main__":
    main()
