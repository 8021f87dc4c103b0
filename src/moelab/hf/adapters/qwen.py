"""Qwen2-MoE (sigmoid-gated shared expert, q/k/v biases) and Qwen3-MoE (per-head q/k norm)."""

from __future__ import annotations

from typing import Any

from moelab.config import hf_arch
from moelab.config.hf import HFConfig
from moelab.config.model import ModelConfig
from moelab.hf.adapters.base import Adapter, Check, Entry, ffn_entries, gqa_checks


class _Qwen(Adapter):
    """Shared parts of Qwen2-MoE and Qwen3-MoE (their layer layout is `hf_arch.moe_layers`)."""

    def _qwen_checks(self, cfg: ModelConfig) -> list[Check]:
        m = cfg.moe
        return [(m.router == "topk_softmax", "router must be 'topk_softmax'"),
                (m.n_groups == 1 and not m.expert_bias, "no group-limited routing or expert bias")]

    def _qwen_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**self._base_hf(cfg), "num_experts": cfg.moe.n_experts, "moe_intermediate_size": cfg.moe.d_expert,
                "intermediate_size": cfg.d_ff, "norm_topk_prob": cfg.moe.norm_topk_prob, "decoder_sparse_step": 1,
                "mlp_only_layers": [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)],
                "use_sliding_window": False, "sliding_window": None}


class Qwen2Moe(_Qwen):
    model_type, architecture = "qwen2_moe", "Qwen2MoeForCausalLM"

    def moe_fields(self, c: HFConfig, n_experts: int) -> dict[str, Any]:
        """One shared expert of shared_expert_intermediate_size behind a sigmoid gate."""
        c.require("shared_expert_intermediate_size", lambda v: v != 0, "an integer >= 1 (moelab's Qwen2-MoE "
                  "has its shared expert)")
        _, width = hf_arch.shared_experts(c)
        return {**super().moe_fields(c, n_experts), "n_shared": 1, "d_shared": width, "shared_gate": True}

    def moe_entries(self, cfg: ModelConfig, p: str, b: str) -> list[Entry]:
        out = super().moe_entries(cfg, p, b)
        if cfg.moe.n_shared:
            out += ffn_entries(p + "shared_expert.", b + "shared.", cfg.d_model, cfg.moe.shared_width)
            out.append(Entry(p + "shared_expert_gate.weight", (1, cfg.d_model), b + "shared_gate.weight"))
        return out

    def requirements(self, cfg: ModelConfig) -> list[Check]:
        return [*gqa_checks(cfg, qkv_bias=None), *self._qwen_checks(cfg),
                (bool(cfg.moe.n_shared) and cfg.moe.shared_gate, "needs shared experts with shared_gate=True")]

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**self._qwen_hf(cfg), "qkv_bias": cfg.qkv_bias, "shared_expert_intermediate_size": cfg.moe.shared_width,
                "layer_types": ["full_attention"] * cfg.n_layers}


class Qwen3Moe(_Qwen):
    model_type, architecture = "qwen3_moe", "Qwen3MoeForCausalLM"

    def requirements(self, cfg: ModelConfig) -> list[Check]:
        return [*gqa_checks(cfg, qk_norm="head"), *self._qwen_checks(cfg),
                (cfg.moe.n_shared == 0, "n_shared must be 0")]

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**self._qwen_hf(cfg), "attention_bias": False}

