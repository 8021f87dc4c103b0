"""moelab.hf for GraniteMoE, DeepSeek-V2, GLM-4.5 (glm4_moe) and gpt-oss against transformers itself.

For each architecture: a tiny random model built by transformers (no download) and saved with
`save_pretrained` loads into moelab with the same float32 logits (max |difference| within 1e-5 of the
logit scale, i.e. of max |logit|) and the same greedy continuation; its in-memory (stacked) tensor layout
loads too; a random moelab model of the architecture exports with `hf.save`, loads in transformers with
the same logits and continuation and reads back into moelab; `moelab card` on the config and moelab's
own model count the parameters transformers holds; unsupported variants of the config are refused
naming the field.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from conftest import random_moelab, save_with, saved_checkpoints, tiny_hf  # noqa: E402
from moelab import hf  # noqa: E402
from moelab.accounting import count_params  # noqa: E402
from moelab.accounting.card import card_report  # noqa: E402
from moelab.config.model import ModelConfig, MoEConfig  # noqa: E402
from moelab.model.transformer import MoETransformer  # noqa: E402
from test_hf import COMMON, V, _ids, assert_same  # noqa: E402

T = transformers


MLA = dict(kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)


def _hf_config(case: str):
    """A tiny transformers config per case (a case is an architecture, or one with a variant after '-')."""
    if case == "granitemoe":  # the multipliers of granite-3.1-1b-a400m-base
        return T.GraniteMoeConfig(**COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                                  embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=6.0,
                                  attention_multiplier=0.015625, tie_word_embeddings=True)
    if case == "deepseek_v2":  # V2-Lite's shape: full-rank queries, greedy softmax routing
        return T.DeepseekV2Config(**{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4}, **MLA,
                                  intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                                  n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                  q_lora_rank=None, routed_scaling_factor=1.5, topk_method="greedy")
    if case == "deepseek_v2-qlora-groups":  # V2's shape: q LoRA, device-limited routing
        return T.DeepseekV2Config(**{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4}, **MLA,
                                  intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                                  n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1,
                                  q_lora_rank=16, routed_scaling_factor=2.0, topk_method="group_limited_greedy",
                                  n_group=4, topk_group=2)
    if case == "glm4_moe":  # GLM-4.5's options: q/k/v biases, q/k norm, half-rotary heads, groups, shared experts
        return T.Glm4MoeConfig(**{**COMMON, "num_hidden_layers": 3}, head_dim=16, intermediate_size=48,
                               moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                               first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                               attention_bias=True, use_qk_norm=True)
    if case == "glm4_moe-plain":  # GLM-4.5-Air-like: no q/k norm, no groups, renormalisation off
        return T.Glm4MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4,
                               n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=0,
                               norm_topk_prob=False, attention_bias=False, use_qk_norm=False)
    if case == "gpt_oss":  # gpt-oss's options: biases everywhere, sinks, 4-token windows on even layers
        return T.GptOssConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=8, intermediate_size=32,
                              num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if case == "gpt_oss-yarn-every3":  # published YaRN form; no attention biases; a window every third layer
        return T.GptOssConfig(**{**COMMON, "num_hidden_layers": 3, "max_position_embeddings": 128}, head_dim=16,
                              intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
                              attention_bias=False,
                              layer_types=["sliding_attention", "full_attention", "full_attention"],
                              rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                               "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                               "original_max_position_embeddings": 32})
    raise AssertionError(case)


CASES = ["granitemoe", "deepseek_v2", "deepseek_v2-qlora-groups", "glm4_moe", "glm4_moe-plain", "gpt_oss",
         "gpt_oss-yarn-every3"]


def _tiny_hf(case: str, seed: int = 0):
    return tiny_hf(_hf_config(case), seed)


saved = saved_checkpoints(CASES, _tiny_hf)


def test_load_matches_transformers(saved):
    case, hf_model, path = saved
    assert json.loads((path / "config.json").read_text())["model_type"] == case.split("-")[0]
    assert_same(hf_model, hf.load(path), f"{case} load")


def test_loads_in_memory_layout(saved, tmp_path):
    """transformers' in-memory tensor names and layouts (as its state_dict holds them) load too."""
    arch, hf_model, path = saved
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    tied = hf_model.config.tie_word_embeddings  # then lm_head.weight is embed_tokens.weight, stored once
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(tmp_path / "model.safetensors"))
    assert_same(hf_model, hf.load(tmp_path), f"{arch} in-memory layout")


def test_card_counts_transformers_parameters(saved):
    arch, hf_model, path = saved
    expected = sum(p.numel() for p in hf_model.parameters())
    assert card_report(str(path))["total_params"] == expected
    ours = hf.load(path, for_training=True)
    assert ours.num_params() == expected
    assert count_params(ours.cfg).total == expected  # moelab's own config counts the same model


def _moelab_config(case: str) -> ModelConfig:
    if case == "granitemoe":
        return ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                           embed_scale=12.0, residual_scale=0.22, logits_scaling=6.0, attn_scale=0.1,
                           moe=MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2, route_scale=1.5))
    if case.startswith("deepseek_v2"):
        groups = dict(n_groups=4, topk_groups=2) if "groups" in case else {}
        return ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, n_kv_heads=4, attention="mla",
                           q_lora_rank=16 if "qlora" in case else None, kv_lora_rank=12, qk_nope_head_dim=8,
                           qk_rope_head_dim=4, v_head_dim=8, max_seq_len=64, d_ff=48, n_dense_layers=1,
                           moe=MoEConfig(d_model=32, d_expert=16, n_experts=8, top_k=3, n_shared=2,
                                         norm_topk_prob=False, route_scale=2.0, **groups))
    if case.startswith("glm4_moe"):
        plain = "plain" in case
        groups = {} if plain else dict(n_groups=4, topk_groups=2)
        return ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16,
                           rotary_dim=None if plain else 8, qkv_bias=not plain, qk_norm="none" if plain else "head",
                           max_seq_len=64, d_ff=48, n_dense_layers=0 if plain else 1, norm_eps=1e-5,
                           moe=MoEConfig(d_model=32, d_expert=16, n_experts=8, top_k=3, n_shared=0 if plain else 1,
                                         router="sigmoid", expert_bias=True, route_scale=2.5,
                                         norm_topk_prob=not plain, **groups))
    if case.startswith("gpt_oss"):
        every3 = "every3" in case
        return ModelConfig(vocab_size=V, d_model=32, n_layers=3 if every3 else 4, n_heads=4, n_kv_heads=2,
                           head_dim=16 if every3 else 8, qkv_bias=not every3, o_bias=not every3, attn_sinks=True,
                           sliding_window=6 if every3 else 4, sliding_every=3 if every3 else 2, max_seq_len=64,
                           norm_eps=1e-5, moe=MoEConfig(d_model=32, d_expert=32, n_experts=4, top_k=2, biases=True,
                                                        activation="clamped_swiglu", route_scale=1.5))
    raise AssertionError(case)


@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_transformers(case, tmp_path):
    ours = random_moelab(_moelab_config(case))
    hf.save(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == case.split("-")[0]
    hf_model = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same(hf_model, ours, f"{case} export")
    assert sum(p.numel() for p in hf_model.parameters()) == ours.num_params()
    back = hf.load(tmp_path, for_training=True)
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, ours(_ids()).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("arch", "config", "match"), [
    ("granitemoe", {"attention_bias": True}, "field 'attention_bias'=True is not supported by moelab: allowed false"),
    ("granitemoe", {"embedding_multiplier": None}, "field 'embedding_multiplier'=None"),
    ("granitemoe", {"logits_scaling": 0}, "field 'logits_scaling'=0.0 is invalid: allowed a number > 0"),
    ("granitemoe", {"hidden_act": "gelu"}, "field 'hidden_act'='gelu' is not supported"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "field 'topk_method'='noaux_tc' is not supported by moelab: "
                                                 "allowed 'greedy' or 'group_limited_greedy'"),
    ("deepseek_v2", {"norm_topk_prob": True}, "field 'norm_topk_prob'=True is not supported"),
    ("deepseek_v2", {"attention_bias": True}, "field 'attention_bias'=True is not supported"),
    ("deepseek_v2", {"mlp_bias": True}, "field 'mlp_bias'=True is not supported"),
    ("deepseek_v2", {"q_lora_rank": ...}, "required field 'q_lora_rank' is missing"),  # transformers: rank 1536
    ("deepseek_v2-qlora-groups", {"n_group": 3}, "field 'n_group'=3 is invalid: allowed a divisor of the number"),
    ("glm4_moe", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.35}},
     r"field 'partial_rotary_factor'=0.35 is invalid: head width 16 × it = 5 channels, allowed an even number"),
    ("glm4_moe", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
     r"field 'rope_parameters.rope_type'='linear' is not supported by moelab"),
    ("glm4_moe", {"hidden_act": "gelu"}, "field 'hidden_act'='gelu' is not supported"),
    ("glm4_moe", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.05}},
     r"'partial_rotary_factor'=0.05 is invalid: head width 16 × it = 0 channels, allowed an even number >= 2"),
    ("glm4_moe", {"n_shared_experts": None}, "field 'n_shared_experts'=None is invalid"),
    ("glm4_moe", {"topk_group": 5}, "field 'topk_group'=5 is invalid: allowed an integer <= n_group"),
    ("glm4_moe", {"first_k_dense_replace": 3}, "no layer is MoE"),
    ("gpt_oss", {"swiglu_limit": 5.0}, "field 'swiglu_limit'=5.0 is not supported by moelab: allowed 7.0"),
    ("gpt_oss", {"swiglu_alpha": 1.5}, "field 'swiglu_alpha'=1.5 is not supported by moelab: allowed 1.702"),
    ("gpt_oss", {"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]},
     "field 'layer_types' is not supported by moelab: allowed sliding_attention on layers 0, k, 2k"),
    ("gpt_oss", {"layer_types": ["sliding_attention"] * 3}, "field 'layer_types' is invalid: allowed a list of 4"),
    ("gpt_oss", {"rope_parameters": ...}, "field 'rope_parameters' is missing: transformers' gpt-oss default"),
    ("gpt_oss", {"sliding_window": None}, "field 'sliding_window'=None"),
])
def test_unsupported_variants_are_refused(arch, config, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        hf.load(save_with(_tiny_hf(arch), tmp_path, **config))


@pytest.mark.parametrize("where", ["absent", "top-level"])
def test_glm_partial_rotary_factor_absent_or_top_level(where, tmp_path):
    """GLM-4.5's published config.json has `partial_rotary_factor` at the top level; absent, it is 0.5 (the
    config class's default), as transformers reads it."""
    model = _tiny_hf("glm4_moe-plain", seed=4)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    extra = {"partial_rotary_factor": 0.5} if where == "top-level" else {}
    ours = hf.load(save_with(model, tmp_path, rope_parameters=rope, **extra))
    assert ours.cfg.rotary_dim == 4  # half of the head width 8
    assert_same(model, ours, f"glm4_moe partial rotary {where}")


def test_export_refuses_options_of_other_architectures():
    """A Mixtral-like config with Granite's multipliers exports only as granitemoe; the reasons name the field."""
    cfg = _moelab_config("granitemoe").replace(attention="mla", q_lora_rank=None)
    with pytest.raises(ValueError, match="mixtral: embed_scale must be 1.0 .*granitemoe: attention must be 'gqa'"):
        hf.save(MoETransformer(cfg), "/nonexistent/never-written")


# -- gpt-oss: MXFP4 expert weights -------------------------------------------------------------------------


def test_mxfp4_dequantization_by_hand():
    """Two values per byte, low nibble first; E2M1 codes; one power-of-two scale (exponent + 127) per 32 values."""
    from moelab.hf.mxfp4 import dequantize_mxfp4

    blocks = torch.zeros(2, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0], blocks[0, 0, 15] = 0x21, 0xF8  # codes 1, 2 (0.5, 1.0); 8, 15 (-0.0, -6.0)
    blocks[1, 0, 3] = 0x7B  # codes 11, 7: -1.5, 6.0
    scales = torch.tensor([[128], [125]], dtype=torch.uint8)  # x 2, x 1/4
    out = dequantize_mxfp4(blocks, scales)
    assert out.shape == (2, 32)
    expected = torch.zeros(2, 32)
    expected[0, 0], expected[0, 1], expected[0, 30], expected[0, 31] = 1.0, 2.0, -0.0, -12.0
    expected[1, 6], expected[1, 7] = -0.375, 1.5
    assert torch.equal(out, expected) and torch.signbit(out[0, 30])  # code 8 is -0.0
    with pytest.raises(ValueError, match=r"MXFP4 blocks \(2, 1, 16\) and scales \(2, 2\) do not fit"):
        dequantize_mxfp4(blocks, torch.zeros(2, 2, dtype=torch.uint8))


def _random_mxfp4(E: int, rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.randint(0, 256, (E, rows, cols // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(121, 127, (E, rows, cols // 32), dtype=torch.uint8, generator=gen)  # 2^-6 .. 2^-1
    return blocks, scales


def test_mxfp4_matches_transformers_dequantization():
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    from moelab.hf.mxfp4 import dequantize_mxfp4

    blocks, scales = _random_mxfp4(3, 8, 64, torch.Generator().manual_seed(0))
    theirs = _convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, cols, rows]: in-memory layout
    assert torch.equal(dequantize_mxfp4(blocks, scales).transpose(1, 2), theirs)


def test_mxfp4_checkpoint_loads_dequantized(tmp_path):
    """A checkpoint whose experts are MXFP4 blocks + scales (the published gpt-oss form) loads with the logits of
    the transformers model holding the same weights dequantized; a missing half of a pair is named."""
    from moelab.hf.mxfp4 import dequantize_mxfp4

    model = _tiny_hf("gpt_oss", seed=6)
    gen = torch.Generator().manual_seed(1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    E, F, D = 4, 32, 32
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            q = f"model.layers.{i}.mlp.experts."
            for name, rows, cols in (("gate_up_proj", 2 * F, D), ("down_proj", D, F)):
                blocks, scales = _random_mxfp4(E, rows, cols, gen)
                getattr(layer.mlp.experts, name).copy_(dequantize_mxfp4(blocks, scales).transpose(1, 2))
                del state[q + name]
                state |= {q + name + "_blocks": blocks, q + name + "_scales": scales}
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    save_file(state, str(tmp_path / "model.safetensors"))
    assert_same(model, hf.load(tmp_path), "gpt_oss MXFP4")
    bf16 = hf.load(tmp_path, dtype=torch.bfloat16)  # decoded straight into bfloat16: exact
    for ours, theirs in zip(bf16.moe_layers(), model.model.layers, strict=True):
        assert torch.equal(ours.experts.w_in, theirs.mlp.experts.gate_up_proj.to(torch.bfloat16))
        assert torch.equal(ours.experts.w_out, theirs.mlp.experts.down_proj.to(torch.bfloat16))
    del state["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="tensor 'model.layers.1.mlp.experts.down_proj_scales' is missing from the "
                                         "checkpoint \\(its pair 'model.layers.1.mlp.experts.down_proj_blocks'"):
        hf.load(tmp_path)


# -- the published config.json of each family ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["granite-3.1-1b-a400m", "granite-3.1-3b-a800m", "deepseek-v2-lite", "deepseek-v2",
                                  "glm-4.5-air", "glm-4.5", "gpt-oss-20b", "gpt-oss-120b"])
def test_published_configs_read(name, tmp_path):
    """Each shipped preset (a released model's config.json) becomes a moelab config whose model (built on the meta
    device, no memory) has the parameters `moelab card` counts for that config.json."""
    from moelab.accounting.presets import load_preset

    data = load_preset(name)
    (tmp_path / "config.json").write_text(json.dumps(data))
    _, adapter, cfg = hf.read_hf_config(tmp_path)
    assert adapter.model_type == data["model_type"]
    with torch.device("meta"):
        assert MoETransformer(cfg).num_params() == count_params(data).total
