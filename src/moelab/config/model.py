"""Configuration dataclasses for moelab models, validated in one place.

`MoEConfig` describes one Mixture-of-Experts layer, `ModelConfig` a decoder-only language model built
from such layers (`RopeScaling` its optional YaRN context extension); how to train one is
`moelab.config.train.TrainConfig`. Both are frozen dataclasses; `validate()` runs on construction and raises
`ValueError` naming the field, the value and what is allowed. Both round-trip through plain JSON
(`to_dict` / `from_dict`), which is how checkpoints store them.

`RopeScaling` lives in `moelab.config.rope`, the validators and the JSON round trip in `moelab.config.fields`;
all are importable from `moelab.config`. This module imports no torch: `moelab.accounting` reads configs on
machines without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moelab.config.fields import _choice, _fail, _is_number, _JsonMixin, _nonneg_number, _positive_int
from moelab.config.rope import RopeScaling

ROUTERS = ("topk_softmax", "switch", "sigmoid", "expert_choice", "noisy_topk")
ACTIVATIONS = ("swiglu", "gelu")
EXPERT_ACTIVATIONS = (*ACTIVATIONS, "clamped_swiglu")
BACKENDS = ("auto", "loop", "padded", "grouped_mm")
ATTENTIONS = ("gqa", "mla")
QK_NORMS = ("none", "head", "full")

@dataclass(frozen=True)
class MoEConfig(_JsonMixin):
    """One MoE feed-forward layer: a router picks experts per token; only those experts run.

    Defaults are sized for a CPU run.

    Fields:
        d_model: width of the token vectors going in and out.
        d_expert: hidden width f of one routed expert (SwiGLU: gate+up [d, 2f], down [f, d]).
        n_experts: number of routed experts E.
        top_k: experts per token k (token-choice routers); for expert choice, the average
            number of experts per token (sets the per-expert capacity c = cf * T * k / E).
        n_shared: always-on shared experts (DeepSeekMoE, Qwen2-MoE); each of width `d_shared`.
        d_shared: width of one shared expert; None means `d_expert`.
        shared_gate: scale the shared output by sigmoid(x · w) (Qwen2-MoE's shared_expert_gate).
        router: "topk_softmax" (Mixtral, OLMoE, Qwen-MoE), "switch" (top-1, Fedus et al. 2021),
            "sigmoid" (DeepSeek-V3 scores with a selection-only bias), "expert_choice" (Zhou et al.
            2022; each expert picks its tokens — not causal, unsuitable for autoregressive decoding),
            "noisy_topk" (Shazeer et al. 2017: in training the top-k of x·W_g + N(0,1)·softplus(x·W_noise),
            softmax over the kept k; at eval and decode plain top-k softmax over x·W_g, i.e. Mixtral's gate).
        norm_topk_prob: renormalise the k chosen weights to sum to 1 (Mixtral: True; OLMoE and
            Qwen `norm_topk_prob=False`: False). For "sigmoid" the chosen scores are renormalised
            when True (DeepSeek-V3 does).
        route_scale: multiplies the gating weights (DeepSeek-V3 `routed_scaling_factor`, 2.5).
        n_groups / topk_groups: group-limited routing (DeepSeek-V2/V3): experts split into
            n_groups groups; a token first picks topk_groups groups (group score = sum of its top-2
            scores for sigmoid, max for softmax), then its top-k experts inside them.
        capacity_factor: None = dropless. Otherwise each expert takes at most
            ceil(cf * T * k / E) assignments; the rest are dropped (their expert output is zero and
            the residual carries the token).
        expert_bias: keep a per-expert bias used for selection only, updated by
            `moelab.layer.balance.update_expert_bias` after the optimizer step (auxiliary-loss-free
            balancing, Wang et al. 2024 / DeepSeek-V3). Only for the "sigmoid" router (bias added to
            the scores) and the "topk_softmax" router (bias added to the logits, so in logit units).
        bias_update_rate: γ of the bias update `b_i += γ · sign(mean_load − load_i)`.
        aux_loss_coef: weight of the Switch load-balance loss E · Σ f_i · P_i (0 turns it off).
        seq_aux_loss_coef: weight of DeepSeek-V3's sequence-wise balance loss (0 turns it off).
        z_loss_coef: weight of the router z-loss (ST-MoE, Zoph et al. 2022) (0 turns it off).
        importance_loss_coef: weight of the importance loss CV(Σ_batch G(x))², the squared coefficient of
            variation of each expert's summed gate values (Shazeer et al. 2017, eqs. 6-7) (0 turns
            it off; token-choice routers). Written to config.json only when set.
        load_loss_coef: weight of the load loss CV(Σ_batch P(x, i))², P the smooth probability that expert i
            is in the token's top-k under the gate noise (Shazeer et al. 2017, appendix A) (0 turns it
            off; router='noisy_topk' only). Written to config.json only when set.
        freeze_router: the router weight gets no gradient (requires_grad=False).
        activation: "swiglu" (default), "gelu" (two-matrix experts) or "clamped_swiglu" (gpt-oss, with
            `biases`: (clamp(up, ±7) + 1) · g · sigmoid(1.702 g), g = min(gate, 7); see moelab.layer.biased_experts).
        biases: learned biases on the router logits and on both projections of every expert (gpt-oss);
            the experts are then a `moelab.layer.biased_experts.BiasedExperts` store. Written to config.json only
            when set.
        backend: grouped expert compute: "auto", "loop" (segment loop over non-empty experts),
            "padded" (batched matmul over capacity-padded slots), "grouped_mm"
            (`torch.nn.functional.grouped_mm`, where the build has it).
    """

    d_model: int = 256
    d_expert: int = 128
    n_experts: int = 8
    top_k: int = 2
    n_shared: int = 0
    d_shared: int | None = None
    shared_gate: bool = False
    router: str = field(default="topk_softmax", metadata={"choices": ROUTERS})
    norm_topk_prob: bool = True
    route_scale: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    capacity_factor: float | None = None
    expert_bias: bool = False
    bias_update_rate: float = 1e-3
    aux_loss_coef: float = 0.01
    seq_aux_loss_coef: float = 0.0
    z_loss_coef: float = 1e-3
    importance_loss_coef: float = 0.0
    load_loss_coef: float = 0.0
    freeze_router: bool = False
    activation: str = field(default="swiglu", metadata={"choices": EXPERT_ACTIVATIONS})
    backend: str = field(default="auto", metadata={"choices": BACKENDS})
    biases: bool = False

    _OMIT_DEFAULTS = ("biases", "importance_loss_coef", "load_loss_coef")

    def __post_init__(self) -> None:
        self.validate()

    @property
    def shared_width(self) -> int:
        """Total hidden width of the shared experts (they run as one fused FFN)."""
        return self.n_shared * (self.d_shared if self.d_shared is not None else self.d_expert)

    def validate(self) -> None:
        for name in ("d_model", "d_expert", "n_experts", "top_k", "n_groups", "topk_groups"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.n_shared, int) or self.n_shared < 0:
            _fail("n_shared", self.n_shared, "an integer >= 0")
        if self.d_shared is not None:
            _positive_int("d_shared", self.d_shared)
        _choice("router", self.router, ROUTERS)
        _choice("activation", self.activation, EXPERT_ACTIVATIONS)
        _choice("backend", self.backend, BACKENDS)
        if not isinstance(self.biases, bool):
            _fail("biases", self.biases, "true or false")
        if self.biases != (self.activation == "clamped_swiglu"):  # the one store with biases is gpt-oss's
            _fail("activation", self.activation, "'clamped_swiglu' with biases=True, and only then (gpt-oss experts)")
        if self.top_k > self.n_experts:
            _fail("top_k", self.top_k, f"1 <= top_k <= n_experts ({self.n_experts})")
        if self.router == "switch" and self.top_k != 1:
            _fail("top_k", self.top_k, "1 for router='switch' (Switch routes each token to one expert)")
        if self.n_experts % self.n_groups:
            _fail("n_groups", self.n_groups, f"a divisor of n_experts ({self.n_experts})")
        if self.topk_groups > self.n_groups:
            _fail("topk_groups", self.topk_groups, f"1 <= topk_groups <= n_groups ({self.n_groups})")
        if self.n_groups > 1:
            if self.router not in ("sigmoid", "topk_softmax"):
                _fail("n_groups", self.n_groups, "1 unless router is 'sigmoid' or 'topk_softmax'")
            per_group = self.n_experts // self.n_groups
            if self.top_k > self.topk_groups * per_group:
                _fail("top_k", self.top_k,
                      f"<= topk_groups * experts per group ({self.topk_groups * per_group})")
        if self.capacity_factor is not None and (
            not isinstance(self.capacity_factor, (int, float)) or not self.capacity_factor > 0
        ):
            _fail("capacity_factor", self.capacity_factor, "None (dropless) or a number > 0")
        if self.router == "expert_choice" and self.capacity_factor is None:
            _fail("capacity_factor", None, "a number > 0 for router='expert_choice' (sets tokens per expert)")
        if self.expert_bias and self.router not in ("sigmoid", "topk_softmax"):
            _fail("expert_bias", True, "False unless router is 'sigmoid' or 'topk_softmax'")
        for name in ("route_scale", "bias_update_rate", "aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef",
                     "importance_loss_coef", "load_loss_coef"):
            _nonneg_number(name, getattr(self, name))
        if self.router == "noisy_topk" and self.norm_topk_prob is not True:
            _fail("norm_topk_prob", self.norm_topk_prob,
                  "True for router='noisy_topk' (its gate is a softmax over the kept k, Shazeer et al. 2017)")
        if self.load_loss_coef > 0 and self.router != "noisy_topk":
            _fail("load_loss_coef", self.load_loss_coef, "0 unless router is 'noisy_topk' (the load loss needs the "
                  "gate noise)")
        if self.importance_loss_coef > 0 and self.router == "expert_choice":
            _fail("importance_loss_coef", self.importance_loss_coef, "0 for router='expert_choice' (token-choice "
                  "routers only)")
        if not self.route_scale > 0:
            _fail("route_scale", self.route_scale, "a number > 0")
        if self.shared_gate and self.n_shared == 0:
            _fail("shared_gate", True, "False when n_shared == 0")


@dataclass(frozen=True)
class ModelConfig(_JsonMixin):
    """A decoder-only MoE language model (pre-norm, RMSNorm, RoPE, grouped-query attention).

    Fields:
        vocab_size: tokens in the vocabulary.
        d_model: residual stream width.
        n_layers: transformer blocks.
        n_heads / n_kv_heads: query heads / key-value heads (GQA: n_heads % n_kv_heads == 0).
        head_dim: per-head width; None means d_model // n_heads.
        max_seq_len: longest sequence the model accepts (RoPE tables are built for it).
        rope_theta: RoPE base.
        rope_scaling: a `RopeScaling` (YaRN context extension, e.g. DeepSeek-V3's factor 40 over 4096
            positions), or None for plain RoPE. Stored in config.json only when set, so configs written
            before the field existed read and compare unchanged.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: output head shares the input embedding matrix.
        qkv_bias: biases on the query/key/value projections (Qwen2-MoE has them).
        activation: activation of the dense FFNs ("swiglu" or "gelu"); MoE experts use moe.activation.
        qk_norm: RMSNorm on queries and keys: "none", "head" (over each head's width, weights
            [head_dim] shared by heads: Qwen3) or "full" (over all heads at once, weights
            [n_heads·head_dim] and [n_kv_heads·head_dim]: OLMoE).
        d_ff: hidden width of the dense FFN used in dense layers.
        n_dense_layers: the first n layers use a dense FFN (DeepSeek's first_k_dense_replace).
        moe_every: after the dense layers, every `moe_every`-th layer is MoE (1 = all; 2 = every other,
            the rest dense).
        moe: the MoE layer config, or None for a fully dense model. moe.d_model must equal d_model.
        attention: "gqa" or "mla" (multi-head latent attention, DeepSeek-V2/V3); the MLA fields
            below are used only when attention == "mla".
        q_lora_rank: MLA query compression rank (None = full-rank query projection).
        kv_lora_rank: MLA compressed key/value latent width.
        qk_nope_head_dim / qk_rope_head_dim / v_head_dim: MLA per-head widths.
        dropout: dropout on attention output and FFN output during training.
        embed_scale / residual_scale / logits_scaling / attn_scale: Granite's multipliers (IBM 2024,
            GraniteMoE): the embeddings are multiplied by embed_scale, each block's attention and FFN
            outputs by residual_scale before they join the residual stream, the logits divided by
            logits_scaling, and attention scores multiplied by attn_scale (None: 1/sqrt(head width)).
            Written to config.json only when set (as rope_scaling).
        rotary_dim: RoPE rotates only the first rotary_dim channels of each head, the rest pass
            through (partial rotary, GLM-4.5: half the head); None rotates the whole head (GQA only).
        o_bias: a bias on the attention output projection (gpt-oss; GQA only).
        attn_sinks: one learned logit per head joins every query's softmax and takes its share of the
            probability mass, attending to nothing (gpt-oss; GQA only; moelab.model.attend).
        sliding_window / sliding_every: layers i with i % sliding_every == 0 attend to the last
            sliding_window positions only (the query's own included); None: every layer sees the whole
            context (gpt-oss: 128 and 2, alternating windowed and full layers).
    """

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int | None = None
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qkv_bias: bool = False
    activation: str = field(default="swiglu", metadata={"choices": ACTIVATIONS})
    qk_norm: str = field(default="none", metadata={"choices": QK_NORMS})
    d_ff: int = 512
    n_dense_layers: int = 0
    moe_every: int = 1
    moe: MoEConfig | None = field(default_factory=MoEConfig)
    attention: str = field(default="gqa", metadata={"choices": ATTENTIONS})
    q_lora_rank: int | None = None
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    dropout: float = 0.0
    rope_scaling: RopeScaling | None = None
    embed_scale: float = 1.0
    residual_scale: float = 1.0
    logits_scaling: float = 1.0
    attn_scale: float | None = None
    rotary_dim: int | None = None
    o_bias: bool = False
    attn_sinks: bool = False
    sliding_window: int | None = None
    sliding_every: int = 1

    _OMIT_DEFAULTS = ("rope_scaling", "embed_scale", "residual_scale", "logits_scaling", "attn_scale", "rotary_dim",
                      "o_bias", "attn_sinks", "sliding_window", "sliding_every")

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # from JSON
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        self.validate()

    @property
    def head_width(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of block `layer` (0-based), or None when it attends to the whole context."""
        return self.sliding_window if layer % self.sliding_every == 0 else None

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) uses the MoE feed-forward."""
        if self.moe is None or layer < self.n_dense_layers:
            return False
        return (layer - self.n_dense_layers) % self.moe_every == 0

    def dense_twin(self) -> ModelConfig:
        """The same model with every MoE block replaced by one dense FFN of the same *active* width.

        Active width = top_k · d_expert + shared width, so per-token FFN compute matches the MoE
        model's (routers aside). Dense layers keep their own d_ff; each MoE layer becomes dense
        with the active width, which needs one d_ff for all layers, so this requires the MoE
        model to have no dense layers of a different width.
        """
        if self.moe is None:
            return self
        active = self.moe.top_k * self.moe.d_expert + self.moe.shared_width
        has_dense = self.n_dense_layers > 0 or self.moe_every > 1
        if has_dense and self.d_ff != active:
            raise ValueError(
                f"dense_twin: the model mixes dense layers (d_ff={self.d_ff}) with MoE layers of active "
                f"width {active}; set d_ff={active} or n_dense_layers=0 and moe_every=1 to get a twin"
            )
        return self.replace(moe=None, d_ff=active, n_dense_layers=0, moe_every=1, activation=self.moe.activation)

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len",
                     "d_ff", "moe_every"):
            _positive_int(name, getattr(self, name))
        if self.head_dim is not None:
            _positive_int("head_dim", self.head_dim)
        elif self.d_model % self.n_heads:
            _fail("n_heads", self.n_heads, f"a divisor of d_model ({self.d_model}) when head_dim is None")
        if self.n_heads % self.n_kv_heads:
            _fail("n_kv_heads", self.n_kv_heads, f"a divisor of n_heads ({self.n_heads})")
        if not isinstance(self.n_dense_layers, int) or not 0 <= self.n_dense_layers <= self.n_layers:
            _fail("n_dense_layers", self.n_dense_layers, f"an integer in [0, n_layers={self.n_layers}]")
        _choice("attention", self.attention, ATTENTIONS)
        _choice("qk_norm", self.qk_norm, QK_NORMS)
        _choice("activation", self.activation, ACTIVATIONS)
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                _positive_int(name, getattr(self, name))
            if self.q_lora_rank is not None:
                _positive_int("q_lora_rank", self.q_lora_rank)
            if self.qk_rope_head_dim % 2:
                _fail("qk_rope_head_dim", self.qk_rope_head_dim, "an even integer (RoPE rotates pairs)")
        elif self.head_width % 2:
            _fail("head_dim", self.head_width, "an even integer (RoPE rotates pairs)")
        for name in ("o_bias", "attn_sinks"):
            if not isinstance(getattr(self, name), bool) or (getattr(self, name) and self.attention != "gqa"):
                _fail(name, getattr(self, name), "false, or true with attention='gqa'")
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
        _positive_int("sliding_every", self.sliding_every)
        if self.rotary_dim is not None:
            _positive_int("rotary_dim", self.rotary_dim)
            if self.rotary_dim % 2 or self.rotary_dim > self.head_width or self.attention != "gqa":
                _fail("rotary_dim", self.rotary_dim, f"None or an even integer <= the head width ({self.head_width}) "
                      "with attention='gqa'")
        if not self.rope_theta > 0:
            _fail("rope_theta", self.rope_theta, "a number > 0")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            _fail("rope_scaling", self.rope_scaling, "None or a RopeScaling (a dict of its fields in JSON)")
        if not 0 <= self.dropout < 1:
            _fail("dropout", self.dropout, "a number in [0, 1)")
        for name in ("embed_scale", "residual_scale", "logits_scaling", "attn_scale"):
            v = getattr(self, name)
            if not (v is None and name == "attn_scale") and not (_is_number(v) and 0 < v < math.inf):
                _fail(name, v, "a finite number > 0" + (" or None" if name == "attn_scale" else ""))
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                _fail("moe", self.moe, "a MoEConfig or None")
            if self.moe.d_model != self.d_model:
                _fail("moe.d_model", self.moe.d_model, f"equal to d_model ({self.d_model})")
