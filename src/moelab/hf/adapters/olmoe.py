"""OLMoE (Muennighoff et al. 2024): q/k RMSNorm over all heads at once."""

from __future__ import annotations

from typing import Any

from moelab.config.hf import HFConfig
from moelab.config.model import ModelConfig
from moelab.hf.adapters.base import Adapter, Check, gqa_checks, plain_moe_checks


class Olmoe(Adapter):
    model_type, architecture = "olmoe", "OlmoeForCausalLM"
    norm_eps = 1e-5

    def config_from_hf(self, c: HFConfig) -> ModelConfig:
        c.require("clip_qkv", lambda v: v is None, "null (q/k/v clipping is not implemented)")
        return super().config_from_hf(c)

    def requirements(self, cfg: ModelConfig) -> list[Check]:
        return [*gqa_checks(cfg, qk_norm="full"), (cfg.moe.router == "topk_softmax", "router must be 'topk_softmax'"),
                (cfg.head_width == cfg.d_model // cfg.n_heads, "head_dim must be d_model // n_heads (OLMoE sizes "
                                                                "its q/k norms by hidden_size)"),
                *plain_moe_checks(cfg)]

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**self._base_hf(cfg), "intermediate_size": cfg.moe.d_expert, "num_experts": cfg.moe.n_experts,
                "norm_topk_prob": cfg.moe.norm_topk_prob, "attention_bias": False, "clip_qkv": None}

