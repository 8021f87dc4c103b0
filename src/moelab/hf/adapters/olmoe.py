"""OLMoE (Muennighoff et al. 2024): q/k RMSNorm over all heads at once."""

from __future__ import annotations

from typing import Any

from moelab.config import ModelConfig
from moelab.hf.adapters.base import Adapter
from moelab.hf_config import HFConfig


class Olmoe(Adapter):
    model_type, architecture = "olmoe", "OlmoeForCausalLM"
    norm_eps = 1e-5

    def config_from_hf(self, c: HFConfig) -> ModelConfig:
        c.require("clip_qkv", lambda v: v is None, "null (q/k/v clipping is not implemented)")
        return super().config_from_hf(c)

    def mismatch(self, cfg: ModelConfig) -> str | None:
        if (why := self._common_mismatch(cfg)) is not None:
            return why
        m = cfg.moe
        checks = [(cfg.attention == "gqa", "attention must be 'gqa'"),
                  (cfg.qk_norm == "full", "qk_norm must be 'full'"),
                  (not cfg.qkv_bias, "qkv_bias must be False"),
                  (m.router == "topk_softmax", "router must be 'topk_softmax'"),
                  (m.n_shared == 0, "n_shared must be 0"),
                  (cfg.head_width == cfg.d_model // cfg.n_heads, "head_dim must be d_model // n_heads (OLMoE sizes "
                                                                  "its q/k norms by hidden_size)"),
                  (cfg.n_dense_layers == 0 and cfg.moe_every == 1, "every layer must be MoE"),
                  (m.n_groups == 1 and not m.expert_bias, "no group-limited routing or expert bias")]
        return next((why for ok, why in checks if not ok), None)

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**self._base_hf(cfg), "intermediate_size": cfg.moe.d_expert, "num_experts": cfg.moe.n_experts,
                "norm_topk_prob": cfg.moe.norm_topk_prob, "attention_bias": False, "clip_qkv": None}

