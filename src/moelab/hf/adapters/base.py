"""The parts every Hugging Face MoE adapter shares: the tensor-table `Entry`, the base `Adapter` (the
Llama-like config fields and tensors) and the SwiGLU FFN table (`ffn_entries`). See `moelab.hf.adapters`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moelab.config import hf_arch
from moelab.config.hf import HFConfig
from moelab.config.model import ModelConfig, MoEConfig


@dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor and where it lives in moelab.

    hf_name / hf_shape: the tensor as stored in the Hugging Face checkpoint.
    target: moelab state-dict name; index: the part of the target this tensor fills (None = all).
    transpose: dims swapped between the HF tensor and the target part (None = same layout).
    perm: row permutation applied to the HF tensor on load (its inverse on export), or None.
    covers: canonical names this tensor stands for (a stacked alias covers E per-expert names).
    scale: HF tensor = scale × moelab part (route_scale of a softmax router folded into the down projections).
    pair / decode: the tensor is one of two (`pair`: their names) that `decode(first, second, dtype=...)` turns
        into the Hugging Face tensor in the target's dtype, e.g. MXFP4 blocks and scales (`moelab.hf.mxfp4`);
        load only.
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    target: str
    index: tuple | None = None
    transpose: tuple[int, int] | None = None
    perm: tuple[int, ...] | None = None
    covers: tuple[str, ...] = ()
    scale: float = 1.0  # moelab value = HF value / scale (folds a route_scale into w_out on export)
    pair: tuple[str, str] | None = None
    decode: Callable[..., Any] | None = None


def _silu(c: HFConfig) -> None:
    c.require("hidden_act", lambda v: v in (None, "silu", "swish"), "'silu' (SwiGLU experts)")


def _max_len(c: HFConfig, n_layers: int) -> int:
    """max_position_embeddings, capped at the narrowest attention window: within it, attention is exact."""
    return min([c.int("max_position_embeddings"), *(w for w in hf_arch.layer_windows(c, n_layers) if w)])


def _rope_params(cfg: ModelConfig) -> dict[str, Any]:
    """transformers 5's `rope_parameters`: plain RoPE, or YaRN with every field moelab uses; the rotated
    fraction of the head when partial (GLM-4.5)."""
    s = cfg.rope_scaling
    partial = {} if cfg.rotary_dim is None else {"partial_rotary_factor": cfg.rotary_dim / cfg.head_width}
    if s is None:
        return {"rope_parameters": {"rope_theta": float(cfg.rope_theta), "rope_type": "default", **partial}}
    p = {"rope_theta": float(cfg.rope_theta), "rope_type": "yarn", "factor": float(s.factor),
         "original_max_position_embeddings": s.original_max_seq_len, "beta_fast": float(s.beta_fast),
         "beta_slow": float(s.beta_slow)}
    p |= {k: float(getattr(s, k)) for k in ("mscale", "mscale_all_dim", "attention_factor")
          if getattr(s, k) is not None}
    if not s.truncate:
        p["truncate"] = False
    return {"rope_parameters": p | partial}


def _moe_layout(c: HFConfig, n_layers: int) -> tuple[int, int]:
    """(n_dense_layers, moe_every) giving exactly the architecture's MoE layers (`hf_arch.moe_layers`), or
    ValueError: moelab places MoE layers as "the first n dense, then every k-th"."""
    moe = [i for i, is_moe in enumerate(hf_arch.moe_layers(c, n_layers)) if is_moe]
    if not moe:
        raise c.error("no layer is MoE (mlp_only_layers / decoder_sparse_step / first_k_dense_replace leave "
                      "none); moelab.hf loads Mixture-of-Experts models")
    first = moe[0]
    for every in range(1, n_layers + 1):
        if [i for i in range(first, n_layers) if (i - first) % every == 0] == moe:
            return first, every
    raise c.error(f"MoE layers {moe} (from mlp_only_layers / decoder_sparse_step) are not 'the first n dense, "
                  "then every k-th' — moelab cannot represent this layout")


# ModelConfig fields only some architectures have, with the value meaning "not used": an adapter lists the
# ones its architecture has in `Adapter.options`; export refuses a config using any other
OPTIONS: dict[str, Any] = {"embed_scale": 1.0, "residual_scale": 1.0, "logits_scaling": 1.0, "attn_scale": None,
                           "rotary_dim": None, "o_bias": False, "attn_sinks": False, "sliding_window": None,
                           "sliding_every": 1, "moe.biases": False}


def _option(cfg: ModelConfig, name: str) -> Any:
    """The value of an `OPTIONS` field ("moe.x": a field of cfg.moe)."""
    obj, _, leaf = name.rpartition(".")
    return getattr(cfg.moe if obj == "moe" else cfg, leaf)


class Adapter:
    """Base: the Llama-like parts shared by all supported architectures."""

    model_type = ""
    architecture = ""
    options: frozenset[str] = frozenset()  # the `OPTIONS` this architecture has
    has_route_scale = False  # config.json has routed_scaling_factor (else route_scale is folded into w_out)
    expert_names = ("gate_proj", "up_proj", "down_proj")  # per-expert gate, up, down
    moe_prefix = "mlp"
    norm_eps = 1e-6  # transformers' default rms_norm_eps for this architecture

    # -- config ------------------------------------------------------------------------------------
    def config_from_hf(self, c: HFConfig) -> ModelConfig:
        """The moelab config of a config.json: what every architecture shares is read here (its meaning
        per model_type from `moelab.config.hf_arch`), the rest by `moe_fields` and `attention_fields`."""
        _silu(c)
        qkv_bias, o_bias = hf_arch.attention_biases(c)
        if o_bias and "o_bias" not in self.options:
            raise c.error("field 'attention_bias'=True is not supported by moelab: allowed false (attention "
                          "biases other than Qwen2's q/k/v are not implemented)")
        D, H, n_layers = c.int("hidden_size"), c.int("num_attention_heads"), c.int("num_hidden_layers")
        return ModelConfig(vocab_size=c.int("vocab_size"), d_model=D, n_layers=n_layers, n_heads=H,
                           max_seq_len=c.int("max_position_embeddings") if "sliding_window" in self.options
                           else _max_len(c, n_layers), rope_theta=hf_arch.rope_theta(c),
                           rope_scaling=hf_arch.rope_scaling(c), norm_eps=c.float("rms_norm_eps", self.norm_eps),
                           tie_embeddings=c.bool("tie_word_embeddings", False), qkv_bias=qkv_bias,
                           qk_norm=hf_arch.qk_norm(c), d_ff=c.int("intermediate_size"),
                           **self.layout_fields(c, D, n_layers), **self.attention_fields(c, D, H),
                           **self.model_fields(c))

    def layout_fields(self, c: HFConfig, D: int, n_layers: int) -> dict[str, Any]:
        """ModelConfig's n_dense_layers, moe_every and moe: which layers are MoE and their MoEConfig."""
        n_dense, every = _moe_layout(c, n_layers)
        n, k, f = hf_arch.routed_experts(c)
        moe = MoEConfig(d_model=D, d_expert=f, n_experts=n, top_k=k, z_loss_coef=0.0, **self.moe_fields(c, n))
        return {"n_dense_layers": n_dense, "moe_every": every, "moe": moe}

    def model_fields(self, c: HFConfig) -> dict[str, Any]:
        """ModelConfig fields of this architecture's `options` (none by default)."""
        return {}

    def moe_fields(self, c: HFConfig, n_experts: int) -> dict[str, Any]:
        """MoEConfig fields besides the expert shape: a softmax router, its aux-loss coefficient."""
        return {"norm_topk_prob": c.bool("norm_topk_prob", False),
                "aux_loss_coef": c.float("router_aux_loss_coef", 0.0)}

    def attention_fields(self, c: HFConfig, D: int, H: int) -> dict[str, Any]:
        """ModelConfig fields of grouped-query attention; partial rotary only where the architecture has it."""
        width = hf_arch.head_dim(c, D, H)
        rotary = hf_arch.rotary_dim(c, width)
        if rotary != width and "rotary_dim" not in self.options:
            raise c.error(f"field 'partial_rotary_factor'={rotary / width!r} is not supported by moelab for "
                          f"{self.model_type}: allowed 1.0 (RoPE over the whole head)")
        return {"n_kv_heads": hf_arch.kv_heads(c, H), "head_dim": width,
                "rotary_dim": None if rotary == width else rotary}

    def mismatch(self, cfg: ModelConfig) -> str | None:
        """Why this moelab config cannot be written as this architecture (None = it can): the first of
        the common conditions and then of `requirements` that fails."""
        return self._common_mismatch(cfg) or next((why for ok, why in self.requirements(cfg) if not ok), None)

    def requirements(self, cfg: ModelConfig) -> list[Check]:
        """(holds, what is required) for each condition of this architecture on a moelab MoE config."""
        raise NotImplementedError

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        raise NotImplementedError

    def _common_mismatch(self, cfg: ModelConfig) -> str | None:
        m = cfg.moe
        if m is None:
            return "moe is None (a dense model); these architectures are Mixture-of-Experts"
        if m.activation not in ("swiglu", "clamped_swiglu") or cfg.activation != "swiglu":  # clamped: moe.biases
            return f"activation={m.activation!r}/{cfg.activation!r}: Hugging Face MoE models use SwiGLU"
        if m.capacity_factor is not None:
            return f"moe.capacity_factor={m.capacity_factor!r}: Hugging Face MoE models are dropless (None)"
        if m.router not in ("topk_softmax", "sigmoid"):
            return f"moe.router={m.router!r}: only 'topk_softmax' and 'sigmoid' routers exist in these architectures"
        for name, plain in OPTIONS.items():
            if name not in self.options and _option(cfg, name) != plain:
                return f"{name} must be {plain!r} (the architecture has no such option)"
        return None

    def _base_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_width,
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
            "num_experts_per_tok": cfg.moe.top_k, "dtype": "float32", **_rope_params(cfg),
        }

    # -- tensors -----------------------------------------------------------------------------------
    def entries(self, cfg: ModelConfig, c: HFConfig | None = None) -> list[Entry]:
        """Every tensor of the checkpoint (canonical per-expert names) and its stacked aliases."""
        D, V = cfg.d_model, cfg.vocab_size
        out = [Entry("model.embed_tokens.weight", (V, D), "embed.weight"),
               Entry("model.norm.weight", (D,), "norm.weight")]
        if not cfg.tie_embeddings:
            out.append(Entry("lm_head.weight", (V, D), "head.weight"))
        for i in range(cfg.n_layers):
            p, b = f"model.layers.{i}.", f"blocks.{i}."
            out += [Entry(p + "input_layernorm.weight", (D,), b + "attn_norm.weight"),
                    Entry(p + "post_attention_layernorm.weight", (D,), b + "ffn_norm.weight")]
            out += self.attention_entries(cfg, p + "self_attn.", b + "attn.", c)
            if cfg.is_moe_layer(i):
                out += self.moe_entries(cfg, p + self.moe_prefix + ".", b + "ffn.")
            else:
                out += ffn_entries(p + "mlp.", b + "ffn.", D, cfg.d_ff)
        return out

    def attention_entries(self, cfg: ModelConfig, p: str, b: str, c: HFConfig | None) -> list[Entry]:
        D, H, G, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_width
        out = [Entry(p + "q_proj.weight", (H * hd, D), b + "wq.weight"),
               Entry(p + "k_proj.weight", (G * hd, D), b + "wk.weight"),
               Entry(p + "v_proj.weight", (G * hd, D), b + "wv.weight"),
               Entry(p + "o_proj.weight", (D, H * hd), b + "wo.weight")]
        if cfg.qkv_bias:
            out += [Entry(p + "q_proj.bias", (H * hd,), b + "wq.bias"),
                    Entry(p + "k_proj.bias", (G * hd,), b + "wk.bias"),
                    Entry(p + "v_proj.bias", (G * hd,), b + "wv.bias")]
        if cfg.o_bias:
            out.append(Entry(p + "o_proj.bias", (D,), b + "wo.bias"))
        if cfg.attn_sinks:
            out.append(Entry(p + "sinks", (H,), b + "sinks"))
        if cfg.qk_norm == "head":
            out += [Entry(p + "q_norm.weight", (hd,), b + "q_norm.weight"),
                    Entry(p + "k_norm.weight", (hd,), b + "k_norm.weight")]
        elif cfg.qk_norm == "full":
            out += [Entry(p + "q_norm.weight", (H * hd,), b + "q_norm.weight"),
                    Entry(p + "k_norm.weight", (G * hd,), b + "k_norm.weight")]
        return out

    def moe_entries(self, cfg: ModelConfig, p: str, b: str) -> list[Entry]:
        m = cfg.moe
        E, D, F = m.n_experts, cfg.d_model, m.d_expert
        g, u, d = self.expert_names
        # an architecture without a routed scaling factor gets moelab's folded into the expert outputs (exact)
        s = 1.0 if self.has_route_scale else m.route_scale
        out = [Entry(p + "gate.weight", (E, D), b + "router.weight")]
        canon_in, canon_out = [], []
        for e in range(E):
            q = f"{p}experts.{e}."
            out += [Entry(q + f"{g}.weight", (F, D), b + "experts.w_in", (e, slice(None), slice(0, F)), (0, 1)),
                    Entry(q + f"{u}.weight", (F, D), b + "experts.w_in", (e, slice(None), slice(F, 2 * F)), (0, 1)),
                    Entry(q + f"{d}.weight", (D, F), b + "experts.w_out", (e,), (0, 1), scale=s)]
            canon_in += [q + f"{g}.weight", q + f"{u}.weight"]
            canon_out.append(q + f"{d}.weight")
        # transformers 5 in-memory (stacked) layout, accepted on load
        for stem in {p, p.replace(f".{self.moe_prefix}.", ".mlp.")}:
            if stem != p:
                out.append(Entry(stem + "gate.weight", (E, D), b + "router.weight", covers=(p + "gate.weight",)))
            out += [Entry(stem + "experts.gate_up_proj", (E, 2 * F, D), b + "experts.w_in", None, (1, 2),
                          covers=tuple(canon_in)),
                    Entry(stem + "experts.down_proj", (E, D, F), b + "experts.w_out", None, (1, 2),
                          covers=tuple(canon_out), scale=s)]
        return out


Check = tuple[bool, str]  # (the condition holds, what it requires)


def gqa_checks(cfg: ModelConfig, qk_norm: str = "none", qkv_bias: bool | None = False) -> list[Check]:
    """Grouped-query attention with the given q/k norm and q/k/v biases (None: either)."""
    return [(cfg.attention == "gqa", "attention must be 'gqa'"),
            (cfg.qk_norm == qk_norm, f"qk_norm must be {qk_norm!r}"),
            (qkv_bias is None or cfg.qkv_bias == qkv_bias, f"qkv_bias must be {qkv_bias}")]


def plain_moe_checks(cfg: ModelConfig) -> list[Check]:
    """Every layer MoE, no shared experts, no group-limited routing, no expert bias."""
    m = cfg.moe
    return [(m.n_shared == 0, "n_shared must be 0"),
            (cfg.n_dense_layers == 0 and cfg.moe_every == 1, "every layer must be MoE"),
            (m.n_groups == 1 and not m.expert_bias, "no group-limited routing or expert bias")]


def ffn_entries(p: str, b: str, D: int, S: int) -> list[Entry]:
    """A SwiGLU FFN (dense layer or shared experts): gate and up rows stacked in moelab's w_in."""
    return [Entry(p + "gate_proj.weight", (S, D), b + "w_in.weight", (slice(0, S),)),
            Entry(p + "up_proj.weight", (S, D), b + "w_in.weight", (slice(S, 2 * S),)),
            Entry(p + "down_proj.weight", (D, S), b + "w_out.weight")]

