"""A/B of decode-step variants in one process: a model of real widths with few layers (random weights), the
variants interleaved round by round so that a noisy machine slows them alike. Each variant is a function that
patches moelab and returns its undo; "current" is the code as it is.

    python benchmarks/decode_variants.py [--quant bf16|int8|int4] [--layers 4] [--rounds 4] [--new 48]
        [--variants current,per_block,modules,torch_router]

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

from moelab import ModelConfig, MoEConfig
from moelab.inference.prepare import prepare_inference
from moelab.layer.moe import MoE
from moelab.layer.routing import Router
from moelab.model.attention import Attention
from moelab.model.cache import KVCache
from moelab.model.transformer import MoETransformer


def current(model):
    return lambda: None


def _patch(*targets):
    """Replace each (owner, name) by a function returning None (the "does not apply" answer); the undo."""
    saved = [(owner, name, owner.__dict__[name]) for owner, name in targets]
    for owner, name, _ in saved:
        setattr(owner, name, lambda *a, **k: None)

    def undo():
        for owner, name, f in saved:
            setattr(owner, name, f)
    return undo


def per_block(model):
    """No whole-step call (`decode_plan`): each block's attention and MoE halves in one kernel call each."""
    return _patch((MoETransformer, "_native_layers"))


def modules(model):
    """No fused calls: the modules one by one (routing still on the kernel, as the modules route one token)."""
    return _patch((MoETransformer, "_native_layers"), (Attention, "decode_step"), (MoE, "decode_step"))


def torch_router(model):
    """The modules, with one token's routing on torch's ops instead of the kernel."""
    return _patch((MoETransformer, "_native_layers"), (Attention, "decode_step"), (MoE, "decode_step"),
                  (Router, "native_routing"))


VARIANTS = {f.__name__: f for f in (current, per_block, modules, torch_router)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quant", default="bf16", choices=["bf16", "int8", "int4"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--new", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
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
