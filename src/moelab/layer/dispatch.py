"""Dispatch: put assignments in expert order (permute), drop over capacity, and combine back.

Legend: T = tokens, D = model width, E = experts, A = assignments (kept ones after dropping).

permute: a stable sort of the assignments by expert index gives contiguous per-expert segments; with a
capacity C, an assignment whose position inside its expert's segment is ≥ C is dropped (its expert
output is zero, so the residual stream carries the token unchanged). Because assignments arrive
rank-major (see `moelab.layer.routing`), first choices are kept before second choices.

combine: y[t] = Σ over kept assignments a of token t: weight_a · expert_out_a (a scatter-add).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.layer.routing import Routing


@dataclass
class Dispatch:
    """Kept assignments in expert order: token_idx [A], weight [A], counts [E] (sum = A)."""

    token_idx: Tensor
    weight: Tensor
    counts: Tensor
    n_dropped: Tensor  # scalar long: assignments dropped by capacity


def token_choice_capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """Per-expert capacity C = ceil(cf · T · k / E) (Switch Transformer, eq. 3)."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def permute(routing: Routing, n_experts: int, capacity: int | None) -> Dispatch:
    """Sort assignments by expert; drop those beyond `capacity` per expert (None = dropless)."""
    token_idx, expert_idx, weight = routing.assignments()
    order = torch.sort(expert_idx, stable=True).indices
    counts = torch.bincount(expert_idx, minlength=n_experts)
    n_dropped = torch.zeros((), dtype=torch.long, device=expert_idx.device)
    if capacity is not None:
        starts = counts.cumsum(0) - counts
        pos = torch.arange(order.numel(), device=order.device) - starts[expert_idx[order]]
        keep = pos < capacity
        order = order[keep]  # boolean indexing: one host sync, only when dropping is enabled
        kept = counts.clamp(max=capacity)
        n_dropped = (counts - kept).sum()
        counts = kept
    return Dispatch(
        token_idx=token_idx[order],
        weight=weight[order],
        counts=counts,
        n_dropped=n_dropped,
    )


def combine(out_AD: Tensor, dispatch: Dispatch, n_tokens: int) -> Tensor:
    """y [T, D] = scatter-add of weight · expert output back to each assignment's token."""
    weighted_AD = out_AD * dispatch.weight.to(out_AD.dtype).unsqueeze(-1)
    y_TD = out_AD.new_zeros(n_tokens, out_AD.shape[-1])
    return y_TD.index_add_(0, dispatch.token_idx, weighted_AD)
