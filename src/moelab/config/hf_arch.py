"""What a Hugging Face `config.json` means for each `model_type`: the facts counting and loading share.

Each function reads an `HFConfig` (moelab.config.hf, which holds the absent / null / zero rule) and
answers one question as transformers' model class for that `model_type` does: which layers are MoE,
the attention's KV heads, head width, biases, q/k norm and window per layer, MLA's widths, the routed
and shared experts, group-limited routing, and RoPE (theta and YaRN). `moelab.accounting.hf_configs`
builds parameter counts from them and `moelab.hf.adapters` builds a loadable `ModelConfig`, so each
rule exists once (no torch here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from moelab.config.hf import REQUIRED, HFConfig, is_finite_number, shown
from moelab.config.rope import RopeScaling

DENSE = frozenset({"llama", "mistral", "qwen2", "qwen3"})
QWEN = frozenset({"qwen2", "qwen3", "qwen2_moe", "qwen3_moe"})
DEEPSEEK = frozenset({"deepseek_v2", "deepseek_v3", "kimi_k2"})
LLAMA4 = frozenset({"llama4", "llama4_text"})

# model_type -> (field counting the routed experts of a layer, field holding one expert's hidden width)
EXPERT_FIELDS: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("mixtral", "phimoe", "granitemoe", "gpt_oss", "jetmoe", "llama4", "llama4_text"),
                    ("num_local_experts", "intermediate_size")),
    "qwen2_moe": ("num_experts", "moe_intermediate_size"), "qwen3_moe": ("num_experts", "moe_intermediate_size"),
    "olmoe": ("num_experts", "intermediate_size"),
    **dict.fromkeys(("deepseek_v2", "deepseek_v3", "kimi_k2", "glm4_moe"),
                    ("n_routed_experts", "moe_intermediate_size")),
}
_KV_MHA_WHEN_ABSENT = frozenset({"llama", "olmoe", "deepseek_v2", "granitemoe"})  # class default None
_HEAD_DIM_REQUIRED = frozenset({"qwen3", "gpt_oss", "llama4", "llama4_text"})  # class default is a size
_HEAD_DIM_OR = frozenset({"mixtral", "mistral"})  # modeling reads `head_dim or hidden // heads`
_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
_ABSENT = object()


def kv_heads(c: HFConfig, heads: int) -> int:
    """num_key_value_heads, a divisor of num_attention_heads. Null means num_attention_heads (multi-head
    attention: the `__post_init__` rule of transformers' configs; its strict classes refuse null and
    none gives it another meaning). Absent means the same where the class's default is None (Llama,
    OLMoE, DeepSeek-V2, GraniteMoE); elsewhere the default is a size and the field is required."""
    value = c.raw("num_key_value_heads", _ABSENT)
    if value is None or (value is _ABSENT and c.model_type in _KV_MHA_WHEN_ABSENT):
        c.record("num_key_value_heads", f"num_attention_heads={heads}")
        return heads
    kv = c.int("num_key_value_heads")
    if heads % kv:
        raise c.error(f"field 'num_key_value_heads'={kv} is invalid: allowed a divisor of num_attention_heads "
                      f"({heads})")
    return kv


def head_dim(c: HFConfig, hidden: int, heads: int) -> int:
    """Width of one attention head. Absent or null: hidden_size // num_attention_heads (transformers'
    `getattr(config, "head_dim", hidden // heads)`; Mixtral and Mistral also for 0, as their
    `head_dim or hidden // heads` reads it) — except where the class's default is a size (Qwen3,
    gpt-oss, Llama 4), which require it. OLMoE allows only hidden // heads (its q/k norms have widths
    hidden_size and hidden // heads · kv heads whatever head_dim is)."""
    if c.model_type in _HEAD_DIM_REQUIRED:
        return c.int("head_dim")
    value = c.raw("head_dim")
    if value is None or (value == 0 and c.model_type in _HEAD_DIM_OR):
        if hidden % heads:
            raise c.error(f"head_dim is absent or null and hidden_size={hidden} is not divisible by "
                          f"num_attention_heads={heads}")
        c.record("head_dim", f"hidden_size//num_attention_heads={hidden // heads}")
        return hidden // heads
    width = c.int("head_dim")
    if c.model_type == "olmoe" and width * heads != hidden:  # its q/k norms are sized by hidden_size
        raise c.error(f"field 'head_dim'={width} is invalid: allowed hidden_size // num_attention_heads "
                      f"({hidden // heads}): OLMoE's q/k norms are sized for that width")
    return width


def attention_biases(c: HFConfig) -> tuple[bool, bool]:
    """(biases on q/k/v, bias on o): none in Mixtral and Mistral; Qwen2 q/k/v always (Qwen2-MoE: `qkv_bias`,
    default true); GLM-4.5 q/k/v by `attention_bias`; elsewhere all four by `attention_bias` (default
    false, gpt-oss true). DeepSeek's MLA applies `attention_bias` to its own projections."""
    mt = c.model_type
    if mt in ("mixtral", "mistral"):
        return False, False
    if mt in ("qwen2", "qwen2_moe"):
        return (True if mt == "qwen2" else c.bool("qkv_bias", True)), False
    bias = c.bool("attention_bias", mt == "gpt_oss")
    return bias, bias and mt != "glm4_moe"


def qk_norm(c: HFConfig) -> str:
    """moelab's name for the q/k RMSNorm: "head" (per-head width: Qwen3, GLM-4.5 with `use_qk_norm`),
    "full" (over all heads: OLMoE) or "none"."""
    mt = c.model_type
    if mt in ("qwen3", "qwen3_moe"):
        return "head"
    if mt == "glm4_moe":
        return "head" if c.bool("use_qk_norm", False) else "none"
    return "full" if mt == "olmoe" else "none"


class MLAWidths(NamedTuple):
    """Multi-head latent attention (DeepSeek-V2 §2.1): q_lora_rank None = full-rank queries."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


def mla_widths(c: HFConfig) -> MLAWidths:
    """MLA's widths. `q_lora_rank` must be written: its null means full-rank queries, and its absence
    would mean transformers' default rank (1536), so neither can be assumed."""
    return MLAWidths(c.opt_int("q_lora_rank"), c.int("kv_lora_rank"), c.int("qk_nope_head_dim", minimum=0),
                     c.int("qk_rope_head_dim"), c.int("v_head_dim"))


def moe_layers(c: HFConfig, n_layers: int) -> list[bool]:
    """Which of the `n_layers` decoder layers hold routed experts (the rest run a dense FFN).

    Qwen-MoE: i not in `mlp_only_layers` (null: none) and (i + 1) % decoder_sparse_step == 0, and
    none when num_experts is 0 (transformers' Qwen2MoeDecoderLayer). DeepSeek: i >= first_k_dense_replace
    and i % moe_layer_freq == 0 (DeepSeek's reference code; every release has freq 1). GLM-4.5:
    i >= first_k_dense_replace. Llama 4: `moe_layers` if listed, else every interleave_moe_layer_step-th.
    Dense architectures: none; every other MoE architecture: all.
    """
    mt = c.model_type
    if mt in DENSE:
        return [False] * n_layers
    if mt in ("qwen2_moe", "qwen3_moe"):
        n_experts, step = c.int("num_experts", minimum=0), c.int("decoder_sparse_step", 1)
        dense = set(c.int_list("mlp_only_layers", [], null=[]))
        return [n_experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(n_layers)]
    if mt in DEEPSEEK or mt == "glm4_moe":
        first = c.int("first_k_dense_replace", 0 if mt == "deepseek_v2" else REQUIRED, minimum=0)
        every = c.int("moe_layer_freq", 1) if mt in DEEPSEEK else 1
        return [i >= first and i % every == 0 for i in range(n_layers)]
    if mt in LLAMA4:
        if c.raw("moe_layers") is not None:
            listed = set(c.int_list("moe_layers"))
            return [i in listed for i in range(n_layers)]
        step = c.int("interleave_moe_layer_step", 1)
        return [(i + 1) % step == 0 for i in range(n_layers)]
    return [True] * n_layers


class RoutedExperts(NamedTuple):
    n: int  # experts per MoE layer
    top_k: int  # experts each token runs
    width: int  # hidden width of one expert


def routed_experts(c: HFConfig) -> RoutedExperts:
    """The routed experts of an MoE layer (fields per `EXPERT_FIELDS`; DBRX's in its `ffn_config`);
    top_k must not exceed the expert count. Qwen-MoE allows 0 experts (every layer dense)."""
    if c.model_type == "dbrx":
        ffn, k_field = c.sub("ffn_config"), "moe_top_k"
        width, n, top_k = ffn.int("ffn_hidden_size"), ffn.int("moe_num_experts"), ffn.int(k_field)
    else:
        (n_field, width_field), k_field = EXPERT_FIELDS[c.model_type], "num_experts_per_tok"
        n = c.int(n_field, minimum=0 if c.model_type in QWEN else 1)
        top_k, width = c.int(k_field), c.int(width_field)
    if n and top_k > n:
        raise c.error(f"field {k_field!r}={top_k} is invalid: allowed an integer >= 1 and <= the number of "
                      f"experts ({n})")
    return RoutedExperts(n, top_k, width)


def shared_experts(c: HFConfig) -> tuple[int, int]:
    """(count, hidden width of each) of the always-on shared experts: Qwen2-MoE one of
    `shared_expert_intermediate_size` (0 = none; its sigmoid gate exists regardless); DeepSeek and
    GLM-4.5 `n_shared_experts` (0 allowed) of `moe_intermediate_size`; Llama 4 one of the expert width."""
    mt = c.model_type
    if mt == "qwen2_moe":
        width = c.int("shared_expert_intermediate_size", minimum=0)
        return (1, width) if width else (0, 0)
    if mt in DEEPSEEK or mt == "glm4_moe":
        return c.int("n_shared_experts", minimum=0), c.int("moe_intermediate_size")
    if mt in LLAMA4:
        return 1, c.int("intermediate_size")
    return 0, 0


def routing_groups(c: HFConfig, n_experts: int) -> tuple[int, int]:
    """(n_group, topk_group) of DeepSeek's group-limited routing (V2 §2.2.2 device-limited, V3 §2.1.2
    node-limited): a token's experts lie in at most topk_group of n_group equal groups; (1, 1) = no
    limit. DeepSeek-V2 limits only when `topk_method` (default "greedy") is not "greedy"; DeepSeek-V3
    and Kimi-K2 always (both fields required); GLM-4.5 by its fields (default 1)."""
    mt = c.model_type
    if mt in DEEPSEEK and not (mt == "deepseek_v2" and c.raw("topk_method", "greedy") == "greedy"):
        n_group, topk_group = c.int("n_group"), c.int("topk_group")
    elif mt == "glm4_moe":
        n_group, topk_group = c.int("n_group", 1), c.int("topk_group", 1)
    else:
        return 1, 1
    if n_experts % n_group:
        raise c.error(f"field 'n_group'={n_group} is invalid: allowed a divisor of the number of experts "
                      f"({n_experts})")
    if topk_group > n_group:
        raise c.error(f"field 'topk_group'={topk_group} is invalid: allowed an integer <= n_group ({n_group})")
    return n_group, topk_group


def layer_windows(c: HFConfig, n_layers: int) -> list[int | None]:
    """Per layer, the most tokens one query attends to (sliding window or chunk), None = whole context.

    Mixtral, PhiMoE: `sliding_window` (null or absent: none) on every layer; Mistral likewise, absent =
    4096. Qwen: none unless `use_sliding_window` (false in every released Qwen config); then Qwen2/Qwen3
    window layers i >= max_window_layers, Qwen2-MoE odd i + 1 below max_window_layers, Qwen3-MoE all.
    gpt-oss: 128-token windows on even layers. Llama 4: chunked attention on its RoPE layers. A
    `layer_types` list, where transformers reads one (Qwen with windows on, gpt-oss, Llama 4), wins.
    """
    mt = c.model_type
    if mt in ("mixtral", "phimoe"):
        return [c.opt_int("sliding_window", None)] * n_layers
    if mt == "mistral":
        return [c.opt_int("sliding_window", 4096)] * n_layers
    if mt in QWEN:
        if not c.bool("use_sliding_window", False):
            return [None] * n_layers
        size = c.int("sliding_window")
        if mt == "qwen3_moe":
            return [size] * n_layers
        below = c.int("max_window_layers")
        if mt == "qwen2_moe":
            return _by_type(c, n_layers, lambda i: "sliding_attention" if (i + 1) % 2 and i < below
                            else "full_attention", size)
        return _by_type(c, n_layers, lambda i: "sliding_attention" if i >= below else "full_attention", size)
    if mt == "gpt_oss":
        size = c.int("sliding_window", 128)
        return _by_type(c, n_layers, lambda i: "sliding_attention" if (i + 1) % 2 else "full_attention", size)
    if mt in LLAMA4:
        no_rope = c.raw("no_rope_layers")
        if not no_rope:  # transformers: RoPE (and chunked attention) except every no_rope_layer_interval-th layer
            interval = c.int("no_rope_layer_interval", 4)
            no_rope = [int((i + 1) % interval != 0) for i in range(n_layers)]
        elif len(c.int_list("no_rope_layers")) != n_layers:
            raise c.error(f"field 'no_rope_layers' must list num_hidden_layers={n_layers} values")
        size = c.opt_int("attention_chunk_size", 8192)
        return _by_type(c, n_layers, lambda i: "chunked_attention" if no_rope[i] else "full_attention", size)
    return [None] * n_layers


def _by_type(c: HFConfig, n_layers: int, rule: Callable[[int], str], size: int | None) -> list[int | None]:
    """Windows from `layer_types` if the config lists them, else from the architecture's `rule`."""
    types = c.str_list("layer_types", n_layers, _LAYER_TYPES) or [rule(i) for i in range(n_layers)]
    return [None if t == "full_attention" else size for t in types]


# -- RoPE ----------------------------------------------------------------------------------------------

# keys a YaRN rope_parameters / rope_scaling dict may hold (transformers' _validate_yarn_rope_parameters)
YARN_KEYS = frozenset({"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
                       "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate",
                       "partial_rotary_factor"})


def _rope(c: HFConfig) -> tuple[str, dict[str, Any]]:
    """(field name, dict) of the RoPE parameters: `rope_scaling` (older configs; it wins, as in
    transformers) or `rope_parameters` (transformers 5)."""
    for name in ("rope_scaling", "rope_parameters"):
        v = c.raw(name)
        if v:
            if not isinstance(v, dict) or any(isinstance(x, dict) for x in v.values()):
                raise c.error(f"field {name!r}={shown(v)} is not supported by moelab: allowed one object of RoPE "
                              "parameters (not one per layer type)")
            return name, v
    return "rope_parameters", {}


def rope_theta(c: HFConfig) -> float:
    """RoPE base from `rope_parameters` (transformers 5) or `rope_theta` (older)."""
    _, params = _rope(c)
    theta = params.get("rope_theta", c.raw("rope_theta"))
    if theta is None:
        raise c.error("field 'rope_parameters.rope_theta' (or 'rope_theta') is missing")
    if not (is_finite_number(theta) and theta > 0):
        raise c.error(f"field 'rope_theta'={shown(theta)} is invalid: allowed a finite number > 0")
    return float(theta)


def rotary_dim(c: HFConfig, head_width: int) -> int:
    """Channels of each head RoPE rotates: int(head_width · partial_rotary_factor), the factor read from the
    RoPE parameters or the top level (transformers' `dim = int(head_dim * partial_rotary_factor)`); absent:
    0.5 for GLM-4.5 (its config class's default), else 1 (the whole head)."""
    name, p = _rope(c)
    default = 0.5 if c.model_type == "glm4_moe" else 1.0
    factor = p.get("partial_rotary_factor", c.raw("partial_rotary_factor", default))
    if not (is_finite_number(factor) and 0 < factor <= 1):
        raise c.error(f"field 'partial_rotary_factor'={shown(factor)} is invalid: allowed a number in (0, 1]")
    dim = int(head_width * factor)
    if dim < 2 or dim % 2:
        raise c.error(f"field 'partial_rotary_factor'={shown(factor)} is invalid: head width {head_width} × it "
                      f"= {dim} channels, allowed an even number >= 2 (RoPE rotates pairs)")
    return dim


def rope_scaling(c: HFConfig) -> RopeScaling | None:
    """None for plain RoPE, a `RopeScaling` for YaRN (read as transformers reads it: beta_fast/beta_slow
    default 32/1, factor defaults to max_position_embeddings / original_max_position_embeddings, and
    original_max_position_embeddings to max_position_embeddings); ValueError for any other scaling."""
    name, p = _rope(c)
    type_key = "rope_type" if "rope_type" in p else "type"
    rope_type = p.get(type_key, "default")
    if rope_type == "default":
        return None
    if rope_type != "yarn":
        raise c.error(f"field '{name}.{type_key}'={rope_type!r} is not supported by moelab: allowed 'default' "
                      "(plain RoPE) or 'yarn' (YaRN); linear, dynamic, llama3 and longrope scalings are not "
                      "implemented")
    unknown = sorted(set(p) - YARN_KEYS)
    if unknown:
        raise c.error(f"field '{name}' has key(s) {unknown} that moelab's YaRN does not implement: allowed "
                      f"{sorted(YARN_KEYS)}")
    if "factor" not in p:
        raise c.error(f"field '{name}.factor' is missing (required for YaRN)")
    max_pos = c.int("max_position_embeddings")
    original = p.get("original_max_position_embeddings", c.raw("original_max_position_embeddings", max_pos))

    def num(v: Any) -> Any:  # ints as floats; anything else is left for RopeScaling.validate to name
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    try:
        factor = p["factor"] if p["factor"] is not None else max_pos / original
        return RopeScaling(factor=num(factor), original_max_seq_len=original,
                           beta_fast=num(p.get("beta_fast") or 32.0), beta_slow=num(p.get("beta_slow") or 1.0),
                           mscale=num(p.get("mscale")), mscale_all_dim=num(p.get("mscale_all_dim")),
                           attention_factor=num(p.get("attention_factor")), truncate=p.get("truncate", True))
    except (ValueError, TypeError, ArithmeticError) as e:  # ArithmeticError: division by zero, float overflow
        raise c.error(f"field '{name}' (YaRN) is invalid: {e}") from None
