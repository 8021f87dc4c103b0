"""Many prompts at once: decode tokens/s against the batch size B, and the experts each MoE layer reads per
decode step against the uniform prediction E·(1 − (1 − k/E)^B) — the batch economics of an MoE, measured.

For each B, B prompts of random tokens (lengths drawn from 8..24, so the batch is left-padded) are continued
(sampled at temperature 1, seeded: a random-weight model's greedy continuation soon repeats one token) by
`moelab.generate.generate_batch` on a Hugging Face checkpoint loaded by `moelab.hf.load` and converted for
inference (`moelab.inference.prepare_inference`, the `--quant` format). Per B it prints:
- decode tokens/s (B tokens per step; the prefill is not timed: the clock runs from the end of the first
  decode step to the end of the last, read off the routing record `generate_batch` fills);
- distinct experts per MoE layer per decode step: measured (mean over layers and steps), the uniform
  prediction (`moelab.accounting.experts_touched`), and the same count for B tokens drawn from B different
  prompts at random steps (`moelab.analysis.routing_stats.batch_economics` over the record: the choices without the
  correlation of one step's tokens);
- weight bytes one step reads (non-expert weights once + the touched experts) and their rate (GB/s): how
  close a step stays to the memory-bandwidth bound as B grows;
- peak RSS of the process and the load average.

    python benchmarks/batch_decode.py CKPT                             # bf16, B = 1, 2, 4, 8, 16
    python benchmarks/batch_decode.py CKPT --quant int4 --batches 1,4,16,32 --steps 12
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import torch

from moelab import hf
from moelab.accounting import experts_touched
from moelab.analysis.routing_stats import batch_economics
from moelab.inference.generate import generate_batch
from moelab.inference.prepare import decode_bytes, prepare_inference


class TimedRecord(list):
    """A routing record (`generate_batch(record=)`) that also notes when each decode step ended."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, step) -> None:
        self.times.append(time.perf_counter())
        super().append(step)


def loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def expert_bytes(model) -> float:
    """Bytes of one routed expert (mean over the converted stores)."""
    stores = [moe.experts for moe in model.moe_layers()]
    return sum(s.nbytes for s in stores) / sum(s.n_experts for s in stores)


def run(model, B: int, steps: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    V = model.cfg.vocab_size
    prompts = [rng.integers(0, V, size=int(rng.integers(8, 25))).tolist() for _ in range(B)]
    record = TimedRecord()
    # steps + 1 decode forwards; the end of the first starts the clock
    generate_batch(model, prompts, steps + 2, temperature=1.0, seed=seed, record=record)
    seconds = record.times[-1] - record.times[0]
    timed = len(record.times) - 1
    topk = np.stack([np.stack(step) for step in record])  # [steps, layers, B, k]
    n_steps, n_layers, _, k = topk.shape
    E = model.moe_layers()[0].cfg.n_experts
    touched = np.mean([len(np.unique(topk[s, layer])) for s in range(n_steps) for layer in range(n_layers)])
    drawn = []
    for layer in range(n_layers):  # B tokens of B different prompts, at random steps
        rows = topk[:, layer].transpose(1, 0, 2).reshape(-1, k)  # [B·steps, k], prompt-major
        sequences = np.repeat(np.arange(B), n_steps)
        drawn += [r["experts_touched"] for r in batch_economics(rows, sequences, E, [B], trials=32, seed=seed)]
    return {"B": B, "tok_s": B * timed / seconds, "step_ms": 1e3 * seconds / timed, "touched": float(touched),
            "drawn": float(np.mean(drawn)), "predicted": experts_touched(E, k, B), "n_layers": n_layers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="Hugging Face checkpoint directory (config.json + safetensors)")
    p.add_argument("--quant", choices=["bf16", "int8", "int4"], default="bf16")
    p.add_argument("--batches", default="1,2,4,8,16", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    quant = None if a.quant == "bf16" else a.quant
    t0 = time.perf_counter()
    model = prepare_inference(hf.load(a.ckpt, "bfloat16", quant=quant), quant)
    load_s = time.perf_counter() - t0
    one = expert_bytes(model)
    n_moe, k = len(model.moe_layers()), model.moe_layers()[0].cfg.top_k
    non_expert = decode_bytes(model, 0) - n_moe * k * one
    print(f"# {a.ckpt}: {a.quant}, loaded in {load_s:.0f} s; non-expert weights read per step "
          f"{non_expert / 1e9:.3f} GB, one expert {one / 1e6:.2f} MB, {n_moe} MoE layers, top-{k}; "
          f"load average {loadavg()}")
    generate_batch(model, [[1, 2, 3, 4]], 3)  # warm-up: kernels' first use
    print("| B | decode tok/s | ms/step | experts/layer/step measured | B prompts at random steps | uniform "
          "E(1-(1-k/E)^B) | weights read/step GB | GB/s | peak RSS GiB | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for B in map(int, a.batches.split(",")):
        r = run(model, B, a.steps, a.seed)
        read = non_expert + n_moe * r["touched"] * one
        print(f"| {B} | {r['tok_s']:.2f} | {r['step_ms']:.0f} | {r['touched']:.2f} | {r['drawn']:.2f} | "
              f"{r['predicted']:.2f} | {read / 1e9:.3f} | {read / r['step_ms'] * 1e3 / 1e9:.1f} | "
              f"{peak_rss_gib():.2f} | {loadavg()} |", flush=True)


if __name__ == "__main__":
    main()
