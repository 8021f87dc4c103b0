"""The kernels' int4 tile layout and the activation quantizer they state, in plain torch (no kernel needed)."""

from __future__ import annotations

import torch
from torch import Tensor


def quantize_activations(x_MK: Tensor) -> Tensor:
    """x̂ (float64) as the int8 / int4 kernels see x: per block of 32, sx = max|x| / 127, x̂ = round(x / sx)·sx,
    computed in float32 as the kernel does (the reference the tests compare the kernels against)."""
    xb = x_MK.float().reshape(*x_MK.shape[:-1], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), 0.0)  # a true division (127 / t is 127·(1/t))
    q = torch.round(xb * inv).clamp_(-127, 127)
    return (q.double() * (amax / 127.0).double()).reshape(x_MK.shape)


def tile_int4(codes_NK: Tensor, scale_NG: Tensor, zero_NG: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Codes 0..15 [N, K] and scale, zero [N, K/G] → the kernel's int4 layout (N % 16 == 0, K % 32 == 0):
    codes uint8 [N/16, K/32, 4, 16, 4], byte [t, b, j, r, i] = q[16t+r, 32b+4j+i] | q[16t+r, 32b+16+4j+i] << 4,
    so one 64-byte load holds 4 codes of each of 16 rows; scale, zero [N/16, K/G, 16]."""
    N, K = codes_NK.shape
    q = codes_NK.to(torch.uint8).view(N // 16, 16, K // 32, 2, 4, 4)
    packed = (q[:, :, :, 0] | q[:, :, :, 1] << 4).permute(0, 2, 3, 1, 4).contiguous()
    scale, zero = (t.reshape(N // 16, 16, -1).transpose(1, 2).contiguous() for t in (scale_NG, zero_NG))
    return packed, scale, zero


def untile_int4(packed: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The inverse of `tile_int4`: codes [N, K] uint8, scale and zero [N, K/G]."""
    T, nb = packed.shape[:2]
    b = packed.permute(0, 3, 1, 2, 4)  # [T, 16, K/32, 4, 4]
    codes = torch.stack([b & 15, b >> 4], dim=3).reshape(16 * T, 32 * nb)
    return codes, *(t.transpose(1, 2).reshape(16 * T, -1) for t in (scale, zero))
