"""Hugging Face `config.json` → `ModelSpec`, one function per `model_type`, without torch or transformers.

Each adapter mirrors the module layout of the matching `transformers` model class (the tests build
that class from a tiny config and compare `sum(p.numel())`), so a count here is what loading the
checkpoint with `transformers` would hold.

Fields (read through `hf_fields.Fields`): sizes (widths, layer/head/expert counts) are required — a
missing one raises ValueError naming it. Flags that `transformers` documents with a default (e.g.
`tie_word_embeddings=False`, `attention_bias=False`) take that default when absent, written at the
call site (`f.bool("attention_bias", False)`), and the ModelSpec notes which were used. Where
`transformers` derives a field from others when it is absent (`num_key_value_heads` →
`num_attention_heads` for Llama, `head_dim` → hidden // heads), so do we, and say so in the notes.
A field whose null has a meaning (DeepSeek's `q_lora_rank`) must be present.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moelab.accounting.hf_fields import REQUIRED, Fields, read_config_json, sub_fields
from moelab.accounting.spec import AttentionSpec, ExpertBank, FFNSpec, LayerSpec, ModelSpec, swiglu_params
from moelab.config import ModelConfig

# -- building blocks ---------------------------------------------------------------------------------


def gqa(d: int, heads: int, kv_heads: int, head_dim: int, *, qkv_bias: bool = False, o_bias: bool = False,
        qk_norm: str = "none", sinks: bool = False, window: int | None = None) -> AttentionSpec:
    """Grouped-query attention (Ainslie et al. 2023): q d×H·hd, k and v d×H_kv·hd, o H·hd×d (+ biases).

    qk_norm "head": RMSNorm over each head's width, weights [hd] for q and for k (Qwen3, GLM-4.5);
    "full": over all heads, weights [H·hd] and [H_kv·hd] (OLMoE). sinks: one learned logit per head
    (gpt-oss).
    """
    q, kv = heads * head_dim, kv_heads * head_dim
    params = d * q + 2 * d * kv + q * d
    if qkv_bias:
        params += q + 2 * kv
    if o_bias:
        params += d
    if sinks:
        params += heads
    norms = {"none": 0, "head": 2 * head_dim, "full": q + kv}[qk_norm]
    return AttentionSpec(params=params, norms=norms, n_heads=heads, qk_head_dim=head_dim, v_head_dim=head_dim,
                         kv_cache_width=2 * kv, window=window, kind="gqa")


def mla(f: Fields, d: int, heads: int, *, bias: bool) -> AttentionSpec:
    """Multi-head latent attention (DeepSeek-V2 §2.1, arXiv:2405.04434), transformers' layout.

    q: d×r_q → RMSNorm(r_q) → r_q×H·(nope+rope), or d×H·(nope+rope) when q_lora_rank is null;
    kv: d×(r_kv+rope) → RMSNorm(r_kv) → r_kv×H·(nope+v); o: H·v×d. bias (attention_bias) adds biases
    to the two down-projections and o. The cache holds r_kv + rope per token (eq. 9-10: c_KV and k_R).
    """
    r_q = f.opt_int("q_lora_rank")
    r_kv, nope = f.int("kv_lora_rank"), f.int("qk_nope_head_dim", minimum=0)
    rope, v = f.int("qk_rope_head_dim"), f.int("v_head_dim")
    qk = nope + rope
    if r_q is None:
        q, q_norm = d * heads * qk, 0
    else:
        q, q_norm = d * r_q + (r_q if bias else 0) + r_q * heads * qk, r_q
    params = (q + d * (r_kv + rope) + (r_kv + rope if bias else 0) + r_kv * heads * (nope + v)
              + heads * v * d + (d if bias else 0))
    return AttentionSpec(params=params, norms=q_norm + r_kv, n_heads=heads, qk_head_dim=qk, v_head_dim=v,
                         kv_cache_width=r_kv + rope, kind="mla")


def _windows(f: Fields, n_layers: int, rule: Callable[[int], str], size: int | None) -> list[int | None]:
    """Per-layer attention span: `layer_types` if the config lists it, else transformers' rule."""
    types = f.str_list("layer_types", n_layers, ("full_attention", "sliding_attention", "chunked_attention"))
    if types is None:
        types = [rule(i) for i in range(n_layers)]
    return [None if t == "full_attention" else size for t in types]


def _embeddings(f: Fields, d: int, *, tie_default: bool, head_bias: bool = False) -> tuple[int, int, int, bool]:
    vocab = f.int("vocab_size")
    tied = f.bool("tie_word_embeddings", tie_default)
    head = 0 if tied else vocab * d + (vocab if head_bias else 0)
    return vocab, vocab * d, head, tied


def _spec(f: Fields, name: str, d: int, layers: list[LayerSpec], *, tie_default: bool, head_bias: bool = False,
          final_norm: int | None = None, **extra: Any) -> ModelSpec:
    vocab, emb, head, tied = _embeddings(f, d, tie_default=tie_default, head_bias=head_bias)
    return ModelSpec(name=name, model_type=f.model_type, vocab_size=vocab, d_model=d, input_embedding=emb,
                     output_head=head, tied=tied, final_norm=d if final_norm is None else final_norm,
                     layers=tuple(layers), notes=f.notes(), **extra)


# -- adapters ----------------------------------------------------------------------------------------

def _dense(f: Fields, name: str) -> ModelSpec:
    """Llama, Mistral, Qwen2, Qwen3 (dense; every parameter active)."""
    mt = f.model_type
    d, n_layers = f.int("hidden_size"), f.int("num_hidden_layers")
    heads, ff = f.int("num_attention_heads"), f.int("intermediate_size")
    mlp_bias = False
    if mt == "llama":
        kv, hd = f.kv_heads_or_mha(heads), f.head_dim(d, heads)
        qkv_bias = o_bias = f.bool("attention_bias", False)
        mlp_bias = f.bool("mlp_bias", False)
        qk_norm, windows = "none", [None] * n_layers
    elif mt == "mistral":
        kv, hd = f.int("num_key_value_heads"), f.head_dim(d, heads, falsy_means_absent=True)
        qkv_bias = o_bias = False
        qk_norm, windows = "none", [f.opt_int("sliding_window", 4096)] * n_layers
    else:  # qwen2, qwen3
        kv = f.int("num_key_value_heads")
        hd = f.head_dim(d, heads) if mt == "qwen2" else f.int("head_dim")
        qkv_bias = True if mt == "qwen2" else f.bool("attention_bias", False)
        o_bias = False if mt == "qwen2" else qkv_bias
        qk_norm = "none" if mt == "qwen2" else "head"
        windows = _qwen_windows(f, n_layers)
    ffn = FFNSpec(dense=swiglu_params(d, ff) + (2 * ff + d if mlp_bias else 0))
    layers = [LayerSpec(gqa(d, heads, kv, hd, qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm, window=w), ffn, 2 * d)
              for w in windows]
    return _spec(f, name, d, layers, tie_default=False)


def _qwen_windows(f: Fields, n_layers: int) -> list[int | None]:
    """Qwen sliding windows: off unless use_sliding_window (false in every released Qwen config).

    When on, transformers' rules: Qwen2/Qwen3 window layers i >= max_window_layers; Qwen2-MoE layers
    with odd i + 1 and i < max_window_layers; Qwen3-MoE every layer. An explicit `layer_types` wins.
    """
    if not f.bool("use_sliding_window", False):
        return [None] * n_layers
    size = f.int("sliding_window")
    mt = f.model_type
    if mt == "qwen3_moe":
        return [size] * n_layers
    max_window = f.int("max_window_layers")
    if mt == "qwen2_moe":
        return _windows(f, n_layers, lambda i: "sliding_attention" if (i + 1) % 2 and i < max_window
                        else "full_attention", size)
    return _windows(f, n_layers, lambda i: "sliding_attention" if i >= max_window else "full_attention", size)


def _mixtral_like(f: Fields, name: str) -> ModelSpec:
    """Mixtral, PhiMoE, GraniteMoE: GQA + top-k routed SwiGLU experts in every layer, no shared experts."""
    mt = f.model_type
    d, n_layers, heads = f.int("hidden_size"), f.int("num_hidden_layers"), f.int("num_attention_heads")
    f_e, n_e, k = f.int("intermediate_size"), f.int("num_local_experts"), f.int("num_experts_per_tok")
    kv = f.kv_heads_or_mha(heads) if mt == "granitemoe" else f.int("num_key_value_heads")
    hd = f.head_dim(d, heads, falsy_means_absent=(mt == "mixtral"))  # Mixtral: `head_dim or hidden // heads`
    bias = False if mt == "mixtral" else f.bool("attention_bias", False)
    window = f.opt_int("sliding_window", None) if mt in ("mixtral", "phimoe") else None
    layer_norm = 4 * d if mt == "phimoe" else 2 * d  # PhiMoE: LayerNorm with bias
    experts = ExpertBank(n=n_e, top_k=k, params_each=swiglu_params(d, f_e), router=n_e * d)
    layers = [LayerSpec(gqa(d, heads, kv, hd, qkv_bias=bias, o_bias=bias, window=window), FFNSpec(experts=experts),
                        layer_norm) for _ in range(n_layers)]
    head_bias = f.bool("lm_head_bias", False) if mt == "phimoe" else False
    return _spec(f, name, d, layers, tie_default=False, head_bias=head_bias,
                 final_norm=2 * d if mt == "phimoe" else d)


def _qwen_moe(f: Fields, name: str) -> ModelSpec:
    """Qwen2-MoE (shared expert + sigmoid gate, qkv bias) and Qwen3-MoE (head q/k norm, no shared expert).

    A layer is MoE when it is not in `mlp_only_layers` and (i + 1) % decoder_sparse_step == 0
    (transformers' Qwen2MoeDecoderLayer); other layers use a dense SwiGLU of `intermediate_size`.
    """
    qwen2 = f.model_type == "qwen2_moe"
    d, n_layers, heads = f.int("hidden_size"), f.int("num_hidden_layers"), f.int("num_attention_heads")
    kv, hd = f.int("num_key_value_heads"), f.head_dim(d, heads)
    ff, f_e = f.int("intermediate_size"), f.int("moe_intermediate_size")
    n_e, k = f.int("num_experts", minimum=0), f.int("num_experts_per_tok")
    step = f.int("decoder_sparse_step", 1)
    mlp_only = set(f.int_list("mlp_only_layers", []))
    if qwen2:
        bias = f.bool("qkv_bias", True)
        shared = swiglu_params(d, f.int("shared_expert_intermediate_size", minimum=0)) + d  # + sigmoid gate d×1
        attention = gqa(d, heads, kv, hd, qkv_bias=bias)
    else:
        bias, shared = f.bool("attention_bias", False), 0
        attention = gqa(d, heads, kv, hd, qkv_bias=bias, o_bias=bias, qk_norm="head")
    windows = _qwen_windows(f, n_layers)
    layers = []
    for i, w in enumerate(windows):
        att = dataclasses.replace(attention, window=w)
        if i not in mlp_only and n_e > 0 and (i + 1) % step == 0:
            ffn = FFNSpec(experts=ExpertBank(n=n_e, top_k=k, params_each=swiglu_params(d, f_e), router=n_e * d),
                          shared=shared)
        else:
            ffn = FFNSpec(dense=swiglu_params(d, ff))
        layers.append(LayerSpec(att, ffn, 2 * d))
    return _spec(f, name, d, layers, tie_default=False)


def _olmoe(f: Fields, name: str) -> ModelSpec:
    """OLMoE (Muennighoff et al. 2024): full-width q/k RMSNorm, 64 experts top-8, no shared experts."""
    d, n_layers, heads = f.int("hidden_size"), f.int("num_hidden_layers"), f.int("num_attention_heads")
    kv, hd = f.kv_heads_or_mha(heads), f.head_dim(d, heads)
    bias = f.bool("attention_bias", False)
    n_e, k, f_e = f.int("num_experts"), f.int("num_experts_per_tok"), f.int("intermediate_size")
    experts = ExpertBank(n=n_e, top_k=k, params_each=swiglu_params(d, f_e), router=n_e * d)
    layers = [LayerSpec(gqa(d, heads, kv, hd, qkv_bias=bias, o_bias=bias, qk_norm="full"), FFNSpec(experts=experts),
                        2 * d) for _ in range(n_layers)]
    return _spec(f, name, d, layers, tie_default=False)


def _deepseek(f: Fields, name: str) -> ModelSpec:
    """DeepSeek-V2, DeepSeek-V3 and Kimi-K2: MLA, shared experts, dense first layers, MTP modules.

    Layer i is MoE when i >= first_k_dense_replace and i % moe_layer_freq == 0 (DeepSeek's reference
    modeling code; every released config has moe_layer_freq = 1). MTP (DeepSeek-V3 §2.2): each of the
    num_nextn_predict_layers modules is one more MoE block plus M ∈ R^{d×2d} and three RMSNorms
    (h, embedding, and the shared head's); embedding and output head are shared with the main model.
    """
    v2 = f.model_type == "deepseek_v2"
    d, n_layers, heads = f.int("hidden_size"), f.int("num_hidden_layers"), f.int("num_attention_heads")
    ff, f_e = f.int("intermediate_size"), f.int("moe_intermediate_size")
    n_e, k = f.int("n_routed_experts"), f.int("num_experts_per_tok")
    n_shared = f.opt_int("n_shared_experts", minimum=0) or 0
    first_dense = f.int("first_k_dense_replace", 0 if v2 else REQUIRED, minimum=0)
    freq = f.int("moe_layer_freq", 1)
    bias = f.bool("attention_bias", False)
    mlp_bias = f.bool("mlp_bias", False) if v2 else False
    attention = mla(f, d, heads, bias=bias)

    def mlp(width: int) -> int:
        return swiglu_params(d, width) + (2 * width + d if mlp_bias else 0)

    n_group, topk_group = _routing_groups(f)
    moe = FFNSpec(experts=ExpertBank(n=n_e, top_k=k, params_each=swiglu_params(d, f_e), router=n_e * d,
                                  n_groups=n_group, topk_groups=topk_group),
                  shared=mlp(n_shared * f_e) if n_shared else 0)
    layers = [LayerSpec(attention, moe if i >= first_dense and i % freq == 0 else FFNSpec(dense=mlp(ff)), 2 * d)
              for i in range(n_layers)]
    n_mtp = 0 if v2 else f.int("num_nextn_predict_layers", 1, minimum=0)
    return _spec(f, name, d, layers, tie_default=False, mtp_layers=tuple(LayerSpec(attention, moe, 2 * d)
                                                                      for _ in range(n_mtp)),
                 mtp_extra=n_mtp * (2 * d * d + 3 * d))


def _routing_groups(f: Fields) -> tuple[int, int]:
    """(n_group, topk_group) of DeepSeek's group-limited routing (V2 §2.2.2 device-limited, V3 §2.1.2
    node-limited): a token's experts lie in at most topk_group of n_group groups. (1, 1) — no limit —
    when either field is absent or null or `topk_method` is "greedy" (DeepSeek-V2-Lite). Only the
    expert-parallel traffic model uses it; parameter counts do not."""
    if f.data.get("topk_method") == "greedy" or f.data.get("n_group") is None or f.data.get("topk_group") is None:
        return 1, 1
    return f.int("n_group"), f.int("topk_group")


def _glm4_moe(f: Fields, name: str) -> ModelSpec:
    """GLM-4.5 (glm4_moe): GQA with q/k/v bias and optional head q/k norm, DeepSeek-style MoE and MTP."""
    d, n_layers, heads = f.int("hidden_size"), f.int("num_hidden_layers"), f.int("num_attention_heads")
    kv, hd = f.int("num_key_value_heads"), f.head_dim(d, heads)
    ff, f_e = f.int("intermediate_size"), f.int("moe_intermediate_size")
    n_e, k = f.int("n_routed_experts"), f.int("num_experts_per_tok")
    n_shared, first_dense = f.int("n_shared_experts", minimum=0), f.int("first_k_dense_replace", minimum=0)
    attention = gqa(d, heads, kv, hd, qkv_bias=f.bool("attention_bias", False),
                    qk_norm="head" if f.bool("use_qk_norm", False) else "none")
    n_group, topk_group = _routing_groups(f)
    moe = FFNSpec(experts=ExpertBank(n=n_e, top_k=k, params_each=swiglu_params(d, f_e), router=n_e * d,
                                  n_groups=n_group, topk_groups=topk_group),
                  shared=swiglu_params(d, n_shared * f_e))
    layers = [LayerSpec(attention, moe if i >= first_dense else FFNSpec(dense=swiglu_params(d, ff)), 2 * d)
              for i in range(n_layers)]
    n_mtp = f.int("num_nextn_predict_layers", 1, minimum=0)
    return _spec(f, name, d, layers, tie_default=False, mtp_layers=tuple(LayerSpec(attention, moe, 2 * d)
                                                                      for _ in range(n_mtp)),
                 mtp_extra=n_mtp * (2 * d * d + 3 * d))


def _dbrx(f: Fields, name: str) -> ModelSpec:
    """DBRX: fused Wqkv, bias-free LayerNorms, 16 experts top-4 (fine-grained, Databricks 2024)."""
    d, n_layers, heads = f.int("d_model"), f.int("n_layers"), f.int("n_heads")
    attn = sub_fields(f, "attn_config")
    ffn = sub_fields(f, "ffn_config")
    kv = attn.int("kv_n_heads")
    if d % heads:
        raise f.error(f"d_model={d} is not divisible by n_heads={heads}")
    hd = d // heads
    f_e, n_e, k = ffn.int("ffn_hidden_size"), ffn.int("moe_num_experts"), ffn.int("moe_top_k")
    experts = ExpertBank(n=n_e, top_k=k, params_each=swiglu_params(d, f_e), router=n_e * d)
    layers = [LayerSpec(gqa(d, heads, kv, hd), FFNSpec(experts=experts), 2 * d) for _ in range(n_layers)]
    f.defaults_used += attn.defaults_used + ffn.defaults_used
    return _spec(f, name, d, layers, tie_default=False)


def _gpt_oss(f: Fields, name: str) -> ModelSpec:
    """gpt-oss (OpenAI 2025): attention with biases and sinks, alternating 128-token sliding windows,
    experts with biases, a router with bias."""
    d, n_layers, heads = f.int("hidden_size"), f.int("num_hidden_layers"), f.int("num_attention_heads")
    kv, hd = f.int("num_key_value_heads"), f.int("head_dim")
    f_e, n_e, k = f.int("intermediate_size"), f.int("num_local_experts"), f.int("num_experts_per_tok")
    bias = f.bool("attention_bias", True)
    window = f.int("sliding_window", 128)
    windows = _windows(f, n_layers, lambda i: "sliding_attention" if (i + 1) % 2 else "full_attention", window)
    expert = d * 2 * f_e + 2 * f_e + f_e * d + d  # gate_up [d, 2f] + bias, down [f, d] + bias
    experts = ExpertBank(n=n_e, top_k=k, params_each=expert, router=n_e * d + n_e)
    layers = [LayerSpec(gqa(d, heads, kv, hd, qkv_bias=bias, o_bias=bias, sinks=True, window=w),
                        FFNSpec(experts=experts), 2 * d) for w in windows]
    return _spec(f, name, d, layers, tie_default=False)


def _llama4(f: Fields, name: str) -> ModelSpec:
    """Llama 4 (Meta 2025): routed top-1 experts + a shared expert, MoE every `interleave_moe_layer_step`
    layers (dense SwiGLU of intermediate_size_mlp otherwise), chunked attention on RoPE layers, and —
    for the multimodal `llama4` config — a vision encoder counted apart (`vision`)."""
    vision = 0
    if f.model_type == "llama4":
        vision_fields = sub_fields(f, "vision_config")
        text = sub_fields(f, "text_config")
        d = text.int("hidden_size")
        vision = _llama4_vision(vision_fields, d)
        spec = _llama4_text(text, name)
        return dataclasses.replace(spec, vision=vision, notes=spec.notes + vision_fields.notes())
    return _llama4_text(f, name)


def _llama4_text(f: Fields, name: str) -> ModelSpec:
    d, n_layers, heads = f.int("hidden_size"), f.int("num_hidden_layers"), f.int("num_attention_heads")
    kv, hd = f.int("num_key_value_heads"), f.int("head_dim")
    f_e, ff = f.int("intermediate_size"), f.int("intermediate_size_mlp")
    n_e, k = f.int("num_local_experts"), f.int("num_experts_per_tok")
    bias = f.bool("attention_bias", False)
    moe_layers = f.data.get("moe_layers")
    if moe_layers is None:
        step = f.int("interleave_moe_layer_step", 1)
        moe_layers = list(range(step - 1, n_layers, step))
    else:
        moe_layers = f.int_list("moe_layers")
    no_rope = f.data.get("no_rope_layers")
    if not no_rope:  # transformers: 1 (RoPE + chunked attention) except every no_rope_layer_interval-th layer
        interval = f.int("no_rope_layer_interval", 4)
        no_rope = [int((i + 1) % interval != 0) for i in range(n_layers)]
    elif len(f.int_list("no_rope_layers")) != n_layers:
        raise f.error(f"field 'no_rope_layers' must list num_hidden_layers={n_layers} values")
    chunk = f.opt_int("attention_chunk_size", 8192)
    windows = _windows(f, n_layers, lambda i: "chunked_attention" if no_rope[i] else "full_attention", chunk)
    moe = FFNSpec(experts=ExpertBank(n=n_e, top_k=k, params_each=swiglu_params(d, f_e), router=n_e * d),
                  shared=swiglu_params(d, f_e))
    dense = FFNSpec(dense=swiglu_params(d, ff))
    layers = [LayerSpec(gqa(d, heads, kv, hd, qkv_bias=bias, o_bias=bias, window=w),
                        moe if i in set(moe_layers) else dense, 2 * d) for i, w in enumerate(windows)]
    return _spec(f, name, d, layers, tie_default=False)


def _llama4_vision(v: Fields, text_d: int) -> int:
    """Llama 4 vision encoder + adapter + projector, as in transformers' Llama4VisionModel.

    class embedding h; position embedding ((image/patch)² + 1)·h; patch projection h·c·p² (no bias);
    pre/post LayerNorms 4h; per layer 4(h² + h) attention, h·I + I + I·h + h MLP, 4h LayerNorms;
    pixel-shuffle MLP I·P_in + P_out² (no biases); projector vision_output_dim × text d (no bias).
    """
    h, inter, n = v.int("hidden_size"), v.int("intermediate_size"), v.int("num_hidden_layers")
    image, patch, chans = v.int("image_size"), v.int("patch_size"), v.int("num_channels", 3)
    p_in, p_out, out = v.int("projector_input_dim"), v.int("projector_output_dim"), v.int("vision_output_dim")
    layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 4 * h
    return (h + ((image // patch) ** 2 + 1) * h + h * chans * patch * patch + 4 * h + n * layer
            + inter * p_in + p_out * p_out + out * text_d)


def _jetmoe(f: Fields, name: str) -> ModelSpec:
    """JetMoE (Shen et al. 2024): mixture of attention heads (MoA) and of MLP experts, top-k of 8 each.

    Attention: a shared kv projection d×2·H_kv·c; each attention expert a query projection d×H_kv·c and
    an output projection H_kv·c×d; a router E×d; an output bias d. A token runs k attention experts,
    i.e. k·H_kv heads of width c. MLP: E GLU experts (d×2f, f×d), a router E×d, an output bias d.
    """
    d, n_layers = f.int("hidden_size"), f.int("num_hidden_layers")
    kv, c = f.int("num_key_value_heads"), f.int("kv_channels")
    f_e, n_e, k = f.int("intermediate_size"), f.int("num_local_experts"), f.int("num_experts_per_tok")
    width = kv * c
    attention = AttentionSpec(params=d * 2 * width + d, norms=0, n_heads=k * kv, qk_head_dim=c, v_head_dim=c,
                              kv_cache_width=2 * width, kind="moa",
                              experts=ExpertBank(n=n_e, top_k=k, params_each=2 * d * width, router=n_e * d))
    ffn = FFNSpec(experts=ExpertBank(n=n_e, top_k=k, params_each=swiglu_params(d, f_e), router=n_e * d), fixed=d)
    layers = [LayerSpec(attention, ffn, 2 * d) for _ in range(n_layers)]
    return _spec(f, name, d, layers, tie_default=True)


# model_type -> the function that builds its ModelSpec (parameter layout) from the config
SPEC_BUILDERS: dict[str, Callable[[Fields, str], ModelSpec]] = {
    "mixtral": _mixtral_like, "phimoe": _mixtral_like, "granitemoe": _mixtral_like,
    "qwen2_moe": _qwen_moe, "qwen3_moe": _qwen_moe, "olmoe": _olmoe,
    "deepseek_v2": _deepseek, "deepseek_v3": _deepseek, "kimi_k2": _deepseek,
    "dbrx": _dbrx, "gpt_oss": _gpt_oss, "llama4": _llama4, "llama4_text": _llama4, "glm4_moe": _glm4_moe,
    "jetmoe": _jetmoe, "llama": _dense, "mistral": _dense, "qwen2": _dense, "qwen3": _dense,
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(SPEC_BUILDERS))


def spec_from_dict(data: dict[str, Any], name: str | None = None, where: str = "config") -> ModelSpec:
    """A Hugging Face config (the parsed `config.json`) → ModelSpec.

    A dict without `model_type` that holds moelab `ModelConfig` fields (a moelab checkpoint's
    config.json) is read as a moelab config. Raises ValueError for an unknown model_type (listing the
    supported ones), a missing required field, or a field of the wrong type.
    """
    from moelab.accounting.spec import spec_from_model_config

    if not isinstance(data, dict):
        raise ValueError(f"{where}: a config must be a JSON object, got {type(data).__name__}")
    model_type = data.get("model_type")
    if model_type is None and isinstance(data.get("model"), dict) and "train" in data:
        data = data["model"]  # a moelab checkpoint's config.json: {"model": ModelConfig, "train": TrainConfig}
    if model_type in (None, "moelab") and ("d_model" in data and "n_layers" in data and "vocab_size" in data):
        fields = {k: v for k, v in data.items() if k != "model_type"}
        return spec_from_model_config(ModelConfig.from_dict(fields), name=name or "moelab")
    if model_type is None:
        raise ValueError(f"{where}: field 'model_type' is missing; supported model types: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type not in SPEC_BUILDERS:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported model types: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    label = name or data.get("_name_or_path") or model_type
    return SPEC_BUILDERS[model_type](Fields(data, where, model_type), str(label))


def spec_from_path(path: str | Path) -> ModelSpec:
    """A `config.json` file or a model directory holding one → ModelSpec (named after the directory)."""
    path = Path(path)
    data = read_config_json(path)
    name = path.name if path.is_dir() else (path.parent.name or path.stem)
    return spec_from_dict(data, name=name, where=str(path))
