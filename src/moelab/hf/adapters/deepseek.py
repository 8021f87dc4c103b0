"""DeepSeek-V3 (DeepSeek-AI 2024): multi-head latent attention, sigmoid router with a score-correction bias,
group-limited routing, shared experts, dense first layers; interleaved RoPE handled by permuting weight rows.
DeepSeek-V2 (DeepSeek-AI 2024, arXiv:2405.04434): the same attention (always interleaved RoPE) with a softmax
router, greedy or device-limited ("group_limited_greedy": group score = its best expert's probability)."""

from __future__ import annotations

from typing import Any

from moelab.config import hf_arch
from moelab.config.hf import HFConfig
from moelab.config.model import ModelConfig
from moelab.hf.adapters.base import Adapter, Check, Entry, ffn_entries


def _deinterleave(n: int) -> tuple[int, ...]:
    """Row order turning DeepSeek's interleaved rotary pairs (x0, x1), (x2, x3)... into rotate-half halves."""
    return tuple(range(0, n, 2)) + tuple(range(1, n, 2))



def mla_checks(cfg: ModelConfig) -> list[Check]:
    """Multi-head latent attention with the latent norms' eps transformers fixes."""
    return [(cfg.attention == "mla", "attention must be 'mla'"),
            (cfg.norm_eps == 1e-6, "norm_eps must be 1e-6 (transformers fixes the MLA latent norms' eps)")]


def deepseek_block_checks(cfg: ModelConfig, shared_required: bool) -> list[Check]:
    """DeepSeek's MoE block: ungated shared experts in multiples of d_expert, every layer after the dense ones."""
    m = cfg.moe
    return [((m.n_shared > 0 or not shared_required) and (m.n_shared == 0 or m.shared_width % m.d_expert == 0),
             "shared experts whose total width is a multiple of d_expert"),
            (not m.shared_gate, "shared_gate must be False"), (cfg.moe_every == 1, "moe_every must be 1")]

class DeepseekV3(Adapter):
    model_type, architecture = "deepseek_v3", "DeepseekV3ForCausalLM"
    has_route_scale = True

    def config_from_hf(self, c: HFConfig) -> ModelConfig:
        c.require("topk_method", lambda v: v in (None, "noaux_tc"), "'noaux_tc' (sigmoid + score-correction bias)")
        c.require("scoring_func", lambda v: v in (None, "sigmoid"), "'sigmoid'")
        c.require("moe_layer_freq", lambda v: v in (None, 1), "1")
        return super().config_from_hf(c)

    def moe_fields(self, c: HFConfig, n_experts: int) -> dict[str, Any]:
        """Sigmoid router with a score-correction bias, group-limited routing, routed scaling, shared experts."""
        n_groups, topk_groups = hf_arch.routing_groups(c, n_experts)
        return {"n_shared": hf_arch.shared_experts(c)[0], "router": "sigmoid", "expert_bias": True,
                "norm_topk_prob": c.bool("norm_topk_prob", True), "route_scale": c.float("routed_scaling_factor"),
                "n_groups": n_groups, "topk_groups": topk_groups, "aux_loss_coef": 0.0}

    def attention_fields(self, c: HFConfig, D: int, H: int) -> dict[str, Any]:
        """Multi-head latent attention (`num_key_value_heads`, unused by MLA, may only restate the heads)."""
        c.require("num_key_value_heads", lambda v: v in (None, H), f"equal to num_attention_heads ({H}) for MLA")
        w = hf_arch.mla_widths(c)
        if hf_arch.rotary_dim(c, w.qk_rope_head_dim) != w.qk_rope_head_dim:
            raise c.error("field 'partial_rotary_factor' is not supported by moelab for MLA: allowed 1.0")
        return {"n_kv_heads": H, "attention": "mla", "q_lora_rank": w.q_lora_rank, "kv_lora_rank": w.kv_lora_rank,
                "qk_nope_head_dim": w.qk_nope_head_dim, "qk_rope_head_dim": w.qk_rope_head_dim,
                "v_head_dim": w.v_head_dim}

    def interleaved(self, c: HFConfig | None) -> bool:
        """Whether the checkpoint's rotary rows are interleaved pairs: `rope_interleave` (default true, null
        false) on load; export writes rotate-half order (`rope_interleave` false)."""
        return c is not None and c.bool("rope_interleave", True, null=False)

    def attention_entries(self, cfg: ModelConfig, p: str, b: str, c: HFConfig | None) -> list[Entry]:
        D, H, R = cfg.d_model, cfg.n_heads, cfg.qk_rope_head_dim
        qk, r_kv = cfg.qk_nope_head_dim + R, cfg.kv_lora_rank
        interleave = self.interleaved(c)
        q_perm = kv_perm = None
        if interleave:  # rotary rows of each head (q) and the shared rotary key (kv_a) → rotate-half order
            rot = _deinterleave(R)
            nope = cfg.qk_nope_head_dim
            q_perm = tuple(h * qk + (j if j < nope else nope + rot[j - nope]) for h in range(H) for j in range(qk))
            kv_perm = tuple(range(r_kv)) + tuple(r_kv + i for i in rot)
        if cfg.q_lora_rank is None:
            out = [Entry(p + "q_proj.weight", (H * qk, D), b + "wq.weight", perm=q_perm)]
        else:
            r_q = cfg.q_lora_rank
            out = [Entry(p + "q_a_proj.weight", (r_q, D), b + "wq_a.weight"),
                   Entry(p + "q_a_layernorm.weight", (r_q,), b + "q_a_norm.weight"),
                   Entry(p + "q_b_proj.weight", (H * qk, r_q), b + "wq_b.weight", perm=q_perm)]
        return out + [
            Entry(p + "kv_a_proj_with_mqa.weight", (r_kv + R, D), b + "wkv_a.weight", perm=kv_perm),
            Entry(p + "kv_a_layernorm.weight", (r_kv,), b + "kv_a_norm.weight"),
            Entry(p + "kv_b_proj.weight", (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), r_kv), b + "wkv_b.weight"),
            Entry(p + "o_proj.weight", (D, H * cfg.v_head_dim), b + "wo.weight")]

    def moe_entries(self, cfg: ModelConfig, p: str, b: str) -> list[Entry]:
        out = super().moe_entries(cfg, p, b)
        out.append(Entry(p + "gate.e_score_correction_bias", (cfg.moe.n_experts,), b + "router.bias"))
        if cfg.moe.n_shared:
            out += ffn_entries(p + "shared_experts.", b + "shared.", cfg.d_model, cfg.moe.shared_width)
        return out

    def requirements(self, cfg: ModelConfig) -> list[Check]:
        m = cfg.moe
        return [*mla_checks(cfg), (m.router == "sigmoid", "router must be 'sigmoid'"),
                *deepseek_block_checks(cfg, shared_required=True),
                (m.n_experts // m.n_groups >= 2, "at least 2 experts per group (group score = sum of top-2)")]

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        m = cfg.moe
        return {**self._base_hf(cfg), "intermediate_size": cfg.d_ff, "moe_intermediate_size": m.d_expert,
                "n_routed_experts": m.n_experts, "n_shared_experts": m.shared_width // m.d_expert,
                "norm_topk_prob": m.norm_topk_prob, "routed_scaling_factor": m.route_scale, "n_group": m.n_groups,
                "topk_group": m.topk_groups, "first_k_dense_replace": cfg.n_dense_layers,
                "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
                "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
                "v_head_dim": cfg.v_head_dim, "head_dim": cfg.qk_rope_head_dim, "rope_interleave": False,
                "attention_bias": False, "num_nextn_predict_layers": 0}



class DeepseekV2(DeepseekV3):
    """DeepSeek-V2 / V2-Lite as transformers runs it: p = softmax(x·Wᵀ); the top-k of p (with
    topk_method "group_limited_greedy", within the topk_group groups of highest max p, §2.2.2); weights
    p_i (not renormalised: transformers' router has no norm_topk_prob) × routed_scaling_factor. moelab:
    "topk_softmax", norm_topk_prob False, route_scale, n_groups / topk_groups (group score = max logit,
    the same order as max p)."""

    model_type, architecture = "deepseek_v2", "DeepseekV2ForCausalLM"

    def config_from_hf(self, c: HFConfig) -> ModelConfig:
        c.require("topk_method", lambda v: v in (None, "greedy", "group_limited_greedy"),
                  "'greedy' or 'group_limited_greedy' (softmax routers)", "greedy")
        c.require("scoring_func", lambda v: v in (None, "softmax"), "'softmax'")
        c.require("norm_topk_prob", lambda v: v in (None, False), "false (transformers' DeepSeek-V2 router does "
                  "not renormalise the top-k weights)")
        c.require("attention_bias", lambda v: v in (None, False), "false (MLA projection biases are not implemented)")
        c.require("mlp_bias", lambda v: v in (None, False), "false (FFN biases are not implemented)")
        c.require("moe_layer_freq", lambda v: v in (None, 1), "1")
        return Adapter.config_from_hf(self, c)

    def moe_fields(self, c: HFConfig, n_experts: int) -> dict[str, Any]:
        n_groups, topk_groups = hf_arch.routing_groups(c, n_experts)
        return {"n_shared": hf_arch.shared_experts(c)[0], "router": "topk_softmax", "norm_topk_prob": False,
                "route_scale": c.float("routed_scaling_factor", 1.0), "n_groups": n_groups,
                "topk_groups": topk_groups, "aux_loss_coef": 0.0}

    def interleaved(self, c: HFConfig | None) -> bool:
        """transformers' DeepSeek-V2 always rotates interleaved pairs (complex multiplication)."""
        return True

    def moe_entries(self, cfg: ModelConfig, p: str, b: str) -> list[Entry]:
        out = Adapter.moe_entries(self, cfg, p, b)
        if cfg.moe.n_shared:
            out += ffn_entries(p + "shared_experts.", b + "shared.", cfg.d_model, cfg.moe.shared_width)
        return out

    def requirements(self, cfg: ModelConfig) -> list[Check]:
        m = cfg.moe
        return [*mla_checks(cfg), (m.router == "topk_softmax" and not m.norm_topk_prob,
                                   "router must be 'topk_softmax' with norm_topk_prob=False"),
                (not m.expert_bias, "expert_bias must be False"), *deepseek_block_checks(cfg, shared_required=False)]

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        m = cfg.moe
        groups = {"topk_method": "group_limited_greedy", "n_group": m.n_groups, "topk_group": m.topk_groups} \
            if m.n_groups > 1 else {"topk_method": "greedy", "n_group": 1, "topk_group": 1}
        return {**self._base_hf(cfg), "intermediate_size": cfg.d_ff, "moe_intermediate_size": m.d_expert,
                "n_routed_experts": m.n_experts, "n_shared_experts": m.shared_width // m.d_expert,
                "norm_topk_prob": False, "routed_scaling_factor": m.route_scale, **groups,
                "first_k_dense_replace": cfg.n_dense_layers, "q_lora_rank": cfg.q_lora_rank,
                "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
                "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
                "head_dim": cfg.qk_rope_head_dim, "attention_bias": False, "mlp_bias": False}
