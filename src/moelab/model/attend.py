"""Causal attention with a sliding window and/or attention sinks (gpt-oss, OpenAI 2025), in explicit form.

For query position p (S new queries at start..start+S-1, L = start + S keys):
    allowed(p, j) = j <= p  and  p − j < window          (window None: every j <= p)
    s_j = scale · q·k_j for allowed j;  z = s_j plus, with sinks, one logit σ_h per head
    out = Σ_j softmax(z)_j · v_j                         (the sink's share attends to nothing)
so a sink scales the ordinary attention output by Σ exp(s) / (Σ exp(s) + exp(σ_h)) (Xiao et al. 2023,
"Efficient Streaming Language Models with Attention Sinks", learned per head as in gpt-oss).
Without sinks this is `scaled_dot_product_attention` with the window's mask. A batch of prompts of
different lengths is left-padded: row b's keys before pad[b] are masked out.
Legend: B batch, H heads, S queries, L keys, Dh head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def allowed_keys(S: int, L: int, start: int, window: int | None, pad: Tensor | None, device: torch.device) -> Tensor:
    """allowed (bool) for queries at start..start+S-1 over keys 0..L-1: [S, L], or [B, 1, S, L] with `pad` [B]
    (left padding: row b's keys before pad[b] are masked out; a pad query keeps only itself)."""
    q_pos = start + torch.arange(S, device=device)[:, None]
    k_pos = torch.arange(L, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    if pad is not None:
        allowed = (allowed & ((k_pos >= pad[:, None, None]) | (k_pos == q_pos)))[:, None]
    return allowed


def sink_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float | None, sinks: Tensor) -> Tensor:
    """out [B, H, S, Dh] for q [B, H, S, Dh], k and v [B, H, L, Dh], `allowed` [S, L] or [B, 1, S, L] and
    sinks [H] (module docstring). The sink softmax runs in float32 at least."""
    L = k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q @ k.transpose(-1, -2)).to(dtype) * scale  # [B, H, S, L]
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.to(dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :L]
    return probs.to(v.dtype) @ v


def one_query_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """out [B, H, 1, Dh] for one new query per row over all L keys (a decode step), in float32 at least: the H/G
    query heads of each kv head as the rows of one float product. Not `scaled_dot_product_attention`: its CPU kernel
    costs 0.1-0.3 ms at one query, and a bfloat16 product of a new shape each step costs ~1 ms (docs/BENCHMARKS.md)."""
    B, H, _, Dh = q.shape
    G = k.shape[1]
    scale = Dh ** -0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.reshape(B, G, H // G, Dh).to(dtype) @ k.to(dtype).transpose(-1, -2)).mul_(scale)  # [B, G, H/G, L]
    return (torch.softmax(scores, dim=-1) @ v.to(dtype)).view(B, H, 1, v.shape[-1]).to(q.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, start: int, scale: float | None = None, window: int | None = None,
           sinks: Tensor | None = None, pad: Tensor | None = None) -> Tensor:
    """Causal attention of S new queries (positions start..start+S-1) over L = start + S keys, q [B, H, S, Dh],
    k and v [B, G, L, Dh] (grouped-query: each kv head serves H/G query heads); with a sliding window,
    attention sinks and left padding (`allowed_keys`). Without them, the causal kernel with no mask."""
    S, L = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    windowed = window is not None and window < L
    if sinks is None and not windowed and pad is None and S == 1:  # a decode step: every key is seen
        return one_query_attention(q, k, v, scale)
    if sinks is None and not windowed and pad is None and start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, scale=scale, enable_gqa=gqa)
    allowed = allowed_keys(S, L, start, window if windowed else None, pad, q.device)
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    if gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return sink_attention(q, k, v, allowed, scale, sinks)
