"""Hugging Face `config.json` → `ModelSpec`, without torch or transformers.

Each builder mirrors the module layout of the matching `transformers` model class (the tests build
that class from a tiny config and compare `sum(p.numel())`), so a count here is what loading the
checkpoint with `transformers` would hold. One builder, `_decoder`, covers every architecture made of
grouped-query or latent attention and SwiGLU FFNs or experts; DBRX, JetMoE and Llama 4's vision
encoder have their own.

Fields are read through `moelab.config.hf.HFConfig`, whose docstring states the one rule for absent,
null and zero fields (sizes required; documented defaults taken and listed in the ModelSpec's notes;
null only where transformers gives it a meaning). What the fields mean for each model_type — which
layers are MoE, KV heads, head width, biases, q/k norm, windows, experts, group-limited routing, MLA
widths — comes from `moelab.config.hf_arch`, which `moelab.hf` uses to load weights too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moelab.accounting.spec import AttentionSpec, ExpertBank, FFNSpec, LayerSpec, ModelSpec, swiglu_params
from moelab.config import hf_arch
from moelab.config.hf import HFConfig, load_json
from moelab.config.model import ModelConfig

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


def mla(c: HFConfig, d: int, heads: int, *, bias: bool) -> AttentionSpec:
    """Multi-head latent attention (DeepSeek-V2 §2.1, arXiv:2405.04434), transformers' layout.

    q: d×r_q → RMSNorm(r_q) → r_q×H·(nope+rope), or d×H·(nope+rope) when q_lora_rank is null;
    kv: d×(r_kv+rope) → RMSNorm(r_kv) → r_kv×H·(nope+v); o: H·v×d. bias (attention_bias) adds biases
    to the two down-projections and o. The cache holds r_kv + rope per token (eq. 9-10: c_KV and k_R).
    """
    r_q, r_kv, nope, rope, v = hf_arch.mla_widths(c)
    qk = nope + rope
    if r_q is None:
        q, q_norm = d * heads * qk, 0
    else:
        q, q_norm = d * r_q + (r_q if bias else 0) + r_q * heads * qk, r_q
    params = (q + d * (r_kv + rope) + (r_kv + rope if bias else 0) + r_kv * heads * (nope + v)
              + heads * v * d + (d if bias else 0))
    return AttentionSpec(params=params, norms=q_norm + r_kv, n_heads=heads, qk_head_dim=qk, v_head_dim=v,
                         kv_cache_width=r_kv + rope, kind="mla")


def _mlp(c: HFConfig, d: int, width: int) -> int:
    """A SwiGLU FFN of `width`, with biases where `mlp_bias` is set (Llama, DeepSeek-V2)."""
    bias = c.model_type in ("llama", "deepseek_v2") and c.bool("mlp_bias", False)
    return swiglu_params(d, width) + (2 * width + d if bias else 0)


def _moe_ffn(c: HFConfig, d: int) -> FFNSpec:
    """An MoE block: routed experts and their router (E×d), plus shared experts (Qwen2-MoE's sigmoid
    gate d×1 too). gpt-oss experts carry biases (gate_up [d, 2f] + 2f, down [f, d] + d), its router too."""
    n, k, f = hf_arch.routed_experts(c)
    n_groups, topk_groups = hf_arch.routing_groups(c, n)
    if c.model_type == "gpt_oss":
        each, router = d * 2 * f + 2 * f + f * d + d, n * d + n
    else:
        each, router = swiglu_params(d, f), n * d
    count, width = hf_arch.shared_experts(c)
    shared = _mlp(c, d, count * width) + (d if c.model_type == "qwen2_moe" else 0)
    return FFNSpec(experts=ExpertBank(n=n, top_k=k, params_each=each, router=router, n_groups=n_groups,
                                      topk_groups=topk_groups), shared=shared)


def _spec(c: HFConfig, name: str, d: int, layers: list[LayerSpec], *, tie_default: bool, head_bias: bool = False,
          final_norm: int | None = None, **extra: Any) -> ModelSpec:
    vocab = c.int("vocab_size")
    tied = c.bool("tie_word_embeddings", tie_default)
    head = 0 if tied else vocab * d + (vocab if head_bias else 0)
    return ModelSpec(name=name, model_type=c.model_type, vocab_size=vocab, d_model=d, input_embedding=vocab * d,
                     output_head=head, tied=tied, final_norm=d if final_norm is None else final_norm,
                     layers=tuple(layers), notes=c.notes(), **extra)


# -- builders ----------------------------------------------------------------------------------------

def _decoder(c: HFConfig, name: str) -> ModelSpec:
    """A decoder of GQA (or MLA) attention and per-layer dense SwiGLU FFN or MoE block.

    Dense: Llama, Mistral, Qwen2, Qwen3. MoE: Mixtral, PhiMoE, GraniteMoE, Qwen2-MoE, Qwen3-MoE, OLMoE,
    gpt-oss (attention sinks), Llama 4 text (dense width `intermediate_size_mlp`), GLM-4.5, and with MLA
    DeepSeek-V2, DeepSeek-V3, Kimi-K2. PhiMoE's LayerNorms have biases (4d per layer, 2d final) and its
    head may (`lm_head_bias`). DeepSeek-V3, Kimi-K2 and GLM-4.5 add `num_nextn_predict_layers` MTP
    modules (DeepSeek-V3 §2.2): each one more MoE block plus M ∈ R^{d×2d} and three RMSNorms (h,
    embedding, and the shared head's); embedding and output head are shared with the main model.
    """
    mt = c.model_type
    d, n_layers, heads = c.int("hidden_size"), c.int("num_hidden_layers"), c.int("num_attention_heads")
    if mt in hf_arch.DEEPSEEK:
        attention = mla(c, d, heads, bias=c.bool("attention_bias", False))
    else:
        qkv_bias, o_bias = hf_arch.attention_biases(c)
        attention = gqa(d, heads, hf_arch.kv_heads(c, heads), hf_arch.head_dim(c, d, heads), qkv_bias=qkv_bias,
                        o_bias=o_bias, qk_norm=hf_arch.qk_norm(c), sinks=mt == "gpt_oss")
    is_moe = hf_arch.moe_layers(c, n_layers)
    moe = None if mt in hf_arch.DENSE else _moe_ffn(c, d)
    dense = None if all(is_moe) else FFNSpec(dense=_mlp(c, d, c.int("intermediate_size_mlp" if mt in hf_arch.LLAMA4
                                                                    else "intermediate_size")))
    norms = 4 * d if mt == "phimoe" else 2 * d
    layers = [LayerSpec(dataclasses.replace(attention, window=w), moe if m else dense, norms)
              for w, m in zip(hf_arch.layer_windows(c, n_layers), is_moe, strict=True)]
    mtp: dict[str, Any] = {}
    if mt in ("deepseek_v3", "kimi_k2", "glm4_moe"):
        n_mtp = c.int("num_nextn_predict_layers", 1, minimum=0)
        mtp = {"mtp_layers": (LayerSpec(attention, moe, 2 * d),) * n_mtp, "mtp_extra": n_mtp * (2 * d * d + 3 * d)}
    return _spec(c, name, d, layers, tie_default=False,
                 head_bias=mt == "phimoe" and c.bool("lm_head_bias", False),
                 final_norm=2 * d if mt == "phimoe" else d, **mtp)


def _dbrx(c: HFConfig, name: str) -> ModelSpec:
    """DBRX: fused Wqkv, bias-free LayerNorms, 16 experts top-4 (fine-grained, Databricks 2024)."""
    d, n_layers, heads = c.int("d_model"), c.int("n_layers"), c.int("n_heads")
    kv = c.sub("attn_config").int("kv_n_heads")
    if d % heads:
        raise c.error(f"d_model={d} is not divisible by n_heads={heads}")
    n, k, f = hf_arch.routed_experts(c)
    experts = ExpertBank(n=n, top_k=k, params_each=swiglu_params(d, f), router=n * d)
    layers = [LayerSpec(gqa(d, heads, kv, d // heads), FFNSpec(experts=experts), 2 * d) for _ in range(n_layers)]
    return _spec(c, name, d, layers, tie_default=False)


def _llama4(c: HFConfig, name: str) -> ModelSpec:
    """Llama 4 (Meta 2025): routed top-1 experts + a shared expert, MoE every `interleave_moe_layer_step`
    layers (dense SwiGLU of intermediate_size_mlp otherwise), chunked attention on RoPE layers, and —
    for the multimodal `llama4` config — a vision encoder counted apart (`vision`)."""
    if c.model_type == "llama4":
        text = c.sub("text_config")
        vision = _llama4_vision(c.sub("vision_config"), text.int("hidden_size"))
        return dataclasses.replace(_decoder(text, name), vision=vision)
    return _decoder(c, name)


def _llama4_vision(v: HFConfig, text_d: int) -> int:
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


def _jetmoe(c: HFConfig, name: str) -> ModelSpec:
    """JetMoE (Shen et al. 2024): mixture of attention heads (MoA) and of MLP experts, top-k of 8 each.

    Attention: a shared kv projection d×2·H_kv·c; each attention expert a query projection d×H_kv·c and
    an output projection H_kv·c×d; a router E×d; an output bias d. A token runs k attention experts,
    i.e. k·H_kv heads of width c. MLP: E GLU experts (d×2f, f×d), a router E×d, an output bias d.
    """
    d, n_layers = c.int("hidden_size"), c.int("num_hidden_layers")
    kv, width = c.int("num_key_value_heads"), c.int("kv_channels")
    n, k, f = hf_arch.routed_experts(c)
    attention = AttentionSpec(params=d * 2 * kv * width + d, norms=0, n_heads=k * kv, qk_head_dim=width,
                              v_head_dim=width, kv_cache_width=2 * kv * width, kind="moa",
                              experts=ExpertBank(n=n, top_k=k, params_each=2 * d * kv * width, router=n * d))
    ffn = FFNSpec(experts=ExpertBank(n=n, top_k=k, params_each=swiglu_params(d, f), router=n * d), fixed=d)
    layers = [LayerSpec(attention, ffn, 2 * d) for _ in range(n_layers)]
    return _spec(c, name, d, layers, tie_default=True)


# model_type -> the function that builds its ModelSpec (parameter layout) from the config
SPEC_BUILDERS: dict[str, Callable[[HFConfig, str], ModelSpec]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "mixtral", "phimoe", "granitemoe", "qwen2_moe",
                     "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "kimi_k2", "glm4_moe", "gpt_oss"),
                    _decoder),
    "llama4": _llama4, "llama4_text": _llama4, "dbrx": _dbrx, "jetmoe": _jetmoe,
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(SPEC_BUILDERS))


def spec_from_dict(data: dict[str, Any], name: str | None = None, where: str = "config") -> ModelSpec:
    """A Hugging Face config (the parsed `config.json`) → ModelSpec.

    A dict without `model_type` that holds moelab `ModelConfig` fields (a moelab checkpoint's
    config.json) is read as a moelab config. Raises ValueError for an unknown model_type (listing the
    supported ones), a missing required field, or a field of the wrong type or out of range.
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
    if not isinstance(model_type, str) or model_type not in SPEC_BUILDERS:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported model types: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    label = name or data.get("_name_or_path") or model_type
    return SPEC_BUILDERS[model_type](HFConfig(data, where), str(label))


def config_file(path: Path) -> Path:
    """The config.json of `path`: the file itself, `<dir>/config.json`, or for a moelab run directory
    (no config.json, but `checkpoints/step_*/config.json`) its newest checkpoint's; ValueError if none."""
    file = path / "config.json" if path.is_dir() else path
    if path.is_dir() and not file.exists():
        steps = sorted(path.glob("checkpoints/step_*/config.json"))
        if steps:
            file = steps[-1]
    if not file.is_file():
        raise ValueError(f"{path}: no config.json found (pass a config.json file or a model directory holding one)")
    return file


def spec_from_path(path: str | Path) -> ModelSpec:
    """A `config.json` file or a model directory holding one → ModelSpec (named after the directory)."""
    path = Path(path)
    data = load_json(config_file(path))
    name = path.name if path.is_dir() else (path.parent.name or path.stem)
    return spec_from_dict(data, name=name, where=str(path))
