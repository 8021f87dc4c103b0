"""A/B of decode-step variants in one process: a model of real widths with few layers (random weights), the
variants interleaved round by round so that a noisy machine slows them alike. Each variant is a function that
patches moelab and returns its undo; "current" is the code as it is.

    python benchmarks/decode_variants.py [--quant bf16|int8|int4] [--layers 4] [--rounds 4] [--new 48]
        [--variants current,repeat_kv,fused_rms_norm]

Per variant: median decode-step ms over the rounds after the first (a warm-up), speed relative to the first
variant, whether it emits the same greedy tokens and the relative difference of its last logits.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F

import moelab.model as mm
from moelab import ModelConfig, MoEConfig, MoETransformer
from moelab.inference import prepare_inference
from moelab.model import KVCache


def current(model):
    return lambda: None


def repeat_kv(model):
    """The attention before enable_gqa: k and v repeated per query head, and a mask, every step."""
    def attend(q, k, v, start, scale=None):
        S, L = q.shape[2], k.shape[2]
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, scale=scale)
        mask = torch.arange(L)[None, :] <= (start + torch.arange(S))[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    saved, mm._attend = mm._attend, attend

    def undo():
        mm._attend = saved
    return undo


def fused_rms_norm(model):
    """RMSNorm through F.rms_norm (one op) instead of its five."""
    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
    saved, mm.RMSNorm.forward = mm.RMSNorm.forward, forward

    def undo():
        mm.RMSNorm.forward = saved
    return undo


VARIANTS = {f.__name__: f for f in (current, repeat_kv, fused_rms_norm)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quant", default="bf16", choices=["bf16", "int8", "int4"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--new", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="current,repeat_kv,fused_rms_norm")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    names = a.variants.split(",")
    cfg = ModelConfig(vocab_size=1024, d_model=2048, n_layers=a.layers, n_heads=16, n_kv_heads=4, head_dim=128,
                      qk_norm="head", tie_embeddings=False, max_seq_len=4096,
                      moe=MoEConfig(d_model=2048, d_expert=768, n_experts=64, top_k=8, norm_topk_prob=True))
    torch.manual_seed(0)
    with torch.no_grad():
        model = prepare_inference(MoETransformer(cfg).to(torch.bfloat16), None if a.quant == "bf16" else a.quant)

    def run():
        cache, times, tokens = KVCache(), [], []
        with torch.no_grad():
            logits = model(torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0)),
                           cache=cache).logits[:, -1]
            for _ in range(a.new):
                t0 = time.perf_counter()
                logits = model(logits.argmax(-1, keepdim=True), cache=cache).logits[:, -1]
                times.append(time.perf_counter() - t0)
                tokens.append(int(logits.argmax()))
        return statistics.median(times), tokens, logits.float()

    times: dict[str, list[float]] = {n: [] for n in names}
    first: dict[str, tuple] = {}
    for rnd in range(a.rounds):
        for n in random.sample(names, len(names)):
            undo = VARIANTS[n](model)
            dt, tokens, logits = run()
            undo()
            if rnd:
                times[n].append(dt)
            first.setdefault(n, (tokens, logits))
    base_ms = statistics.median(times[names[0]])
    for n in names:
        ms = statistics.median(times[n])
        err = ((first[n][1] - first[names[0]][1]).norm() / first[names[0]][1].norm()).item()
        print(json.dumps({"quant": a.quant, "variant": n, "ms": round(1e3 * ms, 2),
                          "speed_vs_first": round(base_ms / ms, 3), "same_tokens": first[n][0] == first[names[0]][0],
                          "rel_logits": round(err, 5), "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}),
              flush=True)


if __name__ == "__main__":
    main()
