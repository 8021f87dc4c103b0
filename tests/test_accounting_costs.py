"""moelab.accounting costs (FLOPs, memory, KV cache, accelerators, decode bounds) against hand
computations from the published architectures, and experts_touched against a simulation."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest

from moelab import ModelConfig, MoEConfig
from moelab.accounting import (
    accelerators_needed,
    bytes_per_param,
    count_params,
    decode_curve,
    decode_step,
    experts_touched,
    flops_per_token,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    to_spec,
    weight_bytes,
)

# Mixtral-8x7B by hand (d 4096, 32 layers, 32 heads / 8 KV heads of 128, experts 8 x 3·4096·14336, V 32000)
MIX_ATTN = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024)
MIX_EXPERT = 3 * 4096 * 14336
MIX_ROUTER = 32 * 8 * 4096
MIX_NORMS = 32 * 2 * 4096 + 4096
MIX_VOCAB = 32000 * 4096


def test_accounting_imports_without_torch():
    code = ("import sys, moelab.accounting, moelab.accounting.card; from moelab.accounting import count_params; "
            "count_params('deepseek-v3'); "
            "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_mixtral_counts_by_hand():
    c = count_params("mixtral-8x7b")
    assert c.total == MIX_ATTN + 32 * 8 * MIX_EXPERT + MIX_ROUTER + MIX_NORMS + 2 * MIX_VOCAB
    assert c.active == MIX_ATTN + 32 * 2 * MIX_EXPERT + MIX_ROUTER + MIX_NORMS + 2 * MIX_VOCAB
    assert c.active_no_input_embedding == c.active - MIX_VOCAB
    assert c.active_no_embeddings == c.active - 2 * MIX_VOCAB


def test_bytes_per_param_and_int4_group_scales():
    assert [bytes_per_param(p) for p in ("fp32", "bf16", "fp8")] == [4, 2, 1]
    assert bytes_per_param("int4") == 0.5 + 2 / 128  # 4 bits + one bf16 scale per group of 128
    assert bytes_per_param("int4", int4_group_size=32, int4_scale_bytes=1) == 0.5 + 1 / 32
    assert weight_bytes(46_702_792_704, "bf16") == pytest.approx(93.4e9, rel=1e-3)
    with pytest.raises(ValueError, match="precision='int3'.*fp32, bf16"):
        bytes_per_param("int3")


def test_kv_cache_gqa_mla_and_windows():
    assert kv_cache_bytes_per_token(to_spec("mixtral-8x7b")) == 32 * 2 * 8 * 128 * 2
    # DeepSeek-V3's MLA caches the 512-wide latent and the 64-wide RoPE key per layer (V2 paper §2.1.2)
    assert kv_cache_bytes_per_token(to_spec("deepseek-v3")) == 61 * (512 + 64) * 2
    assert kv_cache_bytes_per_token(to_spec("deepseek-v3"), kv_bytes=1) == 61 * 576
    # Mistral-7B: every layer has a 4096-token sliding window
    mistral = to_spec("mistral-7b")
    assert kv_cache_bytes(mistral, 8192) == kv_cache_bytes(mistral, 4096) == 4096 * 32 * 2 * 8 * 128 * 2
    # gpt-oss-120b: 18 layers with a 128-token window, 18 full-attention layers (8 KV heads of 64)
    per_layer_token = 2 * 8 * 64 * 2
    assert kv_cache_bytes(to_spec("gpt-oss-120b"), 10_000, batch=3) == 3 * per_layer_token * (18 * 128 + 18 * 10_000)


def test_flops_per_token_by_hand():
    spec = to_spec("mixtral-8x7b")
    c = count_params(spec)
    f0 = flops_per_token(spec, 0)
    assert f0.attention == 0 and f0.forward == 2 * c.active_no_input_embedding
    f = flops_per_token(spec, 4096)
    assert f.attention == 32 * 2 * 32 * (128 + 128) * 4096  # QKᵀ and AV for 32 heads of 128, 32 layers
    assert f.training == 3 * f.forward
    # MLA per-head widths: scores over 128 + 64, values 128
    assert flops_per_token(to_spec("deepseek-v3"), 1000).attention == 61 * 2 * 128 * (192 + 128) * 1000


def test_experts_touched_formula_and_limits():
    assert experts_touched(8, 2, 1) == pytest.approx(2)
    assert experts_touched(8, 2, 2) == pytest.approx(8 * (1 - 0.75 ** 2))
    assert experts_touched(8, 2, 0) == 0
    assert experts_touched(256, 8, 10_000) == pytest.approx(256)
    with pytest.raises(ValueError, match="top_k"):
        experts_touched(8, 9, 1)


@pytest.mark.parametrize("E,k,B", [(8, 2, 3), (64, 8, 5), (16, 1, 20)])
def test_experts_touched_matches_simulated_uniform_routing(E, k, B):
    rng = random.Random(0)
    trials = 4000
    mean = sum(len({e for _ in range(B) for e in rng.sample(range(E), k)}) for _ in range(trials)) / trials
    assert mean == pytest.approx(experts_touched(E, k, B), rel=0.02)


def test_decode_step_by_hand_mixtral():
    spec = to_spec("mixtral-8x7b")
    bw = 3.35e12
    step = decode_step(spec, 1, 4096, "bf16", bw)
    # one token: every non-expert weight (one embedding row, not the matrix) + 2 experts per layer
    params = MIX_ATTN + MIX_ROUTER + MIX_NORMS + MIX_VOCAB + 4096 + 32 * 2 * MIX_EXPERT
    kv = 4096 * 32 * 2 * 8 * 128 * 2
    assert step.weight_bytes == pytest.approx(2 * params)
    assert step.kv_bytes == kv
    assert step.tokens_per_s == pytest.approx(bw / (2 * params + kv))
    assert step.experts_touched == pytest.approx(2)


def test_decode_curve_saturates_at_all_experts():
    spec = to_spec("deepseek-v3")
    c = count_params(spec)
    steps = decode_curve(spec, [1, 4, 16, 64, 256, 4096], 1, "fp8", 1e13)
    reads = [s.weight_bytes for s in steps]
    assert reads == sorted(reads)
    assert [s.tokens_per_s for s in steps] == sorted(s.tokens_per_s for s in steps)
    # at B = 4096 all 256 experts of every layer are read: everything but the embedding matrix
    assert steps[-1].experts_touched == pytest.approx(256, abs=1e-6)
    expected = c.total - c.breakdown["input_embedding"] + 4096 * 7168
    assert steps[-1].weight_bytes == pytest.approx(expected, rel=1e-9)


def test_accelerators_needed():
    mix = to_spec("mixtral-8x7b")
    plan = accelerators_needed(mix, "bf16", 80e9, batch=1, context=4096)
    assert plan.accelerators == 2 and plan.kv_bytes == 4096 * 131072
    assert accelerators_needed(mix, "int4", 80e9).accelerators == 1
    # weights 93.4 GB + KV 64 x 32768 x 131 kB = 275 GB -> 4 of 80 GB
    assert accelerators_needed(mix, "bf16", 80e9, batch=64, context=32768).accelerators == math.ceil(
        (2 * count_params(mix).total + 64 * 32768 * 131072) / 80e9)
    ds = to_spec("deepseek-v3")
    assert accelerators_needed(ds, "fp8", 80e9, context=1).accelerators == 9  # 671 GB of fp8 weights
    assert accelerators_needed(ds, "fp8", 80e9, context=1, usable_fraction=0.5).accelerators == 17
    with pytest.raises(ValueError, match="usable_fraction"):
        accelerators_needed(ds, "fp8", 80e9, usable_fraction=0)


def test_moelab_config_costs_use_its_layout():
    cfg = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, attention="gqa",
                      moe=MoEConfig(d_model=64, d_expert=32, n_experts=4, top_k=1))
    spec = to_spec(cfg)
    assert kv_cache_bytes_per_token(spec) == 2 * (2 * 2 * 16) * 2
    assert flops_per_token(spec, 10).attention == 2 * 2 * 4 * 32 * 10
