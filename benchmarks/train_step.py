"""Training and decoding throughput of an MoE preset against its dense twin, measured side by side.

    python benchmarks/train_step.py                 # presets tiny and small
    python benchmarks/train_step.py --presets tiny --reps 5

For each preset: build the MoE model and its dense twin (same active parameters per token), then time
full optimizer steps (forward, backward, AdamW step) on identical random batches, interleaving the two
models and repeating; report the median tokens/s of each and the ratio MoE/dense (target ≥ 0.85).
Then time KV-cached greedy decoding (batch 1, one token per forward) the same way.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moelab.config.train import preset
from moelab.inference.generate import generate
from moelab.model.transformer import MoETransformer
from moelab.training.optim import make_optimizer


def train_step_seconds(model, opt, x) -> float:
    t0 = time.perf_counter()
    out = model(x, targets=x)
    (out.loss + out.aux_loss).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def decode_seconds(model, prompt, n_new) -> float:
    t0 = time.perf_counter()
    generate(model, prompt, n_new, temperature=0.0)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--reps", type=int, default=7, help="timed steps per model (interleaved)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    header = f"{'preset':<8}{'model':<7}{'total':>12}{'active':>12}{'train tok/s':>13}{'decode tok/s':>14}"
    for name in args.presets:
        model_cfg, train_cfg = preset(name)
        cfgs = {"moe": model_cfg, "dense": model_cfg.dense_twin()}
        models, opts = {}, {}
        for key, cfg in cfgs.items():
            torch.manual_seed(0)
            models[key] = MoETransformer(cfg)
            opts[key] = make_optimizer(models[key], train_cfg)
        B, S = train_cfg.batch_size, train_cfg.seq_len
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, model_cfg.vocab_size, (B, S), generator=g) for _ in range(args.reps + 1)]
        times: dict[str, list[float]] = {k: [] for k in models}
        for i, x in enumerate(batches):
            for key in models:  # interleave the candidates: the machine's speed drifts
                dt = train_step_seconds(models[key], opts[key], x)
                if i:  # the first step warms up allocators and kernels
                    times[key].append(dt)
        prompt = batches[0][0, :16].tolist()
        dec: dict[str, list[float]] = {k: [] for k in models}
        for i in range(4):
            for key in models:
                dt = decode_seconds(models[key], prompt, args.decode_tokens)
                if i:
                    dec[key].append(dt)
        print(f"\npreset {name}: batch {B} x seq {S} = {B * S} tokens per step, {args.reps} steps per model")
        print(header)
        tok_s, dec_s = {}, {}
        for key, model in models.items():
            total = sum(p.numel() for p in model.parameters())
            active = total
            for moe in model.moe_layers():
                per_expert = (moe.experts.w_in.numel() + moe.experts.w_out.numel()) // moe.cfg.n_experts
                active -= (moe.cfg.n_experts - moe.cfg.top_k) * per_expert
            tok_s[key] = B * S / statistics.median(times[key])
            dec_s[key] = args.decode_tokens / statistics.median(dec[key])
            print(f"{name:<8}{key:<7}{total:>12,}{active:>12,}{tok_s[key]:>13,.0f}{dec_s[key]:>14,.1f}")
        print(f"ratio MoE/dense: training {tok_s['moe'] / tok_s['dense']:.2f} (target >= 0.85), "
              f"decoding {dec_s['moe'] / dec_s['dense']:.2f}")


if __name__ == "__main__":
    main()
