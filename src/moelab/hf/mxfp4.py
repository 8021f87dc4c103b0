"""MXFP4, the format gpt-oss publishes its expert weights in, decoded to floating point on load.

OCP Microscaling (MX) FP4: values in blocks of 32 share one 8-bit power-of-two scale; each value is a
4-bit E2M1 float (sign, 2 exponent bits, 1 mantissa bit), one of ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}.
A checkpoint stores, for a weight whose rows hold C = 32·G values,
    `*_blocks` [..., R, G, 16] uint8: two values per byte, the low nibble first, then the high nibble
    `*_scales` [..., R, G] uint8: the block's exponent + 127
so that  value[..., r, 32·g + 2·i]     = FP4[blocks[..., r, g, i] & 0xF] · 2^(scales[..., r, g] − 127)
         value[..., r, 32·g + 2·i + 1] = FP4[blocks[..., r, g, i] >> 4]  · 2^(scales[..., r, g] − 127).
gpt-oss's `gate_up_proj_blocks` decode to [E, 2F, D] and `down_proj_blocks` to [E, D, F]: the transposes
of transformers' in-memory `gate_up_proj` [E, D, 2F] and `down_proj` [E, F, D].
"""

from __future__ import annotations

import torch
from torch import Tensor

# E2M1 codes 0..15 → value (bit 3 is the sign)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """[..., R, G·32] values of `dtype` from blocks [..., R, G, 16] (uint8) and scales [..., R, G] (uint8).
    Exact in float32 and bfloat16 (a value has 2 significant bits, times a power of two within their exponent
    range); the loader decodes straight into the model's dtype, so a bfloat16 load holds no float32 copy.
    ValueError when the shapes or dtypes do not fit together."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not fit: "
                         "allowed blocks [..., G, 16] with scales [..., G]")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    out = torch.empty(*blocks.shape[:-1], 32, dtype=dtype, device=blocks.device)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    out = torch.ldexp(out, (scales.to(torch.int32) - 127).unsqueeze(-1).to(dtype))
    return out.flatten(-2)
