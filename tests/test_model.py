"""The language model: shapes, causality, KV-cache parity, the dense twin, YaRN in the model, errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moelab import ModelConfig, MoEConfig
from moelab.config.rope import RopeScaling
from moelab.model.cache import KVCache
from moelab.model.rope import rope_tables, yarn_attention_factor, yarn_mscale
from moelab.model.transformer import MoETransformer

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
    "mla_yarn": ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, attention="mla", q_lora_rank=None,
                            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=32,
                            rope_scaling=RopeScaling(factor=4.0, original_max_seq_len=8, mscale=1.0,
                                                     mscale_all_dim=0.7),
                            moe=MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2)),
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


def test_cache_grows_past_its_first_buffer():
    """The cache's buffers start at 64 positions and double: decoding across that edge changes nothing."""
    torch.manual_seed(0)
    model = MoETransformer(dataclasses.replace(CONFIGS["gqa_dense_first"], max_seq_len=128)).double().eval()
    ids = torch.randint(0, 97, (1, 70))
    cache = KVCache()
    pieces = [model(ids[:, :60], cache=cache).logits]
    pieces += [model(ids[:, t:t + 1], cache=cache).logits for t in range(60, 70)]
    assert cache.length == 70 and cache.k[0].shape[2] == 128
    torch.testing.assert_close(torch.cat(pieces, 1), model(ids).logits, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", CONFIGS)
def test_causal_and_loss_matches_cross_entropy(name):
    model = build(name)
    ids = torch.randint(0, 97, (2, 10))
    out = model(ids, targets=ids)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 97
    torch.testing.assert_close(model(changed).logits[:, :6], out.logits[:, :6])  # future tokens don't leak
    manual = -torch.log_softmax(out.logits, -1).gather(-1, ids[..., None]).mean()
    assert out.loss.dtype == torch.float64  # a float64 model's loss is not rounded to float32
    torch.testing.assert_close(out.loss, manual)
    assert len(out.aux) == sum(model.cfg.is_moe_layer(i) for i in range(model.cfg.n_layers))
    torch.testing.assert_close(out.aux_loss, sum(a.total_loss for a in out.aux))
    with torch.no_grad():  # inference computes the layers' statistics only when asked; then they are equal
        quiet, asked = model(ids, targets=ids), model(ids, targets=ids, stats=True)
    assert all(a.load is None for a in quiet.aux) and quiet.aux_loss == 0
    torch.testing.assert_close(asked.aux_loss, out.aux_loss.detach())
    for a, b in zip(asked.aux, out.aux, strict=True):
        torch.testing.assert_close(a.load, b.load)


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


def test_bad_token_ids_are_a_clear_error():
    model = build("gqa_dense_first")
    with pytest.raises(ValueError, match=r"ids in \[0, 97\]: allowed 0 <= id < vocab_size=97"):
        model(torch.tensor([[0, 5, 97]]))
    with pytest.raises(ValueError, match=r"ids in \[-1, 5\]: allowed 0 <= id < vocab_size=97"):
        model(torch.tensor([[-1, 5]]))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 3))


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_zero_tokens_give_empty_logits(shape):
    model = build("mla_sigmoid")
    ids = torch.zeros(shape, dtype=torch.long)
    out = model(ids, targets=ids)
    assert out.logits.shape == (*shape, 97) and out.loss.isnan()  # the mean over no tokens
    with torch.no_grad():
        assert model(ids).logits.shape == (*shape, 97)


def test_weights_are_initialised_once_with_the_residual_std_on_projections_into_the_stream():
    cfg = CONFIGS["every_other_full_qknorm"].replace(d_model=128, d_ff=256, moe=MOE.replace(d_model=128, d_expert=128))
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    resid = 0.02 / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
        elif name.endswith(".bias"):
            assert torch.all(p == 0), name
        else:
            into_stream = name.endswith(("wo.weight", "w_out.weight", "experts.w_out"))
            assert p.std().item() == pytest.approx(resid if into_stream else 0.02, rel=0.15), name


def test_update_expert_biases_reaches_every_moe_layer():
    cfg = CONFIGS["mla_sigmoid"].replace(moe=CONFIGS["mla_sigmoid"].moe.replace(expert_bias=True))
    model = MoETransformer(cfg)
    out = model(torch.randint(0, 97, (2, 8)))
    model.update_expert_biases([a.load for a in out.aux])
    for moe, aux in zip(model.moe_layers(), out.aux):
        load = aux.load
        expected = 1e-3 * torch.sign(load.mean() - load)
        torch.testing.assert_close(moe.router.bias, expected)


# -- YaRN (Peng et al. 2023) -----------------------------------------------------------------------------


def test_yarn_attention_factor_and_mla_softmax_scale():
    assert yarn_mscale(1.0) == 1.0 and yarn_mscale(0.5, 3.0) == 1.0
    assert yarn_mscale(40.0, 0.5) == pytest.approx(0.05 * math.log(40) + 1)
    plain_mscale = RopeScaling(factor=4.0, original_max_seq_len=8)
    assert yarn_attention_factor(plain_mscale) == pytest.approx(0.1 * math.log(4) + 1)
    ratio = RopeScaling(factor=4.0, original_max_seq_len=8, mscale=1.0, mscale_all_dim=0.7)
    assert yarn_attention_factor(ratio) == pytest.approx((0.1 * math.log(4) + 1) / (0.07 * math.log(4) + 1))
    # transformers reads the ratio only when both are non-zero
    assert yarn_attention_factor(ratio.replace(mscale=0.0)) == pytest.approx(0.1 * math.log(4) + 1)
    assert yarn_attention_factor(ratio.replace(attention_factor=1.3)) == 1.3
    cos, sin = rope_tables(8, 16, 10000.0, ratio)
    cos0, sin0 = rope_tables(8, 16, 10000.0)
    torch.testing.assert_close(cos.square() + sin.square(), torch.full_like(cos, yarn_attention_factor(ratio) ** 2))
    assert not torch.allclose(cos, cos0)
    model = build("mla_yarn")
    qk = 8 + 8
    assert model.blocks[0].attn.scale == pytest.approx(qk ** -0.5 * (0.07 * math.log(4) + 1) ** 2)
    gqa = MoETransformer(CONFIGS["gqa_dense_first"].replace(rope_scaling=ratio))
    assert gqa.rope_cos.shape == (32, 8)  # GQA rotates the whole head; its softmax scale is not changed


@pytest.mark.parametrize(("changes", "match"), [
    ({"factor": 0.5}, r"rope_scaling.factor=0.5 is invalid: allowed a number >= 1"),
    ({"type": "linear"}, r"rope_scaling.type='linear' is invalid: allowed one of 'yarn'"),
    ({"original_max_seq_len": 0}, r"rope_scaling.original_max_seq_len=0 is invalid"),
    ({"beta_fast": 1.0, "beta_slow": 2.0}, r"rope_scaling.beta_fast=1.0 is invalid: allowed a number >= beta_slow"),
    ({"beta_slow": 0.0}, r"rope_scaling.beta_slow=0.0 is invalid: allowed a number > 0"),
    ({"mscale_all_dim": -1.0}, r"rope_scaling.mscale_all_dim=-1.0 is invalid"),
    ({"attention_factor": 0.0}, r"rope_scaling.attention_factor=0.0 is invalid"),
    ({"truncate": "yes"}, r"rope_scaling.truncate='yes' is invalid"),
])
def test_rope_scaling_validation_names_field_and_range(changes, match):
    with pytest.raises(ValueError, match=match):
        RopeScaling(**{"factor": 2.0, "original_max_seq_len": 16, **changes})


def test_model_config_rope_scaling_errors():
    with pytest.raises(ValueError, match=r"rope_scaling: field\(s\) \['original_max_seq_len'\] missing"):
        ModelConfig(rope_scaling={"factor": 2.0})
    with pytest.raises(ValueError, match=r"RopeScaling: unknown field\(s\) \['rope_type'\]"):
        ModelConfig(rope_scaling={"factor": 2.0, "original_max_seq_len": 8, "rope_type": "yarn"})
    with pytest.raises(ValueError, match="rope_scaling=2.0 is invalid: allowed None or a RopeScaling"):
        ModelConfig(rope_scaling=2.0)


def test_rope_scaling_json_round_trip_and_old_configs():
    cfg = CONFIGS["mla_yarn"]
    data = cfg.to_dict()
    assert data["rope_scaling"]["factor"] == 4.0
    assert ModelConfig.from_dict(data) == cfg
    plain = CONFIGS["mla_sigmoid"]
    old = plain.to_dict()
    assert "rope_scaling" not in old  # a plain-RoPE config is written exactly as before the field existed
    assert ModelConfig.from_dict(old) == plain and ModelConfig.from_dict(old).rope_scaling is None
