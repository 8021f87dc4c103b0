"""Causal attention with a sliding window and/or attention sinks (gpt-oss, OpenAI 2025), in explicit form.

For query position p (S new queries at start..start+S-1, L = start + S keys):
    allowed(p, j) = j <= p  and  p − j < window          (window None: every j <= p)
    s_j = scale · q·k_j for allowed j;  z = s_j plus, with sinks, one logit σ_h per head
    out = Σ_j softmax(z)_j · v_j                         (the sink's share attends to nothing)
so a sink scales the ordinary attention output by Σ exp(s) / (Σ exp(s) + exp(σ_h)) (Xiao et al. 2023,
"Efficient Streaming Language Models with Attention Sinks", learned per head as in gpt-oss).
Without sinks this is `scaled_dot_product_attention` with the window's mask. Keys and values arrive
with the query heads already expanded (grouped-query attention repeats them before).
Legend: B batch, H heads, S queries, L keys, Dh head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def window_mask(S: int, L: int, start: int, window: int | None, device: torch.device) -> Tensor:
    """allowed [S, L] (bool) for queries at start..start+S-1 over keys 0..L-1."""
    q_pos = start + torch.arange(S, device=device)[:, None]
    k_pos = torch.arange(L, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed


def masked_attention(q: Tensor, k: Tensor, v: Tensor, start: int, scale: float | None, window: int | None,
                     sinks: Tensor | None) -> Tensor:
    """out [B, H, S, Dh] for q [B, H, S, Dh], k and v [B, H, L, Dh]; sinks [H] or None (module docstring).
    The sink softmax runs in float32 at least."""
    S, L = q.shape[2], k.shape[2]
    allowed = window_mask(S, L, start, window, q.device)
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q @ k.transpose(-1, -2)).to(dtype) * scale  # [B, H, S, L]
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.to(dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :L]
    return probs.to(v.dtype) @ v
