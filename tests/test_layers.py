"""moelab.model.rope: rotary embeddings against their definition (a rotation by the position angle) and YaRN's
frequencies against a per-pair reference written from the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.config.rope import RopeScaling
from moelab.model.rope import apply_rope, rope_inv_freq, rope_tables


def test_rope_rotates_pairs_by_position_angle():
    cos, sin = rope_tables(4, 8, theta=100.0)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4).expand(1, 1, 8, 4)
    y = apply_rope(x, cos, sin)
    p = torch.arange(8, dtype=torch.float64)
    torch.testing.assert_close(y[0, 0, :, 0].double(), torch.cos(p), atol=1e-6, rtol=0)  # freq θ^0 = 1
    torch.testing.assert_close(y[0, 0, :, 2].double(), torch.sin(p), atol=1e-6, rtol=0)


def _yarn_reference(dim: int, theta: float, s: RopeScaling) -> list[float]:
    """inv_freq of each rotary pair, one at a time, as the YaRN reference code defines it: the blend weight
    rises linearly over pair indices from the correction dimension of beta_fast rotations to that of beta_slow."""
    def correction_dim(rotations):
        return dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    out = []
    for i in range(dim // 2):
        base = theta ** (-2 * i / dim)
        w = min(max((i - low) / (high - low if high != low else 0.001), 0.0), 1.0)  # 0: keep, 1: divide by factor
        out.append(base * (1 - w) + base / s.factor * w)
    return out


@pytest.mark.parametrize("s", [
    RopeScaling(factor=40.0, original_max_seq_len=4096, mscale=1.0, mscale_all_dim=1.0),  # DeepSeek-V3
    RopeScaling(factor=4.0, original_max_seq_len=64, beta_fast=16.0, beta_slow=2.0, truncate=False),
    RopeScaling(factor=2.0, original_max_seq_len=10**6),  # every pair extrapolated (kept)
    RopeScaling(factor=8.0, original_max_seq_len=256, beta_fast=64.0, beta_slow=0.5),
])
def test_yarn_frequencies_match_a_per_pair_reference(s):
    dim, theta = 32, 10000.0
    got = rope_inv_freq(dim, theta, s)
    torch.testing.assert_close(got, torch.tensor(_yarn_reference(dim, theta, s), dtype=torch.float64),
                               atol=0, rtol=1e-12)
    plain = rope_inv_freq(dim, theta)
    # the paper's invariants: pairs rotating >= beta_fast times over the original context keep their frequency,
    # pairs rotating <= beta_slow times are interpolated by the factor, and nothing leaves that range
    rotations = s.original_max_seq_len * plain / (2 * math.pi)
    keep, interp = rotations >= s.beta_fast * 2, rotations <= s.beta_slow / 2  # margins cover the rounding
    torch.testing.assert_close(got[keep], plain[keep], atol=0, rtol=1e-12)
    torch.testing.assert_close(got[interp], plain[interp] / s.factor, atol=0, rtol=1e-12)
    assert bool(((got <= plain * (1 + 1e-12)) & (got >= plain / s.factor * (1 - 1e-12))).all())


def test_yarn_with_factor_one_is_plain_rope():
    s = RopeScaling(factor=1.0, original_max_seq_len=16, mscale=1.0, mscale_all_dim=1.0)
    for got, want in zip(rope_tables(16, 64, 500.0, s), rope_tables(16, 64, 500.0), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
