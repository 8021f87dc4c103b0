"""moelab.config.hf_arch against transformers: which layers are MoE, the attention's head width and KV heads, and
the window of each layer, read off the model (or config) transformers builds from the same config — from
its full `to_dict()` and from the minimal dict of the fields set here (so absent fields must mean what the
transformers class makes of them)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from moelab.config.hf import HFConfig  # noqa: E402
from moelab.config.hf_arch import head_dim, kv_heads, layer_windows, moe_layers  # noqa: E402

T = transformers
BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64)
EXPERTS = dict(moe_intermediate_size=16, num_experts_per_tok=2)
DEEPSEEK = dict(q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=8, n_group=1,
                topk_group=1, n_shared_experts=1, n_routed_experts=4, routed_scaling_factor=1.0)
CASES = {
    "mixtral_head_dim_0": (T.MixtralConfig, dict(BASE, num_local_experts=4, num_experts_per_tok=2, head_dim=0,
                                                 sliding_window=3)),
    "qwen2_moe_only_and_step": (T.Qwen2MoeConfig, dict(BASE, **EXPERTS, num_experts=4, mlp_only_layers=[3],
                                                       decoder_sparse_step=2, head_dim=16)),
    "qwen3_moe_null_only": (T.Qwen3MoeConfig, dict(BASE, **EXPERTS, num_experts=4, mlp_only_layers=None,
                                                   decoder_sparse_step=3)),
    "qwen2_moe_windows": (T.Qwen2MoeConfig, dict(BASE, **EXPERTS, num_experts=4, use_sliding_window=True,
                                                 sliding_window=5, max_window_layers=4)),
    "olmoe_mha": (T.OlmoeConfig, {**{k: v for k, v in BASE.items() if k != "num_key_value_heads"}, "num_experts": 4,
                                  "num_experts_per_tok": 2}),
    "deepseek_v3_dense_first": (T.DeepseekV3Config, dict(BASE, **EXPERTS, **DEEPSEEK, first_k_dense_replace=2)),
    "deepseek_v2_default_first": (T.DeepseekV2Config, dict(BASE, **EXPERTS, **DEEPSEEK)),
    "glm4_moe": (T.Glm4MoeConfig, dict(BASE, **EXPERTS, n_routed_experts=4, n_shared_experts=1,
                                       first_k_dense_replace=1)),
    "llama4_interleave": (T.Llama4TextConfig, dict(BASE, head_dim=8, intermediate_size_mlp=40, num_local_experts=4,
                                                   num_experts_per_tok=1, interleave_moe_layer_step=3)),
    "llama4_listed": (T.Llama4TextConfig, dict(BASE, head_dim=8, intermediate_size_mlp=40, num_local_experts=4,
                                               num_experts_per_tok=1, moe_layers=[0, 4])),
    "gpt_oss": (T.GptOssConfig, dict(BASE, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=7)),
    "mistral": (T.MistralConfig, dict(BASE, sliding_window=9)),
}


def _windows(cfg) -> list[int | None]:
    """transformers' window per layer: its `layer_types` (chunked: attention_chunk_size), else the config-wide
    sliding_window."""
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return [getattr(cfg, "sliding_window", None) or None] * cfg.num_hidden_layers
    size = {"full_attention": None, "sliding_attention": getattr(cfg, "sliding_window", None),
            "chunked_attention": getattr(cfg, "attention_chunk_size", None)}
    return [size[t] for t in types]


@pytest.mark.parametrize("name", sorted(CASES))
def test_facts_match_the_model_transformers_builds(name):
    make, kwargs = CASES[name]
    cfg = make(**kwargs)
    model = T.AutoModelForCausalLM.from_config(cfg)
    layers = model.model.layers
    expected_moe = [any(n.endswith("experts") for n, _ in layer.named_modules()) for layer in layers]
    q = layers[0].self_attn.q_proj.weight.shape[0] if hasattr(layers[0].self_attn, "q_proj") else None
    for data in (cfg.to_dict(), {**kwargs, "model_type": cfg.model_type}):
        c = HFConfig(data, name)
        n, heads = c.int("num_hidden_layers"), c.int("num_attention_heads")
        assert moe_layers(c, n) == expected_moe
        assert layer_windows(c, n) == _windows(cfg)
        if q is not None and c.model_type not in ("deepseek_v2", "deepseek_v3"):
            hd = head_dim(c, c.int("hidden_size"), heads)
            assert hd * heads == q
            assert kv_heads(c, heads) * hd == layers[0].self_attn.k_proj.weight.shape[0]
