"""Mixtral (Jiang et al. 2024): softmax top-k router renormalised over the chosen experts, every layer MoE."""

from __future__ import annotations

from typing import Any

from moelab.config.hf import HFConfig
from moelab.config.model import ModelConfig
from moelab.hf.adapters.base import Adapter, Check, gqa_checks, plain_moe_checks


class Mixtral(Adapter):
    model_type, architecture = "mixtral", "MixtralForCausalLM"
    expert_names = ("w1", "w3", "w2")
    moe_prefix = "block_sparse_moe"
    norm_eps = 1e-5

    def moe_fields(self, c: HFConfig, n_experts: int) -> dict[str, Any]:
        """Mixtral always renormalises the top-k probabilities (no norm_topk_prob field)."""
        return {"norm_topk_prob": True, "aux_loss_coef": c.float("router_aux_loss_coef", 0.0)}

    def requirements(self, cfg: ModelConfig) -> list[Check]:
        return [*gqa_checks(cfg), (cfg.moe.router == "topk_softmax", "router must be 'topk_softmax'"),
                (cfg.moe.norm_topk_prob, "norm_topk_prob must be True"), *plain_moe_checks(cfg)]

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**self._base_hf(cfg), "intermediate_size": cfg.moe.d_expert, "num_local_experts": cfg.moe.n_experts,
                "sliding_window": None, "router_jitter_noise": 0.0}

