"""Config validation: every bad value raises ValueError naming the field, the value and the range."""

from __future__ import annotations

import pytest

from moelab import ModelConfig, MoEConfig
from moelab.config.train import TrainConfig

BAD_MOE = [
    (dict(top_k=9, n_experts=8), "top_k=9.*n_experts"),
    (dict(top_k=0), "top_k=0.*>= 1"),
    (dict(biases=True), "activation='swiglu' is invalid: allowed 'clamped_swiglu' with biases=True, and only then"),
    (dict(activation="clamped_swiglu"), "activation='clamped_swiglu' is invalid"),
    (dict(biases="yes"), "biases='yes' is invalid: allowed true or false"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0.*> 0"),
    (dict(capacity_factor=-1.0), "capacity_factor=-1.0"),
    (dict(n_experts=8, n_groups=3), "n_groups=3.*divisor of n_experts"),
    (dict(n_experts=8, n_groups=2, topk_groups=3, router="sigmoid"), "topk_groups=3.*<= n_groups"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef=-0.1.*>= 0"),
    (dict(z_loss_coef=-1), "z_loss_coef=-1"),
    (dict(seq_aux_loss_coef=-1e-3), "seq_aux_loss_coef"),
    (dict(bias_update_rate=-1.0), "bias_update_rate"),
    (dict(router="hash"), "router='hash'.*'topk_softmax'"),
    (dict(activation="relu"), "activation='relu'.*'swiglu'"),
    (dict(backend="cuda"), "backend='cuda'"),
    (dict(router="switch", top_k=2), "top_k=2.*switch"),
    (dict(router="expert_choice"), "capacity_factor=None.*expert_choice"),
    (dict(router="expert_choice", capacity_factor=1.0, expert_bias=True), "expert_bias"),
    (dict(shared_gate=True), "shared_gate"),
    (dict(d_model=0), "d_model=0"),
    (dict(n_experts=8, top_k=4, n_groups=4, topk_groups=1, router="sigmoid"), "top_k=4.*topk_groups"),
    (dict(router="noisy_topk", norm_topk_prob=False), "norm_topk_prob=False.*True for router='noisy_topk'"),
    (dict(load_loss_coef=0.1), "load_loss_coef=0.1 is invalid: allowed 0 unless router is 'noisy_topk'"),
    (dict(router="noisy_topk", load_loss_coef=-1.0), "load_loss_coef=-1.0.*>= 0"),
    (dict(importance_loss_coef=float("inf")), "importance_loss_coef=inf.*finite number >= 0"),
    (dict(router="expert_choice", capacity_factor=1.0, importance_loss_coef=0.1), "importance_loss_coef=0.1.*token"),
    (dict(router="noisy_topk", n_groups=2), "n_groups=2.*'sigmoid' or 'topk_softmax'"),
]


@pytest.mark.parametrize("kwargs,pattern", BAD_MOE)
def test_bad_moe_config_names_the_field(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(**kwargs)


BAD_MODEL = [
    (dict(n_heads=3), "n_heads=3"),
    (dict(n_kv_heads=3), "n_kv_heads=3"),
    (dict(n_dense_layers=9, n_layers=4), "n_dense_layers=9"),
    (dict(attention="linear"), "attention='linear'"),
    (dict(qk_norm="yes"), "qk_norm='yes'"),
    (dict(moe=MoEConfig(d_model=128)), "moe.d_model=128"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(embed_scale=0.0), "embed_scale=0.0 is invalid: allowed a finite number > 0"),
    (dict(residual_scale=float("inf")), "residual_scale=inf"),
    (dict(logits_scaling=-1.0), "logits_scaling=-1.0"),
    (dict(attn_scale=True), "attn_scale=True is invalid: allowed a finite number > 0 or None"),
    (dict(rotary_dim=6, head_dim=4), r"rotary_dim=6 is invalid: allowed None or an even integer <= the head width "
                                     r"\(4\)"),
    (dict(rotary_dim=3), "rotary_dim=3 is invalid"),
    (dict(attn_sinks=True, attention="mla"), "attn_sinks=True is invalid: allowed false, or true with attention='gqa'"),
    (dict(o_bias=1), "o_bias=1 is invalid"),
    (dict(sliding_window=0), "sliding_window=0 is invalid: allowed an integer >= 1"),
    (dict(sliding_every=0), "sliding_every=0 is invalid"),
    (dict(rotary_dim=4, attention="mla"), "rotary_dim=4 is invalid: .* with attention='gqa'"),
]


@pytest.mark.parametrize("kwargs,pattern", BAD_MODEL)
def test_bad_model_config_names_the_field(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ModelConfig(**kwargs)


def test_json_round_trip_and_unknown_fields(tmp_path):
    cfg = ModelConfig(moe=MoEConfig(n_experts=16, top_k=4, router="sigmoid", n_groups=4, topk_groups=2))
    cfg.save_json(tmp_path / "c.json")
    assert ModelConfig.load_json(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown field.*'n_expert'"):
        MoEConfig.from_dict({"n_expert": 4})


def test_architecture_options_are_written_only_when_used():
    """Fields only some architectures use (Granite's multipliers...) stay out of config.json at their defaults, so a
    config that does not use them is written (and compared on resume) exactly as before they existed."""
    plain = ModelConfig()
    written = set(plain.to_dict()) | set(plain.to_dict()["moe"])
    assert not {"embed_scale", "residual_scale", "logits_scaling", "attn_scale", "rotary_dim", "o_bias", "attn_sinks",
                "sliding_window", "sliding_every", "biases", "importance_loss_coef", "load_loss_coef"} & written
    granite = plain.replace(embed_scale=12.0, residual_scale=0.22, logits_scaling=6.0, attn_scale=0.015625)
    data = granite.to_dict()
    assert data["embed_scale"] == 12.0 and data["attn_scale"] == 0.015625
    assert ModelConfig.from_dict(data) == granite and ModelConfig.from_dict(plain.to_dict()) == plain


def test_noisy_topk_coefficients_round_trip_when_set():
    cfg = MoEConfig(router="noisy_topk", importance_loss_coef=0.1, load_loss_coef=0.2)
    data = cfg.to_dict()
    assert (data["router"], data["importance_loss_coef"], data["load_loss_coef"]) == ("noisy_topk", 0.1, 0.2)
    assert MoEConfig.from_dict(data) == cfg


def test_dense_twin_has_the_active_width():
    cfg = ModelConfig(moe=MoEConfig(d_expert=64, n_experts=8, top_k=2, n_shared=1))
    twin = cfg.dense_twin()
    assert twin.moe is None and twin.d_ff == 2 * 64 + 64
    assert not any(twin.is_moe_layer(i) for i in range(twin.n_layers))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(device="gpu"), r"device='gpu' is invalid: allowed 'cpu', 'cuda' or 'cuda:N'"),
    (dict(device="cuda:x"), r"device='cuda:x'"),
    (dict(device="cuda", expert_parallel=2, batch_size=2), r"device='cuda' .* expert_parallel > 1"),
])
def test_bad_train_device_names_the_field(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**kwargs)
    assert TrainConfig(device="cuda:1").device == "cuda:1"  # valid on any machine; presence is checked by train
