"""GLM-4.5 / GLM-4.5-Air (`glm4_moe`, Zhipu AI 2025): DeepSeek-V3's MoE block under grouped-query attention.

MoE: sigmoid router with a score-correction bias (selection only), group-limited routing (n_group /
topk_group; group score = sum of its top-2 biased scores), top-k weights renormalised when norm_topk_prob
and scaled by routed_scaling_factor, shared experts, the first `first_k_dense_replace` layers dense.
Attention: grouped-query, biases on q/k/v only (`attention_bias`), optional per-head q/k RMSNorm
(`use_qk_norm`), RoPE over the first int(head_dim · partial_rotary_factor) channels of each head
(rotate-half; the factor defaults to 0.5) → `ModelConfig.rotary_dim`. Multi-token-prediction layers
(`model.layers.{num_hidden_layers}.*`) are skipped on load.
"""

from __future__ import annotations

from typing import Any

from moelab.config import hf_arch
from moelab.config.hf import HFConfig
from moelab.config.model import ModelConfig
from moelab.hf.adapters.base import Adapter, Check
from moelab.hf.adapters.deepseek import DeepseekV3, deepseek_block_checks


class Glm4Moe(DeepseekV3):
    """DeepSeek-V3's router, experts and tensor names; the attention is the base (GQA) one."""

    model_type, architecture = "glm4_moe", "Glm4MoeForCausalLM"
    options = frozenset({"rotary_dim"})
    norm_eps = 1e-5
    attention_fields = Adapter.attention_fields
    attention_entries = Adapter.attention_entries

    def config_from_hf(self, c: HFConfig) -> ModelConfig:
        return Adapter.config_from_hf(self, c)

    def moe_fields(self, c: HFConfig, n_experts: int) -> dict[str, Any]:
        """As DeepSeek-V3's, with GLM's defaults (routed_scaling_factor 1, no groups)."""
        n_groups, topk_groups = hf_arch.routing_groups(c, n_experts)
        return {"n_shared": hf_arch.shared_experts(c)[0], "router": "sigmoid", "expert_bias": True,
                "norm_topk_prob": c.bool("norm_topk_prob", True), "route_scale": c.float("routed_scaling_factor", 1.0),
                "n_groups": n_groups, "topk_groups": topk_groups, "aux_loss_coef": 0.0}

    def requirements(self, cfg: ModelConfig) -> list[Check]:
        m, hd = cfg.moe, cfg.head_width
        return [(cfg.attention == "gqa", "attention must be 'gqa'"),
                (cfg.qk_norm in ("none", "head"), "qk_norm must be 'none' or 'head'"),
                (m.router == "sigmoid", "router must be 'sigmoid'"), *deepseek_block_checks(cfg, shared_required=False),
                (m.n_groups == 1 or m.n_experts // m.n_groups >= 2,
                 "at least 2 experts per group (group score = sum of top-2)"),
                (cfg.rotary_dim is None or int(hd * (cfg.rotary_dim / hd)) == cfg.rotary_dim,
                 "rotary_dim / head width must round-trip through partial_rotary_factor")]

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        m, base = cfg.moe, self._base_hf(cfg)
        base["rope_parameters"].setdefault("partial_rotary_factor", 1.0)  # absent would mean GLM's 0.5
        return {**base, "intermediate_size": cfg.d_ff, "moe_intermediate_size": m.d_expert,
                "n_routed_experts": m.n_experts, "n_shared_experts": m.shared_width // m.d_expert,
                "norm_topk_prob": m.norm_topk_prob, "routed_scaling_factor": m.route_scale, "n_group": m.n_groups,
                "topk_group": m.topk_groups, "first_k_dense_replace": cfg.n_dense_layers,
                "attention_bias": cfg.qkv_bias, "use_qk_norm": cfg.qk_norm == "head", "num_nextn_predict_layers": 0}
