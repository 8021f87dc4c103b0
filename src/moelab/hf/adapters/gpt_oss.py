"""gpt-oss (OpenAI 2025): attention sinks, alternating sliding-window / full attention, biases, clamped SwiGLU.

Attention: grouped-query with biases on q/k/v/o (`attention_bias`, default true), one sink logit per head
(`self_attn.sinks`), a `sliding_window` on the layers `layer_types` marks "sliding_attention" (by default
the even ones) → `ModelConfig.o_bias`, `attn_sinks`, `sliding_window`, `sliding_every` (the layer types
must alternate regularly: windowed layers every k-th from layer 0).
MoE: router logits x·Wᵀ + b, top-k of them, softmax over the chosen k ("topk_softmax" with
norm_topk_prob, `MoEConfig.biases`); experts with biases and the clamped SwiGLU (`moelab.layer.biased_experts`),
stored stacked: `experts.gate_up_proj` [E, D, 2F] (gate and up interleaved), `gate_up_proj_bias` [E, 2F],
`down_proj` [E, F, D], `down_proj_bias` [E, D]. The published checkpoints hold the two expert matrices in
MXFP4 (`*_blocks` + `*_scales`), dequantized on load (`moelab.hf.mxfp4`); export writes them unquantized.
"""

from __future__ import annotations

from typing import Any

from moelab.config import hf_arch
from moelab.config.hf import HFConfig
from moelab.config.model import ModelConfig
from moelab.hf.adapters.base import Adapter, Check, Entry, gqa_checks, plain_moe_checks
from moelab.hf.mxfp4 import dequantize_mxfp4
from moelab.layer.biased_experts import ALPHA, LIMIT


class GptOss(Adapter):
    model_type, architecture = "gpt_oss", "GptOssForCausalLM"
    options = frozenset({"o_bias", "attn_sinks", "sliding_window", "sliding_every", "moe.biases"})
    norm_eps = 1e-5

    def config_from_hf(self, c: HFConfig) -> ModelConfig:
        c.require("swiglu_alpha", lambda v: v in (None, ALPHA), f"{ALPHA} (moelab's clamped SwiGLU)")
        c.require("swiglu_limit", lambda v: v in (None, LIMIT), f"{LIMIT} (moelab's clamped SwiGLU)")
        if not (c.raw("rope_parameters") or c.raw("rope_scaling")):
            raise c.error("field 'rope_parameters' is missing: transformers' gpt-oss default (YaRN, factor 32 over "
                          "4096 positions) is not assumed; write it out")
        return super().config_from_hf(c)

    def moe_fields(self, c: HFConfig, n_experts: int) -> dict[str, Any]:
        """Top-k of the biased logits, softmax over the chosen: renormalised top-k softmax with router biases."""
        return {"norm_topk_prob": True, "biases": True, "activation": "clamped_swiglu",
                "aux_loss_coef": c.float("router_aux_loss_coef", 0.0)}

    def model_fields(self, c: HFConfig) -> dict[str, Any]:
        n_layers = c.int("num_hidden_layers")
        windows = hf_arch.layer_windows(c, n_layers)
        sizes = {w for w in windows if w is not None}
        out = {"o_bias": hf_arch.attention_biases(c)[1], "attn_sinks": True}
        if not sizes:
            return out
        (size,), every = sizes, next((i for i in range(1, n_layers) if windows[i] is not None), n_layers)
        if windows[0] is None or any((w is not None) != (i % every == 0) for i, w in enumerate(windows)):
            raise c.error(f"field 'layer_types' is not supported by moelab: allowed sliding_attention on layers 0, k, "
                          f"2k, ... and full_attention on the rest (got windows {windows})")
        return out | {"sliding_window": size, "sliding_every": every}

    def moe_entries(self, cfg: ModelConfig, p: str, b: str) -> list[Entry]:
        m = cfg.moe
        E, D, F = m.n_experts, cfg.d_model, m.d_expert
        s = m.route_scale  # gpt-oss has no routed scaling: fold moelab's into the down projection and its bias
        q, t = p + "experts.", b + "experts."
        out = [Entry(p + "router.weight", (E, D), b + "router.weight"),
               Entry(p + "router.bias", (E,), b + "router.logit_bias"),
               Entry(q + "gate_up_proj", (E, D, 2 * F), t + "w_in"),
               Entry(q + "gate_up_proj_bias", (E, 2 * F), t + "b_in"),
               Entry(q + "down_proj", (E, F, D), t + "w_out", scale=s),
               Entry(q + "down_proj_bias", (E, D), t + "b_out", scale=s)]
        if D % 32 == 0 and F % 32 == 0:  # the published MXFP4 form (blocks of 32 values along the input)
            for name, rows, cols, target, scale in (("gate_up_proj", 2 * F, D, "w_in", 1.0),
                                                    ("down_proj", D, F, "w_out", s)):
                pair = (q + name + "_blocks", q + name + "_scales")
                out += [Entry(pair[0], (E, rows, cols // 32, 16), t + target, None, (1, 2), covers=(q + name,),
                              scale=scale, pair=pair, decode=dequantize_mxfp4),
                        Entry(pair[1], (E, rows, cols // 32), t + target, None, (1, 2), covers=(q + name,),
                              scale=scale, pair=pair, decode=dequantize_mxfp4)]
        return out

    def requirements(self, cfg: ModelConfig) -> list[Check]:
        m = cfg.moe
        return [*gqa_checks(cfg, qkv_bias=None),
                (cfg.qkv_bias == cfg.o_bias, "qkv_bias and o_bias must be equal (attention_bias)"),
                (cfg.attn_sinks, "attn_sinks must be True"),
                (m.biases and m.router == "topk_softmax" and m.norm_topk_prob,
                 "moe.biases with a 'topk_softmax' router and norm_topk_prob=True"), *plain_moe_checks(cfg)]

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        m = cfg.moe
        types = ["full_attention" if cfg.layer_window(i) is None else "sliding_attention" for i in range(cfg.n_layers)]
        return {**self._base_hf(cfg), "intermediate_size": m.d_expert, "num_local_experts": m.n_experts,
                "attention_bias": cfg.qkv_bias, "sliding_window": cfg.sliding_window or cfg.max_seq_len,
                "layer_types": types, "swiglu_alpha": ALPHA, "swiglu_limit": LIMIT,
                "router_aux_loss_coef": m.aux_loss_coef}
