"""What a model costs: FLOPs per token, weight and KV-cache memory, accelerators, decode bounds.

All analytic, from a `ModelSpec` (see `moelab.accounting.spec`); no torch. Units: bytes and
bytes/second; FLOPs count a multiply-add as 2.

- FLOPs per token (forward) = 2·N + Σ_layers 2·H·(d_qk + d_v)·L, with N the active parameters that
  multiply activations (all active parameters except the input embedding, a lookup) and L the
  number of tokens the token attends to in that layer (min(context, window)) — the 2N + attention
  count of Kaplan et al. 2020 (Table 1) and PaLM (Chowdhery et al. 2022, App. B: 6N + 12·L·H·Q·T
  for training = 3 × forward). Training ≈ 3 × forward (backward ≈ 2 × forward).
- Weight memory = parameters × bytes per parameter; int4 adds one scale of `int4_scale_bytes` per
  group of `int4_group_size` weights (GPTQ/AWQ-style group quantization: 0.5 + 2/128 bytes at the
  defaults). Every parameter is stored at the chosen precision (real quantized checkpoints often
  keep embeddings, norms and routers at 16 bits, so this slightly undercounts them).
- KV cache: per token and layer, K and V of every KV head (2·H_kv·d_head elements), or for MLA the
  compressed latent and the shared RoPE key (d_c + d_R, DeepSeek-V2 §2.1.2); sliding-window and
  chunked layers hold at most their window.
- Decoding is memory-bound at small batch: one step reads every weight it uses once, plus the KV
  cache of every sequence. Under uniform routing a batch of B tokens touches, in a layer with E
  experts and top-k routing, E·(1 − (1 − k/E)^B) distinct experts in expectation (each expert is
  missed by one token with probability 1 − k/E). So weight bytes per step grow with B until every
  expert is touched, and tokens/s ≤ B · bandwidth / (weight bytes + KV bytes read per step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moelab.accounting.counts import count_spec
from moelab.accounting.spec import ExpertBank, ModelSpec

PRECISIONS: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int4": 0.5}


def bytes_per_param(precision: str, int4_group_size: int = 128, int4_scale_bytes: float = 2.0) -> float:
    """Bytes per stored weight: fp32 4, bf16/fp16 2, fp8 1, int4 0.5 + int4_scale_bytes / int4_group_size."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid: allowed one of {', '.join(PRECISIONS)}")
    if precision == "int4":
        if not isinstance(int4_group_size, int) or int4_group_size < 1:
            raise ValueError(f"int4_group_size={int4_group_size!r} is invalid: allowed an integer >= 1")
        return PRECISIONS["int4"] + int4_scale_bytes / int4_group_size
    return PRECISIONS[precision]


def weight_bytes(n_params: int, precision: str, int4_group_size: int = 128, int4_scale_bytes: float = 2.0) -> float:
    """Bytes to hold `n_params` weights at `precision` (int4 with its per-group scales)."""
    return n_params * bytes_per_param(precision, int4_group_size, int4_scale_bytes)


def serving_params(spec: ModelSpec, include_mtp: bool = False) -> int:
    """Parameters loaded to serve the model: main model + vision encoder (+ MTP modules if asked)."""
    c = count_spec(spec)
    return c.total + c.vision + (c.mtp if include_mtp else 0)


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs of one token: `matmul` = 2·N_active (no input embedding), `attention` = scores and
    weighted values over the attended tokens; `training` ≈ 3 × forward."""

    matmul: int
    attention: int

    @property
    def forward(self) -> int:
        return self.matmul + self.attention

    @property
    def training(self) -> int:
        return 3 * self.forward


def _check_nonneg_int(name: str, value: int, minimum: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: allowed an integer >= {minimum}")


def attended(context: int, window: int | None) -> int:
    """Tokens one query attends to at position `context`: min(context, window)."""
    return context if window is None else min(context, window)


def flops_per_token(spec: ModelSpec, context: int) -> Flops:
    """Forward FLOPs for one token that attends to `context` tokens (decode at that context length).

    matmul = 2 · active_no_input_embedding; attention = Σ_layers 2 · H · (d_qk + d_v) · min(context,
    window) (QKᵀ and AV; MLA counted with its per-head widths, without weight absorption). For the
    average token of a training sequence of length S, pass context = S // 2 (causal mask).
    """
    _check_nonneg_int("context", context)
    c = count_spec(spec)
    attention = sum(2 * layer.attention.n_heads * (layer.attention.qk_head_dim + layer.attention.v_head_dim)
                    * attended(context, layer.attention.window) for layer in spec.layers)
    return Flops(matmul=2 * c.active_no_input_embedding, attention=attention)


def kv_cache_bytes_per_token(spec: ModelSpec, kv_bytes: float = 2.0) -> float:
    """Bytes one more token of context adds to the cache, all layers (Σ kv_cache_width · kv_bytes).

    Counts every layer; a sliding-window layer stops growing once the context exceeds its window —
    `kv_cache_bytes` accounts for that.
    """
    return sum(layer.attention.kv_cache_width for layer in spec.layers) * kv_bytes


def kv_cache_bytes(spec: ModelSpec, context: int, batch: int = 1, kv_bytes: float = 2.0) -> float:
    """Bytes of KV cache for `batch` sequences of `context` tokens: batch · Σ_layers min(context,
    window) · kv_cache_width · kv_bytes."""
    _check_nonneg_int("context", context)
    _check_nonneg_int("batch", batch, 1)
    per_seq = sum(attended(context, layer.attention.window) * layer.attention.kv_cache_width for layer in spec.layers)
    return batch * per_seq * kv_bytes


@dataclass(frozen=True)
class MemoryPlan:
    """Weights + KV cache against accelerators of `accelerator_bytes` each (`usable_fraction` of it)."""

    weight_bytes: float
    kv_bytes: float
    accelerator_bytes: float
    usable_fraction: float
    accelerators: int


def accelerators_needed(spec: ModelSpec, precision: str, accelerator_bytes: float, batch: int = 1,
                        context: int = 4096, kv_bytes: float = 2.0, usable_fraction: float = 1.0,
                        include_mtp: bool = False, int4_group_size: int = 128) -> MemoryPlan:
    """ceil((weights + KV cache) / (accelerator_bytes · usable_fraction)) accelerators.

    weights: `serving_params(spec)` at `precision`; KV: `kv_cache_bytes(spec, context, batch)`.
    Activations, framework overhead and replication across devices are not counted (lower
    `usable_fraction` to leave room for them).
    """
    if not accelerator_bytes > 0:
        raise ValueError(f"accelerator_bytes={accelerator_bytes!r} is invalid: allowed a number > 0")
    if not 0 < usable_fraction <= 1:
        raise ValueError(f"usable_fraction={usable_fraction!r} is invalid: allowed a number in (0, 1]")
    w = weight_bytes(serving_params(spec, include_mtp), precision, int4_group_size)
    kv = kv_cache_bytes(spec, context, batch, kv_bytes)
    n = max(1, math.ceil((w + kv) / (accelerator_bytes * usable_fraction)))
    return MemoryPlan(weight_bytes=w, kv_bytes=kv, accelerator_bytes=accelerator_bytes,
                      usable_fraction=usable_fraction, accelerators=n)


def experts_touched(n_experts: int, top_k: float, batch: int) -> float:
    """Expected distinct experts a batch of `batch` tokens routes to in one layer, uniform routing:
    E · (1 − (1 − k/E)^B). 1 token touches k; as B → ∞ all E are touched."""
    _check_nonneg_int("n_experts", n_experts, 1)
    _check_nonneg_int("batch", batch, 0)
    if not 0 < top_k <= n_experts:
        raise ValueError(f"top_k={top_k!r} is invalid: allowed 0 < top_k <= n_experts ({n_experts})")
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** batch)


@dataclass(frozen=True)
class DecodeStep:
    """One decode step of `batch` sequences at `context` tokens of context.

    experts_touched: expected distinct routed experts per MoE layer (mean over MoE layers; 0 if dense).
    weight_bytes: weights read (always-on weights once, input-embedding rows, touched experts).
    kv_bytes: KV cache read (every sequence's whole cache).
    tokens_per_s: upper bound batch · bandwidth / (weight_bytes + kv_bytes).
    """

    batch: int
    context: int
    experts_touched: float
    weight_bytes: float
    kv_bytes: float
    tokens_per_s: float


def _banks(spec: ModelSpec) -> list[ExpertBank]:
    banks = []
    for layer in spec.layers:
        if layer.ffn.experts is not None:
            banks.append(layer.ffn.experts)
        if layer.attention.experts is not None:
            banks.append(layer.attention.experts)
    return banks


def decode_step(spec: ModelSpec, batch: int, context: int, precision: str, bandwidth: float,
                kv_bytes: float = 2.0, int4_group_size: int = 128) -> DecodeStep:
    """Memory-bandwidth bound of one decode step (see the module docstring).

    Weight bytes = (always-on parameters + min(B, V) input-embedding rows + Σ_banks
    experts_touched(E, k, B) · params per expert) · bytes per parameter. `bandwidth` in bytes/s.
    Compute, communication and kernel efficiency are ignored: this is an upper bound on tokens/s.
    """
    _check_nonneg_int("batch", batch, 1)
    if not bandwidth > 0:
        raise ValueError(f"bandwidth={bandwidth!r} is invalid: allowed a number > 0 (bytes/s)")
    c = count_spec(spec)
    banks = _banks(spec)
    routed_total = sum(b.total for b in banks)
    always = c.total - routed_total
    if not spec.tied:  # a lookup reads one row per token, not the matrix
        always += min(batch, spec.vocab_size) * spec.d_model - spec.input_embedding
    touched = [experts_touched(b.n, b.top_k, batch) for b in banks]
    routed_read = sum(t * b.params_each for t, b in zip(touched, banks))
    moe_touched = [experts_touched(layer.ffn.experts.n, layer.ffn.experts.top_k, batch)
                   for layer in spec.layers if layer.ffn.experts is not None]
    w = (always + routed_read) * bytes_per_param(precision, int4_group_size)
    kv = kv_cache_bytes(spec, context, batch, kv_bytes)
    return DecodeStep(batch=batch, context=context,
                      experts_touched=sum(moe_touched) / len(moe_touched) if moe_touched else 0.0,
                      weight_bytes=w, kv_bytes=kv, tokens_per_s=batch * bandwidth / (w + kv))


def decode_curve(spec: ModelSpec, batches: list[int], context: int, precision: str, bandwidth: float,
                 kv_bytes: float = 2.0) -> list[DecodeStep]:
    """`decode_step` for each batch size in `batches`."""
    return [decode_step(spec, b, context, precision, bandwidth, kv_bytes) for b in batches]
