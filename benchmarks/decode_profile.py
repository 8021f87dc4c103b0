"""Where a decode step's time goes: inside moelab's kernel calls, or in the Python and torch ops around them.

Loads a Hugging Face checkpoint (`moelab.hf.load`, optionally quantized as it reads), decodes greedily and
times every call into moelab's kernels (`moelab.inference.native`'s C entry points) within the step; the rest of the
step is Python and torch. The memory-read probe runs in the same process before the timed steps.

    python benchmarks/decode_profile.py CKPT_DIR [--quant bf16|int8|int4] [--steps 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

from moelab.hf import load  # noqa: E402
from moelab.inference import native  # noqa: E402
from moelab.inference.native import build  # noqa: E402
from moelab.model.cache import KVCache  # noqa: E402

ENTRY_POINTS = ("moelab_decode_layers", "moelab_attention_block", "moelab_moe_block", "moelab_moe_decode",
                "moelab_linear", "moelab_route", "moelab_rms_norm", "moelab_rope", "moelab_decode_attention")


class TimedLibrary:
    """The kernels' library with each entry point timed (seconds summed per name)."""

    def __init__(self, lib) -> None:
        self.lib, self.seconds = lib, collections.defaultdict(float)

    def __getattr__(self, name: str):
        f = getattr(self.lib, name)
        if name not in ENTRY_POINTS:
            return f

        def timed(*args):
            t0 = time.perf_counter()
            out = f(*args)
            self.seconds[name] += time.perf_counter() - t0
            return out
        return timed


def probe() -> float:
    t = torch.ones(2**28)
    t.sum()
    t0 = time.perf_counter()
    t.sum()
    return 2**30 / (time.perf_counter() - t0) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--quant", default="int8", choices=["bf16", "int8", "int4"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with torch.no_grad():
        model = load(a.ckpt, quant=None if a.quant == "bf16" else a.quant)  # converted for inference as it reads
    if not native.available():
        sys.exit(f"moelab's kernels do not run here: {native.why_unavailable()}")
    timed = TimedLibrary(build.library())
    build.library = lambda: timed
    cache, ids = KVCache(), torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids = model(ids, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(5):
            ids = model(ids, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        bw = sorted(probe() for _ in range(3))
        timed.seconds.clear()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            ids = model(ids, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        step = (time.perf_counter() - t0) / a.steps
    kernels = sum(timed.seconds.values()) / a.steps
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {a.quant}  threads {a.threads}  probe {bw[0]:.0f}/{bw[1]:.0f}/"
          f"{bw[2]:.0f} GB/s  load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"decode step {step * 1e3:.2f} ms ({1 / step:.1f} tok/s): kernel calls {kernels * 1e3:.2f} ms, "
          f"Python and torch around them {(step - kernels) * 1e3:.2f} ms")
    for name, s in sorted(timed.seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {name:24s} {s / a.steps * 1e3:7.3f} ms per step")


if __name__ == "__main__":
    main()
