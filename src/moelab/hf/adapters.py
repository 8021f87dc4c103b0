"""One adapter per Hugging Face MoE architecture: config mapping and the tensor-name/shape table.

An adapter knows, for one `model_type`, how a Hugging Face `config.json` maps to a moelab
`ModelConfig` (and back), and which Hugging Face tensors make up each moelab tensor. The table is a
list of `Entry`: one Hugging Face tensor name and shape, the moelab state-dict name it lands in, the
index inside that tensor, and the layout change on the way (transpose, row permutation). The same
table drives loading (`moelab.hf.load`) and export (`moelab.hf.save`), so the two are inverses by
construction.

Layouts (legend: E = experts, D = model width, F = expert hidden width, S = shared/dense hidden width):
    moelab  experts.w_in [E, D, 2F] = [gate | up] columns for x @ w;  experts.w_out [E, F, D]
            dense / shared FFN  w_in.weight [2S, D] (gate rows, then up rows);  w_out.weight [D, S]
    HF      per expert  gate_proj / up_proj [F, D], down_proj [D, F]  (Mixtral: w1 / w3 / w2)
            or stacked  experts.gate_up_proj [E, 2F, D], experts.down_proj [E, D, F] (transformers 5
            in memory; accepted on load)

Supported: Mixtral, Qwen2-MoE (sigmoid-gated shared expert), Qwen3-MoE (per-head q/k norm), OLMoE
(full-width q/k norm), DeepSeek-V3 (MLA, sigmoid router with score-correction bias, group-limited
routing, shared experts, dense first layers; interleaved RoPE handled by permuting weight rows). Any of them
may carry YaRN rope scaling (`rope_scaling` / `rope_parameters` with rope_type "yarn" → `RopeScaling`); other
scalings are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moelab.config import ModelConfig, MoEConfig, RopeScaling

_MISSING = object()


@dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor and where it lives in moelab.

    hf_name / hf_shape: the tensor as stored in the Hugging Face checkpoint.
    target: moelab state-dict name; index: the part of the target this tensor fills (None = all).
    transpose: dims swapped between the HF tensor and the target part (None = same layout).
    perm: row permutation applied to the HF tensor on load (its inverse on export), or None.
    covers: canonical names this tensor stands for (a stacked alias covers E per-expert names).
    scale: HF tensor = scale × moelab part (route_scale of a softmax router folded into the down projections).
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    target: str
    index: tuple | None = None
    transpose: tuple[int, int] | None = None
    perm: tuple[int, ...] | None = None
    covers: tuple[str, ...] = ()
    scale: float = 1.0  # moelab value = HF value / scale (folds a route_scale into w_out on export)


class HFConfig:
    """Typed reading of a config.json dict; errors name the field."""

    def __init__(self, data: dict[str, Any], source: str = "config.json") -> None:
        self.data, self.source = data, source

    # transformers writes some fields under the name of its attribute_map (e.g. num_local_experts)
    ALIASES = {"num_experts": ("num_local_experts",), "num_local_experts": ("num_experts",),
               "n_routed_experts": ("num_local_experts",)}

    def get(self, name: str, default: Any = _MISSING) -> Any:
        for key in (name, *self.ALIASES.get(name, ())):
            if key in self.data and self.data[key] is not None:
                return self.data[key]
        if default is _MISSING:
            raise ValueError(f"{self.source}: field {name!r} is missing (needed for model_type="
                             f"{self.data.get('model_type')!r})")
        return default

    def int(self, name: str, default: Any = _MISSING) -> int:
        v = self.get(name, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{self.source}: field {name!r}={v!r} is invalid: allowed an integer >= 0")
        return v

    def float(self, name: str, default: Any = _MISSING) -> float:
        v = self.get(name, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ValueError(f"{self.source}: field {name!r}={v!r} is invalid: allowed a number")
        return float(v)

    def bool(self, name: str, default: Any = _MISSING) -> bool:
        v = self.get(name, default)
        if not isinstance(v, bool):
            raise ValueError(f"{self.source}: field {name!r}={v!r} is invalid: allowed true or false")
        return v

    def require(self, name: str, ok: Callable[[Any], bool], allowed: str, default: Any = None) -> None:
        v = self.data.get(name, default)
        if not ok(v):
            raise ValueError(f"{self.source}: field {name!r}={v!r} is not supported by moelab: allowed {allowed}")

    # keys a YaRN rope_parameters / rope_scaling dict may hold (transformers' _validate_yarn_rope_parameters)
    YARN_KEYS = frozenset({"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
                           "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate",
                           "partial_rotary_factor"})

    def _rope(self) -> tuple[str, dict[str, Any]]:
        """(field name, dict) of the RoPE parameters: `rope_scaling` (older configs; it wins, as in
        transformers) or `rope_parameters` (transformers 5)."""
        for name in ("rope_scaling", "rope_parameters"):
            v = self.data.get(name)
            if v:
                if not isinstance(v, dict) or any(isinstance(x, dict) for x in v.values()):
                    raise ValueError(f"{self.source}: field {name!r}={v!r} is not supported by moelab: allowed one "
                                     "object of RoPE parameters (not one per layer type)")
                return name, v
        return "rope_parameters", {}

    def rope_theta(self) -> float:
        """RoPE base from `rope_parameters` (transformers 5) or `rope_theta` (older)."""
        _, params = self._rope()
        theta = params.get("rope_theta", self.data.get("rope_theta"))
        if theta is None:
            raise ValueError(f"{self.source}: field 'rope_parameters.rope_theta' (or 'rope_theta') is missing")
        return float(theta)

    def rope_scaling(self) -> RopeScaling | None:
        """None for plain RoPE, a `RopeScaling` for YaRN (read as transformers reads it: beta_fast/beta_slow
        default 32/1, factor defaults to max_position_embeddings / original_max_position_embeddings, and
        original_max_position_embeddings to max_position_embeddings); ValueError for any other scaling."""
        name, p = self._rope()
        type_key = "rope_type" if "rope_type" in p else "type"
        rope_type = p.get(type_key, "default")
        partial = p.get("partial_rotary_factor", self.data.get("partial_rotary_factor"))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"{self.source}: field 'partial_rotary_factor'={partial!r} is not supported by moelab: "
                             "allowed 1.0 (RoPE over the whole rotary head)")
        if rope_type == "default":
            return None
        if rope_type != "yarn":
            raise ValueError(f"{self.source}: field '{name}.{type_key}'={rope_type!r} is not supported by moelab: "
                             "allowed 'default' (plain RoPE) or 'yarn' (YaRN); linear, dynamic, llama3 and longrope "
                             "scalings are not implemented")
        unknown = sorted(set(p) - self.YARN_KEYS)
        if unknown:
            raise ValueError(f"{self.source}: field '{name}' has key(s) {unknown} that moelab's YaRN does not "
                             f"implement: allowed {sorted(self.YARN_KEYS)}")
        if "factor" not in p:
            raise ValueError(f"{self.source}: field '{name}.factor' is missing (required for YaRN)")
        max_pos = self.int("max_position_embeddings")
        original = p.get("original_max_position_embeddings", self.data.get("original_max_position_embeddings",
                                                                             max_pos))

        def num(v: Any) -> Any:  # ints as floats; anything else is left for RopeScaling.validate to name
            return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

        try:
            factor = p["factor"] if p["factor"] is not None else max_pos / original
            return RopeScaling(factor=num(factor), original_max_seq_len=original,
                               beta_fast=num(p.get("beta_fast") or 32.0), beta_slow=num(p.get("beta_slow") or 1.0),
                               mscale=num(p.get("mscale")), mscale_all_dim=num(p.get("mscale_all_dim")),
                               attention_factor=num(p.get("attention_factor")), truncate=p.get("truncate", True))
        except (ValueError, TypeError, ZeroDivisionError) as e:
            raise ValueError(f"{self.source}: field '{name}' (YaRN) is invalid: {e}") from None


def _silu(c: HFConfig) -> None:
    c.require("hidden_act", lambda v: v in (None, "silu", "swish"), "'silu' (SwiGLU experts)")


def _max_len(c: HFConfig) -> int:
    """max_position_embeddings, capped at the sliding window: within the window, attention is exact."""
    n = c.int("max_position_embeddings")
    window = c.data.get("sliding_window")
    if window and c.data.get("use_sliding_window", True) and window < n:
        n = window
    return n


def _rope_params(cfg: ModelConfig) -> dict[str, Any]:
    """transformers 5's `rope_parameters`: plain RoPE, or YaRN with every field moelab uses."""
    s = cfg.rope_scaling
    if s is None:
        return {"rope_parameters": {"rope_theta": float(cfg.rope_theta), "rope_type": "default"}}
    p = {"rope_theta": float(cfg.rope_theta), "rope_type": "yarn", "factor": float(s.factor),
         "original_max_position_embeddings": s.original_max_seq_len, "beta_fast": float(s.beta_fast),
         "beta_slow": float(s.beta_slow)}
    p |= {k: float(getattr(s, k)) for k in ("mscale", "mscale_all_dim", "attention_factor")
          if getattr(s, k) is not None}
    if not s.truncate:
        p["truncate"] = False
    return {"rope_parameters": p}


def _moe_layout(n_layers: int, moe_layers: list[int], source: str) -> tuple[int, int]:
    """(n_dense_layers, moe_every) reproducing exactly this set of MoE layers, or ValueError."""
    if not moe_layers:
        raise ValueError(f"{source}: no MoE layer (mlp_only_layers / decoder_sparse_step leave none); "
                         "moelab.hf loads Mixture-of-Experts models")
    first = moe_layers[0]
    for every in range(1, n_layers + 1):
        if [i for i in range(first, n_layers) if (i - first) % every == 0] == moe_layers:
            return first, every
    raise ValueError(f"{source}: MoE layers {moe_layers} (from mlp_only_layers / decoder_sparse_step) are not "
                     "'the first n dense, then every k-th' — moelab cannot represent this layout")


class Adapter:
    """Base: the Llama-like parts shared by all supported architectures."""

    model_type = ""
    architecture = ""
    expert_names = ("gate_proj", "up_proj", "down_proj")  # per-expert gate, up, down
    moe_prefix = "mlp"

    # -- config ------------------------------------------------------------------------------------
    def config_from_hf(self, c: HFConfig) -> ModelConfig:
        raise NotImplementedError

    def mismatch(self, cfg: ModelConfig) -> str | None:
        """Why this moelab config cannot be written as this architecture (None = it can)."""
        raise NotImplementedError

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def _common_mismatch(cfg: ModelConfig) -> str | None:
        m = cfg.moe
        if m is None:
            return "moe is None (a dense model); these architectures are Mixture-of-Experts"
        if m.activation != "swiglu" or cfg.activation != "swiglu":
            return f"activation={m.activation!r}/{cfg.activation!r}: Hugging Face MoE models use SwiGLU"
        if m.capacity_factor is not None:
            return f"moe.capacity_factor={m.capacity_factor!r}: Hugging Face MoE models are dropless (None)"
        if m.router not in ("topk_softmax", "sigmoid"):
            return f"moe.router={m.router!r}: only 'topk_softmax' and 'sigmoid' routers exist in these architectures"
        return None

    def _base_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
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
        # softmax architectures have no routed scaling factor: fold moelab's into the expert outputs (exact)
        s = 1.0 if m.router == "sigmoid" else m.route_scale
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


def ffn_entries(p: str, b: str, D: int, S: int) -> list[Entry]:
    """A SwiGLU FFN (dense layer or shared experts): gate and up rows stacked in moelab's w_in."""
    return [Entry(p + "gate_proj.weight", (S, D), b + "w_in.weight", (slice(0, S),)),
            Entry(p + "up_proj.weight", (S, D), b + "w_in.weight", (slice(S, 2 * S),)),
            Entry(p + "down_proj.weight", (D, S), b + "w_out.weight")]


class Mixtral(Adapter):
    model_type, architecture = "mixtral", "MixtralForCausalLM"
    expert_names = ("w1", "w3", "w2")
    moe_prefix = "block_sparse_moe"

    def config_from_hf(self, c: HFConfig) -> ModelConfig:
        _silu(c)
        D = c.int("hidden_size")
        moe = MoEConfig(d_model=D, d_expert=c.int("intermediate_size"), n_experts=c.int("num_local_experts"),
                        top_k=c.int("num_experts_per_tok"), router="topk_softmax", norm_topk_prob=True,
                        aux_loss_coef=c.float("router_aux_loss_coef", 0.0), z_loss_coef=0.0)
        return ModelConfig(vocab_size=c.int("vocab_size"), d_model=D, n_layers=c.int("num_hidden_layers"),
                           n_heads=c.int("num_attention_heads"), n_kv_heads=c.int("num_key_value_heads"),
                           head_dim=c.get("head_dim", None), max_seq_len=_max_len(c), rope_theta=c.rope_theta(),
                           rope_scaling=c.rope_scaling(),
                           norm_eps=c.float("rms_norm_eps", 1e-5),
                           tie_embeddings=c.bool("tie_word_embeddings", False), d_ff=moe.d_expert, moe=moe)

    def mismatch(self, cfg: ModelConfig) -> str | None:
        if (why := self._common_mismatch(cfg)) is not None:
            return why
        m = cfg.moe
        checks = [(cfg.attention == "gqa", "attention must be 'gqa'"),
                  (cfg.qk_norm == "none", "qk_norm must be 'none'"),
                  (not cfg.qkv_bias, "qkv_bias must be False"),
                  (m.router == "topk_softmax", "router must be 'topk_softmax'"),
                  (m.norm_topk_prob, "norm_topk_prob must be True"), (m.n_shared == 0, "n_shared must be 0"),
                  (cfg.n_dense_layers == 0 and cfg.moe_every == 1, "every layer must be MoE"),
                  (m.n_groups == 1 and not m.expert_bias, "no group-limited routing or expert bias")]
        return next((why for ok, why in checks if not ok), None)

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**self._base_hf(cfg), "intermediate_size": cfg.moe.d_expert, "num_local_experts": cfg.moe.n_experts,
                "head_dim": cfg.head_width, "sliding_window": None, "router_jitter_noise": 0.0}


class _Qwen(Adapter):
    """Shared parts of Qwen2-MoE and Qwen3-MoE: sparse-step / mlp-only layer layout, dense d_ff."""

    def _layout(self, c: HFConfig) -> tuple[int, int]:
        n = c.int("num_hidden_layers")
        only = c.get("mlp_only_layers", []) or []
        step = c.int("decoder_sparse_step", 1) or 1
        moe = [i for i in range(n) if i not in only and (i + 1) % step == 0] if c.int("num_experts") > 0 else []
        return _moe_layout(n, moe, c.source)

    def _qwen_mismatch(self, cfg: ModelConfig) -> str | None:
        m = cfg.moe
        checks = [(cfg.attention == "gqa", "attention must be 'gqa'"),
                  (m.router == "topk_softmax", "router must be 'topk_softmax'"),
                  (m.n_groups == 1 and not m.expert_bias, "no group-limited routing or expert bias")]
        return next((why for ok, why in checks if not ok), None)

    def _qwen_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**self._base_hf(cfg), "num_experts": cfg.moe.n_experts, "moe_intermediate_size": cfg.moe.d_expert,
                "intermediate_size": cfg.d_ff, "norm_topk_prob": cfg.moe.norm_topk_prob, "decoder_sparse_step": 1,
                "mlp_only_layers": [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)],
                "use_sliding_window": False, "sliding_window": None}


class Qwen2Moe(_Qwen):
    model_type, architecture = "qwen2_moe", "Qwen2MoeForCausalLM"

    def config_from_hf(self, c: HFConfig) -> ModelConfig:
        _silu(c)
        D = c.int("hidden_size")
        n_dense, every = self._layout(c)
        shared = c.int("shared_expert_intermediate_size")
        moe = MoEConfig(d_model=D, d_expert=c.int("moe_intermediate_size"), n_experts=c.int("num_experts"),
                        top_k=c.int("num_experts_per_tok"), n_shared=1 if shared else 0, d_shared=shared or None,
                        shared_gate=bool(shared), norm_topk_prob=c.bool("norm_topk_prob", False),
                        aux_loss_coef=c.float("router_aux_loss_coef", 0.0), z_loss_coef=0.0)
        return ModelConfig(vocab_size=c.int("vocab_size"), d_model=D, n_layers=c.int("num_hidden_layers"),
                           n_heads=c.int("num_attention_heads"), n_kv_heads=c.int("num_key_value_heads"),
                           max_seq_len=_max_len(c), rope_theta=c.rope_theta(),
                           rope_scaling=c.rope_scaling(), norm_eps=c.float("rms_norm_eps", 1e-6),
                           tie_embeddings=c.bool("tie_word_embeddings", False), qkv_bias=c.bool("qkv_bias", True),
                           d_ff=c.int("intermediate_size"), n_dense_layers=n_dense, moe_every=every, moe=moe)

    def moe_entries(self, cfg: ModelConfig, p: str, b: str) -> list[Entry]:
        out = super().moe_entries(cfg, p, b)
        if cfg.moe.n_shared:
            out += ffn_entries(p + "shared_expert.", b + "shared.", cfg.d_model, cfg.moe.shared_width)
            out.append(Entry(p + "shared_expert_gate.weight", (1, cfg.d_model), b + "shared_gate.weight"))
        return out

    def mismatch(self, cfg: ModelConfig) -> str | None:
        if (why := self._common_mismatch(cfg) or self._qwen_mismatch(cfg)) is not None:
            return why
        if cfg.qk_norm != "none":
            return "qk_norm must be 'none'"
        if not (cfg.moe.n_shared and cfg.moe.shared_gate):
            return "needs shared experts with shared_gate=True"
        return None

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**self._qwen_hf(cfg), "qkv_bias": cfg.qkv_bias, "shared_expert_intermediate_size": cfg.moe.shared_width,
                "layer_types": ["full_attention"] * cfg.n_layers}


class Qwen3Moe(_Qwen):
    model_type, architecture = "qwen3_moe", "Qwen3MoeForCausalLM"

    def config_from_hf(self, c: HFConfig) -> ModelConfig:
        _silu(c)
        c.require("attention_bias", lambda v: not v, "false (biases on q/k/v/o are not implemented)")
        D = c.int("hidden_size")
        n_dense, every = self._layout(c)
        moe = MoEConfig(d_model=D, d_expert=c.int("moe_intermediate_size"), n_experts=c.int("num_experts"),
                        top_k=c.int("num_experts_per_tok"), norm_topk_prob=c.bool("norm_topk_prob", False),
                        aux_loss_coef=c.float("router_aux_loss_coef", 0.0), z_loss_coef=0.0)
        return ModelConfig(vocab_size=c.int("vocab_size"), d_model=D, n_layers=c.int("num_hidden_layers"),
                           n_heads=c.int("num_attention_heads"), n_kv_heads=c.int("num_key_value_heads"),
                           head_dim=c.get("head_dim", None), max_seq_len=_max_len(c), rope_theta=c.rope_theta(),
                           rope_scaling=c.rope_scaling(),
                           norm_eps=c.float("rms_norm_eps", 1e-6), qk_norm="head",
                           tie_embeddings=c.bool("tie_word_embeddings", False),
                           d_ff=c.int("intermediate_size"), n_dense_layers=n_dense, moe_every=every, moe=moe)

    def mismatch(self, cfg: ModelConfig) -> str | None:
        if (why := self._common_mismatch(cfg) or self._qwen_mismatch(cfg)) is not None:
            return why
        checks = [(cfg.qk_norm == "head", "qk_norm must be 'head'"), (not cfg.qkv_bias, "qkv_bias must be False"),
                  (cfg.moe.n_shared == 0, "n_shared must be 0")]
        return next((why for ok, why in checks if not ok), None)

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**self._qwen_hf(cfg), "head_dim": cfg.head_width, "attention_bias": False}


class Olmoe(Adapter):
    model_type, architecture = "olmoe", "OlmoeForCausalLM"

    def config_from_hf(self, c: HFConfig) -> ModelConfig:
        _silu(c)
        c.require("attention_bias", lambda v: not v, "false (biases on q/k/v/o are not implemented)")
        c.require("clip_qkv", lambda v: v is None, "null (q/k/v clipping is not implemented)")
        D = c.int("hidden_size")
        moe = MoEConfig(d_model=D, d_expert=c.int("intermediate_size"), n_experts=c.int("num_experts"),
                        top_k=c.int("num_experts_per_tok"), norm_topk_prob=c.bool("norm_topk_prob", False),
                        aux_loss_coef=c.float("router_aux_loss_coef", 0.0), z_loss_coef=0.0)
        return ModelConfig(vocab_size=c.int("vocab_size"), d_model=D, n_layers=c.int("num_hidden_layers"),
                           n_heads=c.int("num_attention_heads"), n_kv_heads=c.int("num_key_value_heads"),
                           max_seq_len=_max_len(c), rope_theta=c.rope_theta(),
                           rope_scaling=c.rope_scaling(), norm_eps=c.float("rms_norm_eps", 1e-5),
                           qk_norm="full", tie_embeddings=c.bool("tie_word_embeddings", False),
                           d_ff=moe.d_expert, moe=moe)

    def mismatch(self, cfg: ModelConfig) -> str | None:
        if (why := self._common_mismatch(cfg)) is not None:
            return why
        m = cfg.moe
        checks = [(cfg.attention == "gqa", "attention must be 'gqa'"),
                  (cfg.qk_norm == "full", "qk_norm must be 'full'"),
                  (not cfg.qkv_bias, "qkv_bias must be False"),
                  (m.router == "topk_softmax", "router must be 'topk_softmax'"),
                  (m.n_shared == 0, "n_shared must be 0"), (cfg.head_dim in (None, cfg.d_model // cfg.n_heads),
                                                             "head_dim must be d_model // n_heads"),
                  (cfg.n_dense_layers == 0 and cfg.moe_every == 1, "every layer must be MoE"),
                  (m.n_groups == 1 and not m.expert_bias, "no group-limited routing or expert bias")]
        return next((why for ok, why in checks if not ok), None)

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**self._base_hf(cfg), "intermediate_size": cfg.moe.d_expert, "num_experts": cfg.moe.n_experts,
                "norm_topk_prob": cfg.moe.norm_topk_prob, "attention_bias": False, "clip_qkv": None}


def _deinterleave(n: int) -> tuple[int, ...]:
    """Row order turning DeepSeek's interleaved rotary pairs (x0, x1), (x2, x3)... into rotate-half halves."""
    return tuple(range(0, n, 2)) + tuple(range(1, n, 2))


class DeepseekV3(Adapter):
    model_type, architecture = "deepseek_v3", "DeepseekV3ForCausalLM"

    def config_from_hf(self, c: HFConfig) -> ModelConfig:
        _silu(c)
        c.require("attention_bias", lambda v: not v, "false (MLA projection biases are not implemented)")
        c.require("topk_method", lambda v: v in (None, "noaux_tc"), "'noaux_tc' (sigmoid + score-correction bias)")
        c.require("scoring_func", lambda v: v in (None, "sigmoid"), "'sigmoid'")
        c.require("moe_layer_freq", lambda v: v in (None, 1), "1")
        D, H = c.int("hidden_size"), c.int("num_attention_heads")
        c.require("num_key_value_heads", lambda v: v in (None, H), f"equal to num_attention_heads ({H}) for MLA")
        n_shared = c.int("n_shared_experts", 0)
        moe = MoEConfig(d_model=D, d_expert=c.int("moe_intermediate_size"), n_experts=c.int("n_routed_experts"),
                        top_k=c.int("num_experts_per_tok"), n_shared=n_shared, router="sigmoid",
                        norm_topk_prob=c.bool("norm_topk_prob", True),
                        route_scale=c.float("routed_scaling_factor", 1.0), n_groups=c.int("n_group", 1),
                        topk_groups=c.int("topk_group", 1), expert_bias=True, aux_loss_coef=0.0, z_loss_coef=0.0)
        n_layers = c.int("num_hidden_layers")
        return ModelConfig(vocab_size=c.int("vocab_size"), d_model=D, n_layers=n_layers, n_heads=H, n_kv_heads=H,
                           max_seq_len=_max_len(c), rope_theta=c.rope_theta(),
                           rope_scaling=c.rope_scaling(), norm_eps=c.float("rms_norm_eps", 1e-6),
                           tie_embeddings=c.bool("tie_word_embeddings", False), d_ff=c.int("intermediate_size"),
                           n_dense_layers=min(c.int("first_k_dense_replace", 0), n_layers), moe=moe, attention="mla",
                           q_lora_rank=c.get("q_lora_rank", None), kv_lora_rank=c.int("kv_lora_rank"),
                           qk_nope_head_dim=c.int("qk_nope_head_dim"), qk_rope_head_dim=c.int("qk_rope_head_dim"),
                           v_head_dim=c.int("v_head_dim"))

    def attention_entries(self, cfg: ModelConfig, p: str, b: str, c: HFConfig | None) -> list[Entry]:
        D, H, R = cfg.d_model, cfg.n_heads, cfg.qk_rope_head_dim
        qk, r_kv = cfg.qk_nope_head_dim + R, cfg.kv_lora_rank
        interleave = c is not None and c.bool("rope_interleave", True)
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

    def mismatch(self, cfg: ModelConfig) -> str | None:
        if (why := self._common_mismatch(cfg)) is not None:
            return why
        m = cfg.moe
        checks = [(cfg.attention == "mla", "attention must be 'mla'"),
                  (m.router == "sigmoid", "router must be 'sigmoid'"),
                  (m.n_shared > 0 and m.shared_width % m.d_expert == 0,
                   "shared experts whose total width is a multiple of d_expert"),
                  (not m.shared_gate, "shared_gate must be False"), (cfg.moe_every == 1, "moe_every must be 1"),
                  (cfg.norm_eps == 1e-6, "norm_eps must be 1e-6 (transformers fixes the MLA latent norms' eps)"),
                  (m.n_experts // m.n_groups >= 2, "at least 2 experts per group (group score = sum of top-2)")]
        return next((why for ok, why in checks if not ok), None)

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


# model_type -> the adapter that maps its config.json and tensors to moelab's (load and save)
CHECKPOINT_ADAPTERS: dict[str, Adapter] = {a.model_type: a for a in (Mixtral(), Qwen2Moe(), Qwen3Moe(), Olmoe(),
                                                                     DeepseekV3())}


def adapter_for(c: HFConfig) -> Adapter:
    """The adapter of a config.json's `model_type`, or ValueError naming it and the supported ones."""
    model_type = c.data.get("model_type")
    if model_type not in CHECKPOINT_ADAPTERS:
        raise ValueError(f"{c.source}: model_type={model_type!r} is not supported by moelab.hf: allowed "
                         + ", ".join(repr(k) for k in CHECKPOINT_ADAPTERS))
    return CHECKPOINT_ADAPTERS[model_type]


def adapter_matching(cfg: ModelConfig) -> Adapter:
    """The architecture a moelab config can be exported as, or ValueError listing why none fits."""
    reasons = []
    for a in CHECKPOINT_ADAPTERS.values():
        why = a.mismatch(cfg)
        if why is None:
            return a
        reasons.append(f"{a.model_type}: {why}")
    raise ValueError("no Hugging Face architecture matches this moelab config — " + "; ".join(reasons))
