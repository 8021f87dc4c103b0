"""The decoder-only MoE language model: RMSNorm, attention (GQA or MLA) with RoPE, dense or MoE FFNs.

Pre-norm blocks  x = x + attn(norm(x));  x = x + ffn(norm(x)),  where ffn is a dense FFN for the first
`n_dense_layers` (and the non-MoE layers when `moe_every` > 1) and an `MoE` layer elsewhere
(DeepSeek-V3's `first_k_dense_replace`). Attention is causal `scaled_dot_product_attention` with
rotary position embeddings (Su et al. 2021, rotate-half convention; optionally extended by YaRN, Peng et
al. 2023) and grouped-query heads (Ainslie et al. 2023), optional q/k RMSNorm (OLMoE "full", Qwen3 "head"),
or DeepSeek-V2/V3 multi-head latent attention (MLA). Generation uses a per-layer KV cache (`KVCache`).
Granite's multipliers (`ModelConfig.embed_scale`, `residual_scale`, `logits_scaling`, `attn_scale`) scale
the embeddings, each block's two residual branches, the logits and the attention scores.

A batch of prompts of different lengths is left-padded (`KVCache.pad`): row b's first pad[b] positions are
padding. Its tokens then take positions p − pad[b] (each prompt's rotary positions are those it has alone)
and attend only to keys at positions ≥ pad[b], so padding changes no real token's output; a pad query
attends to itself alone (finite, and read by no one).

Legend: B = batch, S = sequence (new tokens), L = cached + new positions, H = heads, G = kv heads,
Dh = head width, D = model width, V = vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab import native
from moelab.config import ModelConfig, RopeScaling
from moelab.decode_plan import decode_plan
from moelab.experts import INIT_STD, FeedForward
from moelab.masked_attention import attend
from moelab.moe import MoE, MoEAux, autocast_dtype


def residual_std(cfg: ModelConfig) -> float:
    """The initial std of projections into the residual stream: INIT_STD / sqrt(2·n_layers) (GPT-2,
    Radford et al. 2019); every other weight is drawn from N(0, INIT_STD), biases zero, norms one."""
    return INIT_STD / math.sqrt(2 * cfg.n_layers)


def _init_linear(linear: nn.Linear, std: float = INIT_STD) -> nn.Linear:
    nn.init.normal_(linear.weight, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · w, computed in float32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight · x / sqrt(mean(x²) + eps) over the last dimension, the normalisation in float32 (a decode step's
    rows in one call of moelab's kernel, `native.rms_norm`)."""
    if native.rms_norm_supported(x, weight):
        return native.rms_norm(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term 0.1·mscale·ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(s: RopeScaling) -> float:
    """The multiplier of cos/sin: explicit, DeepSeek's mscale ratio when both are set, else mscale(factor)."""
    if s.attention_factor is not None:
        return float(s.attention_factor)
    if s.mscale and s.mscale_all_dim:
        return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return yarn_mscale(s.factor)


def rope_inv_freq(dim: int, theta: float, scaling: RopeScaling | None = None) -> Tensor:
    """Inverse frequencies [dim/2] (float64): θ^(−2i/dim), or YaRN's blend of them with θ^(−2i/dim) / factor.

    YaRN ("NTK-by-parts", Peng et al. 2023): pair i keeps its frequency below the correction dimension of
    beta_fast rotations, is interpolated (÷ factor) above that of beta_slow, linearly blended in between;
    d(b) = dim · ln(L / (2π·b)) / (2 ln θ) with L = original_max_seq_len (see `RopeScaling`).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if scaling is None:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        return dim * math.log(scaling.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a step instead of a ramp (as transformers does)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)  # 0 keep … 1 ÷ factor
    return inv_freq / scaling.factor * ramp + inv_freq * (1 - ramp)


def rope_tables(dim: int, max_len: int, theta: float,
                scaling: RopeScaling | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin [max_len, dim] for the rotate-half convention: angle_(p, i) = p · inv_freq_i (`rope_inv_freq`);
    with YaRN both are multiplied by `yarn_attention_factor`."""
    inv_freq = rope_inv_freq(dim, theta, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # [max_len, dim/2]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if scaling is not None:
        factor = yarn_attention_factor(scaling)
        cos, sin = cos * factor, sin * factor
    return cos.float(), sin.float()


def model_rope_tables(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """cos, sin [max_seq_len, rotary width] of a model: the MLA rotary part, or the GQA head's rotary_dim
    channels (the whole head by default)."""
    dim = cfg.qk_rope_head_dim if cfg.attention == "mla" else (cfg.rotary_dim or cfg.head_width)
    return rope_tables(dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)


def apply_rope(x_BHSD: Tensor, cos_SD: Tensor, sin_SD: Tensor) -> Tensor:
    """Rotate-half RoPE; with tables narrower than the head (partial rotary, `ModelConfig.rotary_dim`) the
    first channels rotate and the rest pass through unchanged."""
    if native.rope_supported(x_BHSD, cos_SD, sin_SD):  # one position (a decode step): one call
        return native.rope(x_BHSD, cos_SD, sin_SD)
    r = cos_SD.shape[-1]
    if r < x_BHSD.shape[-1]:
        return torch.cat([apply_rope(x_BHSD[..., :r], cos_SD, sin_SD), x_BHSD[..., r:]], dim=-1)
    x1, x2 = x_BHSD.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_BHSD.float() * cos_SD + rotated.float() * sin_SD).to(x_BHSD.dtype)


@dataclass
class KVCache:
    """Keys and values of past positions for every layer, in buffers written in place: k[i] [B, G, capacity, Dk],
    v[i] [B, G, capacity, Dv], of which the first `length` positions hold data (a step appends without copying
    the past; a full buffer doubles). `pad` [B] (int64, or None for none): the number of left-padding positions
    of each row (module docstring)."""

    k: list[Tensor | None] = field(default_factory=list)
    v: list[Tensor | None] = field(default_factory=list)
    pad: Tensor | None = None
    lengths: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.lengths[0] if self.lengths else 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k [B, G, S, Dk] and v [B, G, S, Dv] to layer `layer`; its keys and values so far (views)."""
        L, S = self.reserve(layer, k.shape, v.shape, k), k.shape[2]
        self.k[layer][:, :, L:L + S] = k
        self.v[layer][:, :, L:L + S] = v
        self.lengths[layer] = L + S
        return self.k[layer][:, :, :L + S], self.v[layer][:, :, :L + S]

    def reserve(self, layer: int, k_shape: tuple[int, ...], v_shape: tuple[int, ...], like: Tensor) -> int:
        """Make room in layer `layer`'s buffers for S more positions of keys [B, G, S, Dk] and values [B, G, S, Dv]
        (new buffers: like's dtype and device); the current length L, where they go."""
        while len(self.k) <= layer:
            self.k.append(None)
            self.v.append(None)
            self.lengths.append(0)
        L, S = self.lengths[layer], k_shape[2]
        if self.k[layer] is None or self.k[layer].shape[2] < L + S:
            capacity = max(2 * L, L + S, 64)
            for bufs, shape in ((self.k, k_shape), (self.v, v_shape)):
                grown = like.new_empty(*shape[:2], capacity, shape[3])
                if bufs[layer] is not None:
                    grown[:, :, :L] = bufs[layer][:, :, :L]
                bufs[layer] = grown
        return L


class Attention(nn.Module):
    """Grouped-query attention with RoPE, optional q/k RMSNorm and, for gpt-oss, an output bias, attention
    sinks and a sliding window (`moelab.masked_attention`)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_width
        self.rot = cfg.rotary_dim or self.hd  # channels RoPE rotates
        D = cfg.d_model
        self.wq = _init_linear(nn.Linear(D, self.n_heads * self.hd, bias=cfg.qkv_bias))
        self.wk = _init_linear(nn.Linear(D, self.n_kv * self.hd, bias=cfg.qkv_bias))
        self.wv = _init_linear(nn.Linear(D, self.n_kv * self.hd, bias=cfg.qkv_bias))
        self.wo = _init_linear(nn.Linear(self.n_heads * self.hd, D, bias=cfg.o_bias), residual_std(cfg))
        self.wqkv: nn.Module | None = None  # q|k|v fused into one projection for inference (moelab.inference)
        self.qk_norm, self.scale = cfg.qk_norm, cfg.attn_scale  # scale None: 1/sqrt(Dh)
        self.window = cfg.layer_window(layer)  # gpt-oss: sliding window on alternate layers
        self.sinks = nn.Parameter(torch.zeros(self.n_heads)) if cfg.attn_sinks else None  # gpt-oss
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.norm_eps), RMSNorm(self.hd, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(self.n_heads * self.hd, cfg.norm_eps)
            self.k_norm = RMSNorm(self.n_kv * self.hd, cfg.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, start: int) -> Tensor:
        B, S, _ = x.shape
        if self.wqkv is not None and self.qk_norm != "full":
            q, k, v = self._qkv_fused(x, cos, sin)
        else:
            q, k, v = self._qkv(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = attend(q, k, v, start, self.scale, self.window, self.sinks, cache.pad if cache is not None else None)
        return self.wo(out.transpose(1, 2).reshape(B, S, self.wo.in_features))

    def native_args(self, norm: RMSNorm) -> native.BlockArgs | None:
        """norm then this attention as one kernel call takes them (`native.attention_args`; kept until a tensor
        they point into is replaced), or None where that call does not apply: weights not on moelab's kernels,
        sinks, a sliding window, full q/k norm."""
        wqkv, wo = getattr(self.wqkv, "w", None), getattr(self.wo, "w", None)
        if (self.sinks is not None or self.window is not None or self.qk_norm == "full"
                or getattr(wqkv, "native", None) is None or getattr(wo, "native", None) is None):
            return None
        norms = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm == "head" else ()
        tensors = (norm.weight, self.wqkv.bias, self.wo.bias, *norms)
        return native.cached(self, tuple(None if t is None else t.data_ptr() for t in tensors) + (wqkv, wo),
                             lambda: native.attention_args(
                                 norm.weight, norm.eps, wqkv.native, self.wqkv.bias,
                                 (*norms, self.q_norm.eps) if norms else None, self.rot, wo.native,
                                 self.wo.bias, self.n_heads, self.n_kv, self.hd, self.scale))

    def decode_step(self, x: Tensor, norm: RMSNorm, cos: Tensor, sin: Tensor, cache: KVCache) -> Tensor | None:
        """x + self(norm(x)) for one token (B = S = 1) in one call of moelab's kernel (`native.attention_block`:
        the same roundings), or None where that does not apply (then the caller runs the modules): no
        `native_args`, padding, autograd, or x of another dtype."""
        if torch.is_grad_enabled() or x.shape[:2] != (1, 1) or cache.pad is not None or cos.shape[0] != 1:
            return None
        args = self.native_args(norm)
        if args is None or args.dtype != x.dtype or not x.is_contiguous():
            return None
        heads = (1, self.n_kv, 1, self.hd)
        L = cache.reserve(self.layer, heads, heads, x)
        out = native.attention_block(args, x, cos, sin, cache.k[self.layer], cache.v[self.layer], L)
        cache.lengths[self.layer] = L + 1
        return out

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, S, Dh], k and v [B, G, S, Dh]: projected, q/k-normed and rotated."""
        B, S, _ = x.shape
        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:
            q, k, v = self.wqkv(x).split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.hd).transpose(1, 2)  # [B, H, S, Dh]
        k = k.view(B, S, self.n_kv, self.hd).transpose(1, 2)  # [B, G, S, Dh]
        v = v.view(B, S, self.n_kv, self.hd).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _qkv_fused(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`_qkv` from the fused projection (inference), q and k normed and rotated as one tensor of H + G heads
        (the same arithmetic, half the ops: they count at decode)."""
        B, S, _ = x.shape
        H, G = self.n_heads, self.n_kv
        qkv = self.wqkv(x).view(B, S, H + 2 * G, self.hd).transpose(1, 2)  # [B, H + 2G, S, Dh]
        qk, v = qkv[:, :H + G], qkv[:, H + G:]
        if self.qk_norm == "head":
            qk = rms_norm(qk, self._qk_norm_weight(), self.q_norm.eps)
        qk = apply_rope(qk, cos, sin)
        return qk[:, :H], qk[:, H:], v


    def _qk_norm_weight(self) -> Tensor:
        """[H + G, 1, Dh]: q_norm's weight for the query heads, k_norm's for the key heads (kept until they change)."""
        wq, wk = self.q_norm.weight, self.k_norm.weight
        key = (wq.data_ptr(), wq._version, wk.data_ptr(), wk._version)
        if torch.is_grad_enabled():
            return torch.cat([wq.expand(self.n_heads, self.hd), wk.expand(self.n_kv, self.hd)])[:, None]
        if getattr(self, "_qk_key", None) != key:
            w = torch.cat([wq.expand(self.n_heads, self.hd), wk.expand(self.n_kv, self.hd)])[:, None]
            self._qk_w, self._qk_key = w, key
        return self._qk_w


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, 2024): keys/values from a compressed latent.

    q = W_qb · norm(W_qa · x) (or W_q · x);  [c_kv | k_rope] = W_kva · x;
    [k_nope | v] = W_kvb · norm(c_kv) per head; k = [k_nope | rope(k_rope) shared by heads].
    The cache here holds the decompressed keys and values (simple and exact; the compressed-cache
    saving is reported by `moelab.accounting`).
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        H, D = cfg.n_heads, cfg.d_model
        self.H, self.nope, self.rope, self.vd = H, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        qk = self.nope + self.rope
        if cfg.q_lora_rank is None:
            self.wq = _init_linear(nn.Linear(D, H * qk, bias=False))
        else:
            self.wq_a = _init_linear(nn.Linear(D, cfg.q_lora_rank, bias=False))
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = _init_linear(nn.Linear(cfg.q_lora_rank, H * qk, bias=False))
        self.wkv_a = _init_linear(nn.Linear(D, self.kv_rank + self.rope, bias=False))
        self.kv_a_norm = RMSNorm(self.kv_rank, cfg.norm_eps)
        self.wkv_b = _init_linear(nn.Linear(self.kv_rank, H * (self.nope + self.vd), bias=False))
        self.wo = _init_linear(nn.Linear(H * self.vd, D, bias=False), residual_std(cfg))
        self.scale = qk ** -0.5
        s = cfg.rope_scaling
        if s is not None and s.mscale_all_dim:  # DeepSeek-V2/V3 YaRN: softmax scale × mscale(factor, all_dim)²
            self.scale *= yarn_mscale(s.factor, s.mscale_all_dim) ** 2

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, start: int) -> Tensor:
        B, S, _ = x.shape
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_a_norm(self.wq_a(x)))
        q = q.view(B, S, self.H, self.nope + self.rope).transpose(1, 2)  # [B, H, S, nope+rope]
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        c_kv, k_rope = self.wkv_a(x).split([self.kv_rank, self.rope], dim=-1)
        kv = self.wkv_b(self.kv_a_norm(c_kv)).view(B, S, self.H, self.nope + self.vd).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.vd], dim=-1)
        k_rope = apply_rope(k_rope.view(B, 1, S, self.rope), cos, sin).expand(B, self.H, S, self.rope)
        q = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = attend(q, k, v, start, scale=self.scale, pad=cache.pad if cache is not None else None)
        return self.wo(out.transpose(1, 2).reshape(B, S, self.wo.in_features))


class Block(nn.Module):
    """Pre-norm transformer block; `ffn` is an `MoE` layer or a dense `FeedForward`."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MLAttention(cfg, layer) if cfg.attention == "mla" else Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        std = residual_std(cfg)
        self.ffn = MoE(cfg.moe, std) if self.is_moe else FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, std)
        self.dropout = nn.Dropout(cfg.dropout)
        self.residual_scale = cfg.residual_scale  # Granite's residual_multiplier (1: none)

    def fusable(self) -> bool:
        """Whether the block is x + attn(norm(x)), then + ffn(norm(·)), as its halves' `decode_step`s compute it
        (no residual scale, no dropout)."""
        return self.residual_scale == 1.0 and not (self.training and self.dropout.p > 0)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, start: int,
                stats: bool | None = None):
        # a decode step runs each half in one kernel call where it can (`decode_step`: None where it cannot)
        fusable = self.fusable()
        fused = None
        if fusable and cache is not None and isinstance(self.attn, Attention):
            fused = self.attn.decode_step(x, self.attn_norm, cos, sin, cache)
        if fused is None:
            x = x + self._scaled(self._drop(self.attn(self.attn_norm(x), cos, sin, cache, start)))
        else:
            x = fused
        if fusable and self.is_moe:
            fused = self.ffn.decode_step(x, self.ffn_norm, stats)
            if fused is not None:
                return fused, MoEAux(n_tokens=1)
        h = self.ffn_norm(x)
        if self.is_moe:
            y, aux = self.ffn(h, stats)
        else:
            y, aux = self.ffn(h), None
        return x + self._scaled(self._drop(y)), aux

    def _drop(self, y: Tensor) -> Tensor:
        return self.dropout(y) if self.training and self.dropout.p > 0 else y  # identity otherwise: skip the call

    def _scaled(self, y: Tensor) -> Tensor:
        return y if self.residual_scale == 1.0 else y * self.residual_scale


@dataclass
class ModelOutput:
    """logits [B, S, V]; loss: mean next-token cross-entropy when targets were given (NaN for zero
    tokens); aux_loss: the sum of the MoE layers' weighted auxiliary losses (add it to `loss` to
    train; zero when the statistics were not computed, see `moelab.moe`); aux: one MoEAux per MoE layer."""

    logits: Tensor
    loss: Tensor | None = None
    aux_loss: Tensor | None = None
    aux: list[MoEAux] = field(default_factory=list)


class MoETransformer(nn.Module):
    """Decoder-only LM: input_ids [B, S] → ModelOutput(logits [B, S, V], loss, aux_loss, aux)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=INIT_STD)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else _init_linear(nn.Linear(cfg.d_model, cfg.vocab_size, bias=False))
        self.set_rope_tables()

    def set_rope_tables(self) -> None:
        """(Re)compute the rotary tables from the config, in float32 on the default device (buffers not saved
        with the weights): a model built on the meta device gets real ones here after `to_empty`."""
        cos, sin = model_rope_tables(self.cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, cache: KVCache | None = None,
                start: int | None = None, stats: bool | None = None) -> ModelOutput:
        """input_ids [B, S] (zero tokens give empty logits) → ModelOutput; `stats`: compute the MoE
        layers' statistics (None: when grad is enabled; True also under no_grad, for routing analytics)."""
        self._check_ids(input_ids)
        B, S = input_ids.shape
        start = (cache.length if cache is not None else 0) if start is None else start
        if start + S > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start + S} positions exceeds the model's max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start:start + S], self.rope_sin[start:start + S]
        if cache is not None and cache.pad is not None:  # left-padded rows: positions p − pad[b], [B, 1, S, Dr]
            if cache.pad.shape != (B,):
                raise ValueError(f"cache.pad has shape {tuple(cache.pad.shape)}: expected one entry per row ({B},)")
            pos = (start + torch.arange(S, device=input_ids.device))[None, :] - cache.pad[:, None]
            pos = pos.clamp_min(0)
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]
        x = self.embed(input_ids)
        if self.cfg.embed_scale != 1.0:  # Granite's embedding_multiplier
            x = x * self.cfg.embed_scale
        auxes: list[MoEAux] = []
        layers = self._native_layers(x, cos, cache, stats) if S == 1 and cache is not None and start == cache.length \
            else None
        if layers is not None:  # a decode step: every layer in one call of moelab's kernels (`_native_layers`)
            x = native.decode_layers(layers, x, cos, sin, start)
            cache.lengths[:] = [start + 1] * layers.n
            auxes = [MoEAux(n_tokens=1) for _ in range(layers.n)]
        for block in self.blocks if layers is None else ():
            x, aux = block(x, cos, sin, cache, start, stats)
            if aux is not None:
                auxes.append(aux)
        x = self.norm(x)
        logits = self.head(x) if self.head is not None else F.linear(x, self.embed.weight)
        if self.cfg.logits_scaling != 1.0:  # Granite's logits_scaling
            logits = logits / self.cfg.logits_scaling
        loss = None
        if targets is not None:
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least (bf16 logits)
            loss = F.cross_entropy(wide.view(-1, logits.shape[-1]), targets.reshape(-1))
        aux_loss = sum((a.total_loss for a in auxes if a.losses), logits.new_zeros((), dtype=torch.float32))
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, aux=auxes)

    def _native_layers(self, x: Tensor, cos: Tensor, cache: KVCache, stats: bool | None) -> native.LayerTable | None:
        """Every layer of this decode step as one call of moelab's kernels takes them (`moelab.decode_plan`; the
        blocks' `decode_step`s, layer after layer, bit for bit), with room for the token reserved in the cache; None
        where the plan does not apply, statistics are asked for, or x is not one token of one row outside autograd
        and autocast."""
        if (stats or torch.is_grad_enabled() or x.shape[:2] != (1, 1) or cache.pad is not None or cos.shape[0] != 1
                or autocast_dtype(x) is not None or not x.is_contiguous()):
            return None
        table = decode_plan(self, x.dtype).table
        if table is None:
            return None
        L = cache.length
        for i, (attn, _) in enumerate(table.blocks):
            heads = (1, attn.struct.G, 1, attn.struct.Dh)
            if cache.reserve(i, heads, heads, x) != L:
                return None
            table.set_cache(i, cache.k[i], cache.v[i])
        return table

    def _check_ids(self, input_ids: Tensor) -> None:
        """[batch, seq] integer ids in [0, vocab_size): one min/max read (a host sync on a GPU)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"input_ids must be integer token ids (torch.long or torch.int32); got {input_ids.dtype}")
        if input_ids.numel():
            lo, hi = torch.aminmax(input_ids)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"input_ids hold ids in [{lo}, {hi}]: allowed 0 <= id < vocab_size="
                                 f"{self.cfg.vocab_size}")

    @torch.no_grad()
    def update_expert_biases(self, loads: list[Tensor]) -> None:
        """Auxiliary-loss-free balancing for every MoE layer, after optimizer.step(): `loads[i]` is the
        per-expert load of MoE layer i observed in that step (summed over micro-batches)."""
        for moe, load in zip(self.moe_layers(), loads, strict=True):
            moe.update_expert_bias(load)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
