"""The language model: shapes, causality, KV-cache parity, the dense twin, errors."""

from __future__ import annotations

import pytest
import torch

from moelab import ModelConfig, MoEConfig, MoETransformer
from moelab.model import KVCache, apply_rope, rope_tables

MOE = MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2, n_shared=1)
CONFIGS = {
    "gqa_dense_first": ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48,
                                   n_dense_layers=1, moe=MOE, qk_norm="head", max_seq_len=32),
    "every_other_full_qknorm": ModelConfig(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=1,
                                           d_ff=48, moe_every=2, moe=MOE, qk_norm="full", qkv_bias=True,
                                           tie_embeddings=False, max_seq_len=32),
    "mla_sigmoid": ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, attention="mla", q_lora_rank=16,
                               kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                               max_seq_len=32, moe=MoEConfig(d_model=32, d_expert=16, n_experts=8, top_k=2,
                                                             router="sigmoid", n_groups=2, topk_groups=1)),
}


def build(name: str) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(CONFIGS[name]).double()


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decoding_equals_full_recompute(name):
    model = build(name).eval()
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids).logits
    cache = KVCache()
    pieces = [model(ids[:, :5], cache=cache).logits]
    for t in range(5, 12):
        pieces.append(model(ids[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", CONFIGS)
def test_causal_and_loss_matches_cross_entropy(name):
    model = build(name)
    ids = torch.randint(0, 97, (2, 10))
    out = model(ids, targets=ids)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 97
    torch.testing.assert_close(model(changed).logits[:, :6], out.logits[:, :6])  # future tokens don't leak
    manual = -torch.log_softmax(out.logits, -1).gather(-1, ids[..., None]).mean()
    torch.testing.assert_close(out.loss.double(), manual)
    assert len(out.aux) == sum(model.cfg.is_moe_layer(i) for i in range(model.cfg.n_layers))
    torch.testing.assert_close(out.aux_loss, sum(a.total_loss for a in out.aux))


def test_rope_rotates_pairs_by_position_angle():
    cos, sin = rope_tables(4, 8, theta=100.0)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4).expand(1, 1, 8, 4)
    y = apply_rope(x, cos, sin)
    p = torch.arange(8, dtype=torch.float64)
    torch.testing.assert_close(y[0, 0, :, 0].double(), torch.cos(p), atol=1e-6, rtol=0)  # freq θ^0 = 1
    torch.testing.assert_close(y[0, 0, :, 2].double(), torch.sin(p), atol=1e-6, rtol=0)


def test_dense_twin_has_no_moe_and_the_active_ffn_width():
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, moe=MOE, d_ff=48)
    twin = MoETransformer(cfg.dense_twin())
    assert not twin.moe_layers()
    ffn = twin.blocks[0].ffn
    assert ffn.w_out.weight.shape == (32, 2 * 16 + 16)


def test_too_long_sequence_is_a_clear_error():
    model = build("gqa_dense_first")
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(33, dtype=torch.long))


def test_update_expert_biases_reaches_every_moe_layer():
    cfg = CONFIGS["mla_sigmoid"].replace(moe=CONFIGS["mla_sigmoid"].moe.replace(expert_bias=True))
    model = MoETransformer(cfg)
    out = model(torch.randint(0, 97, (2, 8)))
    model.update_expert_biases([a.load for a in out.aux])
    for moe, aux in zip(model.moe_layers(), out.aux):
        load = aux.load
        expected = 1e-3 * torch.sign(load.mean() - load)
        torch.testing.assert_close(moe.router.bias, expected)
