"""Configuration dataclasses for moelab, validated in one place.

`MoEConfig` describes one Mixture-of-Experts layer, `ModelConfig` a decoder-only language model built
from such layers. Both are frozen dataclasses; `validate()` runs on construction and raises
`ValueError` naming the field, the value and what is allowed. Both round-trip through plain JSON
(`to_dict` / `from_dict`), which is how checkpoints store them.

This module imports no torch: `moelab.accounting` reads configs on machines without it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROUTERS = ("topk_softmax", "switch", "sigmoid", "expert_choice")
ACTIVATIONS = ("swiglu", "gelu")
BACKENDS = ("auto", "loop", "padded", "grouped_mm")
ATTENTIONS = ("gqa", "mla")
QK_NORMS = ("none", "head", "full")
ROPE_SCALINGS = ("yarn",)
DTYPES = ("float32", "bfloat16")


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{field_name}={value!r} is invalid: allowed {allowed}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(name, value, "an integer >= 1")


def _nonneg_number(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
        _fail(name, value, "a finite number >= 0")


def check_device_name(device: Any) -> None:
    """A device moelab trains and generates on: "cpu", "cuda" or "cuda:N" (presence is checked at run time)."""
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        _fail("device", device, "'cpu', 'cuda' or 'cuda:N'")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(name, value, "one of " + ", ".join(repr(a) for a in allowed))


class _JsonMixin:
    """`to_dict` / `from_dict` / JSON file helpers shared by the config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; allowed fields: {sorted(names)}")
        return cls(**data)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path):
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data)


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
            2022; each expert picks its tokens — not causal, unsuitable for autoregressive decoding).
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
            `moelab.balance.update_expert_bias` after the optimizer step (auxiliary-loss-free
            balancing, Wang et al. 2024 / DeepSeek-V3). Only for the "sigmoid" router (bias added to
            the scores) and the "topk_softmax" router (bias added to the logits, so in logit units).
        bias_update_rate: γ of the bias update `b_i += γ · sign(mean_load − load_i)`.
        aux_loss_coef: weight of the Switch load-balance loss E · Σ f_i · P_i (0 turns it off).
        seq_aux_loss_coef: weight of DeepSeek-V3's sequence-wise balance loss (0 turns it off).
        z_loss_coef: weight of the router z-loss (ST-MoE, Zoph et al. 2022) (0 turns it off).
        freeze_router: the router weight gets no gradient (requires_grad=False).
        activation: "swiglu" (default) or "gelu" (two-matrix experts).
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
    freeze_router: bool = False
    activation: str = field(default="swiglu", metadata={"choices": ACTIVATIONS})
    backend: str = field(default="auto", metadata={"choices": BACKENDS})

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
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("backend", self.backend, BACKENDS)
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
        for name in ("route_scale", "bias_update_rate", "aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef"):
            _nonneg_number(name, getattr(self, name))
        if not self.route_scale > 0:
            _fail("route_scale", self.route_scale, "a number > 0")
        if self.shared_gate and self.n_shared == 0:
            _fail("shared_gate", True, "False when n_shared == 0")


@dataclass(frozen=True)
class RopeScaling(_JsonMixin):
    """RoPE context extension by YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large
    Language Models"), with the field names and semantics of transformers' `rope_parameters` (rope_type "yarn").

    Frequencies ("NTK-by-parts"): for rotary pair i of a width-`dim` head, inv_freq_i = θ^(−2i/dim) is kept
    where a wavelength fits ≥ beta_fast times into `original_max_seq_len`, divided by `factor` where it fits
    ≤ beta_slow times, and blended linearly in between over the pair indices
        d(b) = dim · ln(original_max_seq_len / (2π·b)) / (2 ln θ)     low = d(beta_fast), high = d(beta_slow)
    (floored / ceiled when `truncate`). cos and sin are multiplied by the attention factor
        attention_factor, or mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set
        (non-zero), else mscale(factor),       where mscale(s, m) = 0.1·m·ln s + 1 for s > 1, else 1.
    MLA attention (DeepSeek-V2/V3) also multiplies its softmax scale by mscale(factor, mscale_all_dim)² when
    mscale_all_dim is set; grouped-query attention does not (as in transformers' Mixtral/Qwen/OLMoE).

    Fields:
        factor: context extension ratio s (>= 1).
        original_max_seq_len: context length the model was pre-trained with (transformers'
            original_max_position_embeddings).
        type: "yarn" (the only scaling implemented).
        beta_fast / beta_slow: rotation counts bounding the blend (32 / 1 in the paper).
        mscale / mscale_all_dim: DeepSeek's temperature multipliers (None = unset).
        attention_factor: explicit cos/sin multiplier (None = derived as above).
        truncate: round the blend bounds to whole pairs (transformers' default True).
    """

    factor: float
    original_max_seq_len: int
    type: str = "yarn"
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RopeScaling:
        missing = [n for n in ("factor", "original_max_seq_len") if n not in data]
        if missing:
            raise ValueError(f"rope_scaling: field(s) {missing} missing: factor and original_max_seq_len are required")
        return super().from_dict(data)

    def validate(self) -> None:
        _choice("rope_scaling.type", self.type, ROPE_SCALINGS)
        if not isinstance(self.factor, (int, float)) or isinstance(self.factor, bool) or not self.factor >= 1:
            _fail("rope_scaling.factor", self.factor, "a number >= 1")
        _positive_int("rope_scaling.original_max_seq_len", self.original_max_seq_len)
        for name in ("beta_fast", "beta_slow"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                _fail(f"rope_scaling.{name}", v, "a number > 0")
        if not self.beta_fast >= self.beta_slow:
            _fail("rope_scaling.beta_fast", self.beta_fast, f"a number >= beta_slow ({self.beta_slow})")
        for name in ("mscale", "mscale_all_dim"):
            if getattr(self, name) is not None:
                _nonneg_number(f"rope_scaling.{name}", getattr(self, name))
        af = self.attention_factor
        if af is not None and (not isinstance(af, (int, float)) or isinstance(af, bool) or not af > 0):
            _fail("rope_scaling.attention_factor", af, "None or a number > 0")
        if not isinstance(self.truncate, bool):
            _fail("rope_scaling.truncate", self.truncate, "true or false")


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

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # from JSON
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if d["rope_scaling"] is None:  # plain RoPE: the same dict as before the field existed (resume compares)
            del d["rope_scaling"]
        return d

    @property
    def head_width(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

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
        if not self.rope_theta > 0:
            _fail("rope_theta", self.rope_theta, "a number > 0")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            _fail("rope_scaling", self.rope_scaling, "None or a RopeScaling (a dict of its fields in JSON)")
        if not 0 <= self.dropout < 1:
            _fail("dropout", self.dropout, "a number in [0, 1)")
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                _fail("moe", self.moe, "a MoEConfig or None")
            if self.moe.d_model != self.d_model:
                _fail("moe.d_model", self.moe.d_model, f"equal to d_model ({self.d_model})")



@dataclass(frozen=True)
class TrainConfig(_JsonMixin):
    """How to train: optimisation, schedule, data and bookkeeping.

    Fields:
        steps: optimizer steps of the whole run (raise it on --resume to train longer).
        batch_size / seq_len: sequences per micro-batch and tokens per sequence.
        grad_accum: micro-batches per optimizer step (tokens per step = grad_accum·batch_size·seq_len).
        lr / min_lr_ratio / warmup_steps: linear warm-up to lr, then cosine decay to lr·min_lr_ratio.
        weight_decay / beta1 / beta2: AdamW (Loshchilov & Hutter 2019); no decay on norms and biases.
        grad_clip: max global gradient norm (0 = off).
        eval_every / eval_batches: validation every n steps (and at the end) over this many batches.
        log_every: one metrics line per this many steps.
        save_every: checkpoint every n steps (0 = only at the end).
        keep_checkpoints: newest checkpoints kept in the run directory; older ones are deleted after
            each save (the newest one is never deleted, and a checkpoint is only written when every
            weight is finite).
        tensorboard: also write the metrics as TensorBoard scalars to RUN/tensorboard (needs the
            optional tensorboard package: pip install 'moelab[tensorboard]').
        seed: seeds the model init and the data sampler.
        max_corpus_bytes: cap on the default corpus (the Python standard library) size.
        val_fraction: share of the token stream held out for validation.
        dtype: "float32" or "bfloat16" (autocast for the forward; weights and optimizer stay float32).
        threads: torch intra-op threads (0 = torch's default).
        device: where the model, its optimizer state and the batches live: "cpu", "cuda" or "cuda:N"
            (checkpoints are device-free; a run may resume on another device).
        expert_parallel: processes the routed experts are split over (launch that many with torchrun);
            batch_size stays the global batch, split evenly over them (moelab.parallel).
    """

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    tensorboard: bool = False
    seed: int = 0
    max_corpus_bytes: int = 6_000_000
    val_fraction: float = 0.05
    dtype: str = field(default="float32", metadata={"choices": DTYPES})
    threads: int = 0
    device: str = "cpu"
    expert_parallel: int = 1

    # Fields a resumed run may change: how long it runs, its learning-rate schedule and clipping (the way
    # to recover from a loss spike), bookkeeping, and where/how it executes. Everything else (the batch,
    # the data, AdamW's betas and decay, which live in the optimizer state) is fixed by the checkpoint.
    RESUMABLE = ("steps", "lr", "min_lr_ratio", "warmup_steps", "grad_clip", "eval_every", "eval_batches",
                 "log_every", "save_every", "keep_checkpoints", "tensorboard", "dtype", "threads", "device",
                 "expert_parallel")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "log_every",
                     "keep_checkpoints", "max_corpus_bytes", "expert_parallel"):
            _positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "save_every", "seed", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(name, value, "an integer >= 0")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not 0 < self.lr < math.inf:
            _fail("lr", self.lr, "a finite number > 0")
        for name in ("min_lr_ratio", "beta1", "beta2", "val_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                _fail(name, value, "a number")
        for name in ("min_lr_ratio", "beta1", "beta2"):
            if not 0 <= getattr(self, name) <= 1:
                _fail(name, getattr(self, name), "a number in [0, 1]")
        _nonneg_number("weight_decay", self.weight_decay)
        _nonneg_number("grad_clip", self.grad_clip)
        if not 0 < self.val_fraction < 0.5:
            _fail("val_fraction", self.val_fraction, "a number in (0, 0.5)")
        _choice("dtype", self.dtype, DTYPES)
        check_device_name(self.device)
        if self.device != "cpu" and self.expert_parallel > 1:
            _fail("device", self.device, "'cpu' when expert_parallel > 1 (expert parallelism runs on gloo over "
                  "CPU processes; NCCL is not supported yet)")
        if self.batch_size % self.expert_parallel:
            _fail("batch_size", self.batch_size, f"a multiple of expert_parallel={self.expert_parallel} (it is the "
                  "global batch, split evenly over the processes)")

    def resume_changes(self, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """{field: (this run's value, new value)} for a resumed run; ValueError naming every field that
        differs but may not change on resume (`RESUMABLE` lists those that may)."""
        changed = {f.name: (getattr(self, f.name), getattr(new, f.name)) for f in dataclasses.fields(self)
                   if getattr(self, f.name) != getattr(new, f.name)}
        fixed = {k: v for k, v in changed.items() if k not in self.RESUMABLE}
        if fixed:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in fixed.items())
            raise ValueError(f"cannot change {listed} on resume (fixed by the checkpoint; a resumed run may change "
                             f"only {', '.join(self.RESUMABLE)}); start a new run with --out to change it")
        return changed


# Training presets are data: {"model": ModelConfig fields, "moe": MoEConfig fields, "train": TrainConfig fields}.
# The dense-FFN width d_ff equals the MoE active width (top_k·d_expert) so dense_twin() is well defined.
# route_scale = top_k for renormalised top-k routing: the k weights sum to k, so the MoE output starts at
# the scale of its dense twin (k experts of width f = one FFN of width k·f) instead of 1/k of it (the
# same role as DeepSeek-V3's routed_scaling_factor); measured in development to train faster.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "model": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=256, d_ff=256),
        "moe": dict(d_expert=128, n_experts=16, top_k=2, route_scale=2.0, aux_loss_coef=0.01, z_loss_coef=1e-3),
        "train": dict(steps=400, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=40, eval_every=100),
    },
    "small": {
        "model": dict(vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, max_seq_len=512, d_ff=512),
        "moe": dict(d_expert=256, n_experts=16, top_k=2, route_scale=2.0, aux_loss_coef=0.01, z_loss_coef=1e-3),
        "train": dict(steps=1000, batch_size=16, seq_len=256, lr=2e-3, warmup_steps=100, eval_every=200,
                      max_corpus_bytes=20_000_000),
    },
    "tiny-deepseek": {
        "model": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=256, d_ff=256,
                      n_dense_layers=1),
        "moe": dict(d_expert=64, n_experts=16, top_k=3, n_shared=1, router="sigmoid", n_groups=4, topk_groups=2,
                    expert_bias=True, aux_loss_coef=0.0, seq_aux_loss_coef=1e-4, z_loss_coef=0.0, route_scale=1.0),
        "train": dict(steps=400, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=40, eval_every=100),
    },
}


def preset(name: str, **overrides: Any) -> tuple[ModelConfig, TrainConfig]:
    """Configs of a named training preset; `overrides` keys are "field" (model/train) or "moe.field"."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not a training preset: allowed {', '.join(sorted(PRESETS))}")
    p = PRESETS[name]
    moe = MoEConfig(**{"d_model": p["model"].get("d_model", ModelConfig.d_model), **p["moe"]})
    return with_overrides(ModelConfig(**p["model"], moe=moe), TrainConfig(**p["train"]), overrides)


def with_overrides(model: ModelConfig, train: TrainConfig, overrides: dict[str, Any]) -> tuple[ModelConfig,
                                                                                                 TrainConfig]:
    """`model` and `train` with `overrides` applied: keys "field" (a ModelConfig or TrainConfig field) or
    "moe.field" (a MoEConfig field; the MoE layer's d_model follows the model's)."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_kw, moe_kw, train_kw = {}, {}, {}
    for key, value in overrides.items():
        if key.startswith("moe.") and key[4:] in moe_fields:
            moe_kw[key[4:]] = value
        elif key in model_fields:
            model_kw[key] = value
        elif key in train_fields:
            train_kw[key] = value
        else:
            raise ValueError(f"unknown setting {key!r}: allowed model fields {sorted(model_fields)}, "
                             f"'moe.<field>' for {sorted(moe_fields)}, train fields {sorted(train_fields)}")
    moe = model_kw.pop("moe", model.moe)
    if moe_kw and moe is None:
        raise ValueError(f"moe.{next(iter(moe_kw))} is set but the model is dense (moe=None)")
    if moe is not None:
        moe = moe.replace(**moe_kw, d_model=model_kw.get("d_model", model.d_model))
    return model.replace(**model_kw, moe=moe), train.replace(**train_kw)


def field_help(cls: type) -> dict[str, str]:
    """{field: description} from the "Fields:" section of a config class's docstring (one entry per name;
    a line "a / b: text" describes both a and b), so that the command line's help is the documentation."""
    doc = (cls.__doc__ or "").split("Fields:", 1)
    if len(doc) < 2:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    for line in doc[1].splitlines():
        head = re.match(r"^ {8}([a-z_][a-z0-9_ /]*):\s(.*)$", line)
        if head:
            names = [n.strip() for n in head.group(1).split("/")]
            for n in names:
                out[n] = head.group(2).strip()
        elif line.startswith(" " * 12) and names:
            for n in names:
                out[n] += " " + line.strip()
    return out
