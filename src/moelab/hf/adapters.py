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

config.json is read with `moelab.hf_config.HFConfig` (its docstring holds the rule for absent, null and
zero fields) and what its fields mean per model_type — MoE layers, KV heads, head width, biases, windows,
experts, routing groups, MLA widths, RoPE — comes from `moelab.hf_arch`, which `moelab.accounting` uses
to count the same architectures: an adapter adds only what moelab's ModelConfig needs besides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moelab import hf_arch
from moelab.config import ModelConfig, MoEConfig
from moelab.hf_config import HFConfig


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


def _silu(c: HFConfig) -> None:
    c.require("hidden_act", lambda v: v in (None, "silu", "swish"), "'silu' (SwiGLU experts)")


def _max_len(c: HFConfig, n_layers: int) -> int:
    """max_position_embeddings, capped at the narrowest attention window: within it, attention is exact."""
    return min([c.int("max_position_embeddings"), *(w for w in hf_arch.layer_windows(c, n_layers) if w)])


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


class Adapter:
    """Base: the Llama-like parts shared by all supported architectures."""

    model_type = ""
    architecture = ""
    expert_names = ("gate_proj", "up_proj", "down_proj")  # per-expert gate, up, down
    moe_prefix = "mlp"
    norm_eps = 1e-6  # transformers' default rms_norm_eps for this architecture

    # -- config ------------------------------------------------------------------------------------
    def config_from_hf(self, c: HFConfig) -> ModelConfig:
        """The moelab config of a config.json: what every architecture shares is read here (its meaning
        per model_type from `moelab.hf_arch`), the rest by `moe_fields` and `attention_fields`."""
        _silu(c)
        qkv_bias, o_bias = hf_arch.attention_biases(c)
        if o_bias:
            raise c.error("field 'attention_bias'=True is not supported by moelab: allowed false (attention "
                          "biases other than Qwen2's q/k/v are not implemented)")
        D, H, n_layers = c.int("hidden_size"), c.int("num_attention_heads"), c.int("num_hidden_layers")
        n_dense, every = _moe_layout(c, n_layers)
        n, k, f = hf_arch.routed_experts(c)
        moe = MoEConfig(d_model=D, d_expert=f, n_experts=n, top_k=k, z_loss_coef=0.0, **self.moe_fields(c, n))
        return ModelConfig(vocab_size=c.int("vocab_size"), d_model=D, n_layers=n_layers, n_heads=H,
                           max_seq_len=_max_len(c, n_layers), rope_theta=hf_arch.rope_theta(c),
                           rope_scaling=hf_arch.rope_scaling(c), norm_eps=c.float("rms_norm_eps", self.norm_eps),
                           tie_embeddings=c.bool("tie_word_embeddings", False), qkv_bias=qkv_bias,
                           qk_norm=hf_arch.qk_norm(c), d_ff=c.int("intermediate_size"), n_dense_layers=n_dense,
                           moe_every=every, moe=moe, **self.attention_fields(c, D, H))

    def moe_fields(self, c: HFConfig, n_experts: int) -> dict[str, Any]:
        """MoEConfig fields besides the expert shape: a softmax router, its aux-loss coefficient."""
        return {"norm_topk_prob": c.bool("norm_topk_prob", False),
                "aux_loss_coef": c.float("router_aux_loss_coef", 0.0)}

    def attention_fields(self, c: HFConfig, D: int, H: int) -> dict[str, Any]:
        """ModelConfig fields of grouped-query attention."""
        return {"n_kv_heads": hf_arch.kv_heads(c, H), "head_dim": hf_arch.head_dim(c, D, H)}

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
    norm_eps = 1e-5

    def moe_fields(self, c: HFConfig, n_experts: int) -> dict[str, Any]:
        """Mixtral always renormalises the top-k probabilities (no norm_topk_prob field)."""
        return {"norm_topk_prob": True, "aux_loss_coef": c.float("router_aux_loss_coef", 0.0)}

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
                "sliding_window": None, "router_jitter_noise": 0.0}


class _Qwen(Adapter):
    """Shared parts of Qwen2-MoE and Qwen3-MoE (their layer layout is `hf_arch.moe_layers`)."""

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

    def mismatch(self, cfg: ModelConfig) -> str | None:
        if (why := self._common_mismatch(cfg) or self._qwen_mismatch(cfg)) is not None:
            return why
        checks = [(cfg.qk_norm == "head", "qk_norm must be 'head'"), (not cfg.qkv_bias, "qkv_bias must be False"),
                  (cfg.moe.n_shared == 0, "n_shared must be 0")]
        return next((why for ok, why in checks if not ok), None)

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**self._qwen_hf(cfg), "attention_bias": False}


class Olmoe(Adapter):
    model_type, architecture = "olmoe", "OlmoeForCausalLM"
    norm_eps = 1e-5

    def config_from_hf(self, c: HFConfig) -> ModelConfig:
        c.require("clip_qkv", lambda v: v is None, "null (q/k/v clipping is not implemented)")
        return super().config_from_hf(c)

    def mismatch(self, cfg: ModelConfig) -> str | None:
        if (why := self._common_mismatch(cfg)) is not None:
            return why
        m = cfg.moe
        checks = [(cfg.attention == "gqa", "attention must be 'gqa'"),
                  (cfg.qk_norm == "full", "qk_norm must be 'full'"),
                  (not cfg.qkv_bias, "qkv_bias must be False"),
                  (m.router == "topk_softmax", "router must be 'topk_softmax'"),
                  (m.n_shared == 0, "n_shared must be 0"),
                  (cfg.head_width == cfg.d_model // cfg.n_heads, "head_dim must be d_model // n_heads (OLMoE sizes "
                                                                  "its q/k norms by hidden_size)"),
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
        return {"n_kv_heads": H, "attention": "mla", "q_lora_rank": w.q_lora_rank, "kv_lora_rank": w.kv_lora_rank,
                "qk_nope_head_dim": w.qk_nope_head_dim, "qk_rope_head_dim": w.qk_rope_head_dim,
                "v_head_dim": w.v_head_dim}

    def attention_entries(self, cfg: ModelConfig, p: str, b: str, c: HFConfig | None) -> list[Entry]:
        D, H, R = cfg.d_model, cfg.n_heads, cfg.qk_rope_head_dim
        qk, r_kv = cfg.qk_nope_head_dim + R, cfg.kv_lora_rank
        interleave = c is not None and c.bool("rope_interleave", True, null=False)  # null: not interleaved
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
    if not isinstance(model_type, str) or model_type not in CHECKPOINT_ADAPTERS:
        raise ValueError(f"{c.where}: model_type={model_type!r} is not supported by moelab.hf: allowed "
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
