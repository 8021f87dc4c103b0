"""Every Hugging Face adapter in moelab.accounting against the real `transformers` model class.

For each architecture a tiny config is built with the `transformers` config class, the model is
instantiated from it (no download), and we compare:
- total: `sum(p.numel())` of the transformers model;
- the breakdown: the model's parameters sorted into categories by their names;
- active: derived from the model's own tensors — every parameter counts once, except the stacked
  routed-expert tensors, which count k/E of their size (k, E from the config).
Each architecture is also counted from the *minimal* dict (only the fields we set), so that
defaults taken for absent fields must agree with what the transformers class does with them.
"""

from __future__ import annotations

import re

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from moelab.accounting import CATEGORIES, count_params  # noqa: E402

T = transformers
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=101)

# name -> (config class or builder, minimal kwargs, (E, k) of the FFN experts, attention (E, k) or None)
CASES = {
    "mixtral": (T.MixtralConfig, dict(BASE, num_local_experts=4, num_experts_per_tok=2)),
    "mixtral_tied_headdim": (T.MixtralConfig, dict(BASE, num_local_experts=5, num_experts_per_tok=1,
                                                   head_dim=24, tie_word_embeddings=True)),
    "qwen2_moe": (T.Qwen2MoeConfig, dict(BASE, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                         num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1])),
    "qwen2_moe_step": (T.Qwen2MoeConfig, dict(BASE, num_hidden_layers=4, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=40, num_experts=4,
                                              num_experts_per_tok=2, decoder_sparse_step=2, qkv_bias=False)),
    "qwen3_moe": (T.Qwen3MoeConfig, dict(BASE, head_dim=24, moe_intermediate_size=32, num_experts=8,
                                         num_experts_per_tok=2, mlp_only_layers=[0])),
    "olmoe": (T.OlmoeConfig, dict(BASE, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v2": (T.DeepseekV2Config, dict(BASE, moe_intermediate_size=32, n_routed_experts=6,
                                             n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
                                             q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                                             qk_rope_head_dim=4, v_head_dim=12, n_group=1, topk_group=1)),
    "deepseek_v2_qlora_bias": (T.DeepseekV2Config, dict(BASE, moe_intermediate_size=32, n_routed_experts=4,
                                                        n_shared_experts=1, num_experts_per_tok=2,
                                                        first_k_dense_replace=2, q_lora_rank=24, kv_lora_rank=16,
                                                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                                                        attention_bias=True, mlp_bias=True)),
    "deepseek_v3": (T.DeepseekV3Config, dict(BASE, moe_intermediate_size=32, n_routed_experts=8,
                                             n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                             q_lora_rank=20, kv_lora_rank=16, qk_nope_head_dim=8,
                                             qk_rope_head_dim=4, v_head_dim=12, n_group=2, topk_group=1,
                                             num_nextn_predict_layers=1)),
    "gpt_oss": (T.GptOssConfig, dict(BASE, num_hidden_layers=4, head_dim=16, num_local_experts=4,
                                     num_experts_per_tok=2, sliding_window=8)),
    "llama4_text": (T.Llama4TextConfig, dict(BASE, num_hidden_layers=4, head_dim=16, intermediate_size_mlp=80,
                                             num_local_experts=4, num_experts_per_tok=1,
                                             interleave_moe_layer_step=2)),
    "glm4_moe": (T.Glm4MoeConfig, dict(BASE, head_dim=16, moe_intermediate_size=32, n_routed_experts=4,
                                       n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                       use_qk_norm=True, attention_bias=True)),
    "granitemoe": (T.GraniteMoeConfig, dict(BASE, num_local_experts=4, num_experts_per_tok=2,
                                            tie_word_embeddings=True)),
    "phimoe": (T.PhimoeConfig, dict(BASE, num_local_experts=4, num_experts_per_tok=2, attention_bias=True,
                                    lm_head_bias=True)),
    "jetmoe": (T.JetMoeConfig, dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_key_value_heads=2, kv_channels=16, vocab_size=101, num_local_experts=4,
                                    num_experts_per_tok=2)),
    # null / zero as transformers reads them: a null num_key_value_heads is multi-head attention; zero shared
    # experts are zero-width FFNs (with mlp_bias their down projection keeps its bias)
    "qwen2_kv_null": (T.Qwen2Config, dict(BASE, num_key_value_heads=None)),
    "deepseek_v3_no_shared": (T.DeepseekV3Config, dict(BASE, moe_intermediate_size=32, n_routed_experts=4,
                                                       n_shared_experts=0, num_experts_per_tok=2,
                                                       first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                                                       qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                                                       n_group=2, topk_group=1, routed_scaling_factor=1.0)),
    "deepseek_v2_no_shared_mlp_bias": (T.DeepseekV2Config, dict(BASE, moe_intermediate_size=32, n_routed_experts=4,
                                                                n_shared_experts=0, num_experts_per_tok=2,
                                                                q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=0,
                                                                qk_rope_head_dim=4, v_head_dim=12, mlp_bias=True)),
    "llama": (T.LlamaConfig, dict(BASE, attention_bias=True, mlp_bias=True)),
    "llama_mha": (T.LlamaConfig, {k: v for k, v in BASE.items() if k != "num_key_value_heads"}),
    "qwen2": (T.Qwen2Config, dict(BASE)),
    "qwen3": (T.Qwen3Config, dict(BASE, head_dim=16)),
    "mistral": (T.MistralConfig, dict(BASE, tie_word_embeddings=True)),
}


def _dbrx_config(**kw):
    cfg = T.DbrxConfig(**kw)
    cfg.attn_config.rope_theta = 10000.0  # transformers 5.x DbrxAttention reads it; the config class lacks it
    return cfg


CASES["dbrx"] = (_dbrx_config, dict(d_model=64, n_heads=4, n_layers=2, vocab_size=101,
                                    attn_config=dict(kv_n_heads=2),
                                    ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2)))

NORM = re.compile(r"(^|\.)[a-z_]*norm(_\d|_f)?\.(weight|bias)$")
# stacked routed-expert tensors: Mixtral-style gate_up/down, gpt-oss biases, DBRX w1/v1/w2, JetMoE/Granite
EXPERT_TENSOR = re.compile(r"\.experts\.(gate_up_proj|down_proj|gate_up_proj_bias|down_proj_bias|mlp\.w1|mlp\.v1"
                           r"|mlp\.w2|input_linear\.weight|output_linear\.weight)$|\.mlp\.(input|output)_linear\.weight$")


def category(name: str) -> str:
    """Sort a transformers parameter name into one of moelab.accounting.CATEGORIES."""
    if NORM.search(name):
        return "norms"
    if "embed_tokens" in name or ".wte." in name:
        return "input_embedding"
    if name.startswith("lm_head"):
        return "output_head"
    if "shared_expert" in name:
        return "shared_experts"
    if re.search(r"router|\.mlp\.gate\.weight$", name):
        return "routers"
    if re.search(r"self_attn|self_attention|\.attn\.", name):
        return "attention"
    if EXPERT_TENSOR.search(name) or re.search(r"block_sparse_moe|\.mlp\.bias$", name):
        return "routed_experts"
    if re.search(r"\.mlp\.|feed_forward|\.ffn\.", name):
        return "dense_ffn"
    raise AssertionError(f"unclassified parameter {name}")


def expert_fraction(cfg) -> float:
    """k / E from the transformers config (the share of a routed-expert tensor one token uses)."""
    if isinstance(cfg, T.DbrxConfig):
        return cfg.ffn_config.moe_top_k / cfg.ffn_config.moe_num_experts
    for field in ("num_local_experts", "num_experts", "n_routed_experts"):
        n = getattr(cfg, field, None)
        if n:
            return cfg.num_experts_per_tok / n
    return 1.0  # dense


def build(name):
    make, kwargs = CASES[name]
    cfg = make(**kwargs)
    model = T.AutoModelForCausalLM.from_config(cfg)
    return cfg, model


@pytest.mark.parametrize("name", sorted(CASES))
def test_counts_match_transformers(name):
    cfg, model = build(name)
    params = list(model.named_parameters())
    total = sum(p.numel() for _, p in params)
    breakdown = dict.fromkeys(CATEGORIES, 0)
    for n, p in params:
        breakdown[category(n)] += p.numel()
    frac = expert_fraction(cfg)
    active = sum(p.numel() * (frac if EXPERT_TENSOR.search(n) else 1) for n, p in params)

    for source in (cfg.to_dict(), {**CASES[name][1], "model_type": cfg.model_type}):
        c = count_params(source)
        assert c.total == total
        assert c.breakdown == breakdown
        assert c.active == pytest.approx(active, abs=1e-6)
        assert c.activation_ratio == pytest.approx(active / total)


def test_deepseek_v3_mtp_is_separate_and_a_full_moe_block():
    cfg, model = build("deepseek_v3")
    c = count_params(cfg.to_dict())
    assert c.total == sum(p.numel() for p in model.parameters())  # transformers does not build the MTP module
    # one MTP module = one MoE decoder block + M (d x 2d) + 3 norms of d (DeepSeek-V3 eq. 21-22)
    block = sum(p.numel() for p in model.model.layers[-1].parameters())
    d = cfg.hidden_size
    assert c.mtp == block + 2 * d * d + 3 * d


def test_kimi_k2_is_counted_as_deepseek_v3():
    cfg, model = build("deepseek_v3")
    as_kimi = {**cfg.to_dict(), "model_type": "kimi_k2"}
    assert count_params(as_kimi).total == sum(p.numel() for p in model.parameters())


def test_llama4_multimodal_vision_counted_apart():
    tc = dict(head_dim=16, hidden_size=64, intermediate_size=96, intermediate_size_mlp=80, num_attention_heads=4,
              num_hidden_layers=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=1, vocab_size=101)
    vc = dict(hidden_size=48, image_size=56, intermediate_size=72, num_attention_heads=4, num_hidden_layers=2,
              patch_size=14, pixel_shuffle_ratio=0.5, projector_input_dim=40, projector_output_dim=40,
              vision_output_dim=36)
    cfg = T.Llama4Config(text_config=tc, vision_config=vc)
    model = T.Llama4ForConditionalGeneration(cfg)
    vision = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("language_model"))
    text = sum(p.numel() for n, p in model.named_parameters() if n.startswith("language_model"))
    for source in (cfg.to_dict(), {"model_type": "llama4", "text_config": tc, "vision_config": vc}):
        c = count_params(source)
        assert (c.total, c.vision) == (text, vision)


def test_gpt_oss_active_without_input_embedding_matches_its_model_card_convention():
    """gpt-oss model card Table 1 counts active = MLP·k/E + attention + unembedding (no embedding)."""
    cfg, model = build("gpt_oss")
    c = count_params(cfg.to_dict())
    emb = model.model.embed_tokens.weight.numel()
    assert c.active_no_input_embedding == c.active - emb
    assert c.active_no_embeddings == c.active - emb - model.lm_head.weight.numel()
