"""GraniteMoE (IBM Granite 3.x MoE): Mixtral's block with four multipliers and stacked expert tensors.

    h = embedding_multiplier · embed(ids)
    h = h + residual_multiplier · attn(norm(h)),  attention scores · attention_multiplier (not 1/sqrt(d))
    h = h + residual_multiplier · moe(norm(h)),   router: top-k of the logits, softmax over the chosen k
    logits = head(norm(h)) / logits_scaling

moelab: `ModelConfig.embed_scale`, `residual_scale`, `attn_scale`, `logits_scaling`; the router is
"topk_softmax" with norm_topk_prob (the softmax of the chosen logits is the renormalised top-k softmax).
Checkpoints store each layer's experts stacked: `block_sparse_moe.input_linear.weight` [E, 2F, D] (gate rows,
then up rows), `output_linear.weight` [E, D, F] and the router `router.layer.weight` [E, D]; transformers 5
holds them in memory as `experts.gate_up_proj` / `experts.down_proj` / `router.weight` (accepted on load).
"""

from __future__ import annotations

from typing import Any

from moelab.config.hf import HFConfig
from moelab.config.model import ModelConfig
from moelab.hf.adapters.base import Adapter, Check, Entry, gqa_checks, plain_moe_checks

_MULTIPLIERS = {"embedding_multiplier": "embed_scale", "residual_multiplier": "residual_scale",
                "logits_scaling": "logits_scaling", "attention_multiplier": "attn_scale"}


class GraniteMoe(Adapter):
    model_type, architecture = "granitemoe", "GraniteMoeForCausalLM"
    moe_prefix = "block_sparse_moe"
    options = frozenset(_MULTIPLIERS.values())

    def config_from_hf(self, c: HFConfig) -> ModelConfig:
        c.require("attention_bias", lambda v: v in (None, False), "false (attention biases are not implemented)")
        return super().config_from_hf(c)

    def moe_fields(self, c: HFConfig, n_experts: int) -> dict[str, Any]:
        """Top-k of the logits, softmax over the chosen ones: the renormalised top-k softmax."""
        return {"norm_topk_prob": True, "aux_loss_coef": c.float("router_aux_loss_coef", 0.0)}

    def model_fields(self, c: HFConfig) -> dict[str, Any]:
        """The four multipliers (transformers' defaults 1.0; attention_multiplier is the whole score scale)."""
        out = {}
        for hf_name, name in _MULTIPLIERS.items():
            value = c.float(hf_name, 1.0)
            if not value > 0:
                raise c.error(f"field {hf_name!r}={value!r} is invalid: allowed a number > 0")
            out[name] = value
        return out

    def moe_entries(self, cfg: ModelConfig, p: str, b: str) -> list[Entry]:
        m = cfg.moe
        E, D, F = m.n_experts, cfg.d_model, m.d_expert
        s = m.route_scale  # a softmax router has no routed scaling: fold moelab's into the down projections
        canonical = [Entry(p + "router.layer.weight", (E, D), b + "router.weight"),
                     Entry(p + "input_linear.weight", (E, 2 * F, D), b + "experts.w_in", None, (1, 2)),
                     Entry(p + "output_linear.weight", (E, D, F), b + "experts.w_out", None, (1, 2), scale=s)]
        aliases = [Entry(p + "router.weight", (E, D), b + "router.weight", covers=(p + "router.layer.weight",)),
                   Entry(p + "experts.gate_up_proj", (E, 2 * F, D), b + "experts.w_in", None, (1, 2),
                         covers=(p + "input_linear.weight",)),
                   Entry(p + "experts.down_proj", (E, D, F), b + "experts.w_out", None, (1, 2),
                         covers=(p + "output_linear.weight",), scale=s)]
        return canonical + aliases

    def requirements(self, cfg: ModelConfig) -> list[Check]:
        m = cfg.moe
        return [*gqa_checks(cfg), (m.router == "topk_softmax" and m.norm_topk_prob,
                                   "router must be 'topk_softmax' with norm_topk_prob=True"), *plain_moe_checks(cfg)]

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_width ** -0.5
        return {**self._base_hf(cfg), "intermediate_size": cfg.moe.d_expert, "num_local_experts": cfg.moe.n_experts,
                "attention_bias": False, "embedding_multiplier": cfg.embed_scale,
                "residual_multiplier": cfg.residual_scale, "logits_scaling": cfg.logits_scaling,
                "attention_multiplier": scale}
