"""Rotary position embeddings (rotate-half, Su et al. 2021), partial rotary, and YaRN scaling (Peng et al. 2023).

Legend: B = batch, S = sequence, H = heads, Dh = head width."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moelab.config.model import ModelConfig
from moelab.config.rope import RopeScaling


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
    r = cos_SD.shape[-1]
    if r < x_BHSD.shape[-1]:
        return torch.cat([apply_rope(x_BHSD[..., :r], cos_SD, sin_SD), x_BHSD[..., r:]], dim=-1)
    x1, x2 = x_BHSD.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_BHSD.float() * cos_SD + rotated.float() * sin_SD).to(x_BHSD.dtype)
