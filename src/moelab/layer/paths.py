"""The ways an MoE layer runs its routed experts, behind one interface.

A path takes the layer (its config and its expert store, `moelab.layer.experts`), the tokens x_TD, the
router's decision and the compute dtype, and returns the routed experts' combined output y [T, D] and
the number of assignments dropped by capacity:

    y_TD, n_dropped = path(layer, x_TD, routing, dtype)

- `DecodePath`: one token (inference): its k experts straight from the store, no sort or scatter.
- `FusedPath`: permute, then `fused.routed_ffn` — gather, FFN and scatter-add one expert segment at
  a time (stacked dense weights).
- `GroupedPath(backend)`: permute → the store's grouped compute over the rows in expert order (the
  kernel "loop", "padded" or "grouped_mm"; a store without stacked weights runs its experts one at a
  time) → combine.
- `AllToAllPath` (`moelab.parallel.expert`): expert parallelism; rows travel to the rank that holds
  their expert and back.

Which path runs is decided in one place, `moelab.layer.policy.choose_path`, unless the layer holds an
installed path (`MoE.path`). A path that shares the layer's statistics with other processes sets
`reduce` (a function summing a tensor in place over them); the layer's statistics then go through it.

Legend: T = tokens, D = model width, A = kept assignments, E = experts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from moelab.config.model import MoEConfig
from moelab.layer.dispatch import combine, permute, token_choice_capacity
from moelab.layer.experts import ExpertStore
from moelab.layer.fused import routed_ffn
from moelab.layer.routing import Routing


class RoutedLayer(Protocol):
    """What a path reads of the layer it runs (an `MoE`): its config and its expert store."""

    cfg: MoEConfig
    experts: ExpertStore


class Path:
    """One way to run the routed experts: `path(layer, x_TD, routing, dtype)` → (y_TD, n_dropped)."""

    name = "path"
    reduce: Callable[[Tensor], object] | None = None

    def __call__(self, layer: RoutedLayer, x_TD: Tensor, routing: Routing,
                 dtype: torch.dtype | None) -> tuple[Tensor, Tensor | int]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def capacity(cfg: MoEConfig, n_tokens: int) -> int | None:
    """Per-expert capacity for token-choice routing with a capacity factor, else None (dropless)."""
    if cfg.capacity_factor is None or cfg.router == "expert_choice":
        return None
    return token_choice_capacity(cfg.capacity_factor, n_tokens, cfg.top_k, cfg.n_experts)


class DecodePath(Path):
    """A single token under no_grad with a token-choice router: its k experts run on the store's
    `decode` (on the stacked weights: two products per expert on views, the weight folded into the
    second); nothing is sorted, gathered, scattered or dropped."""

    name = "decode"

    def __call__(self, layer, x_TD, routing, dtype):
        # host lists, not row selects: at decode every tensor op counts
        experts, weights = routing.topk_idx.tolist()[0], routing.topk_weight.tolist()[0]
        return layer.experts.decode(x_TD, experts, weights, dtype), 0


class FusedPath(Path):
    """permute → `fused.routed_ffn`: nothing [A, D] wide is materialised (stacked dense stores)."""

    name = "fused"

    def __call__(self, layer, x_TD, routing, dtype):
        disp = permute(routing, layer.cfg.n_experts, capacity(layer.cfg, x_TD.shape[0]))
        w_in, w_out = layer.experts.stacked(dtype)
        y_TD = routed_ffn(x_TD, disp.token_idx, disp.weight, disp.counts, w_in, w_out, layer.experts.activation)
        return y_TD, disp.n_dropped


class GroupedPath(Path):
    """permute → gather x rows [A, D] → grouped compute (`backend`) → weighted combine."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.name = f"grouped:{backend}"

    def __call__(self, layer, x_TD, routing, dtype):
        T = x_TD.shape[0]
        disp = permute(routing, layer.cfg.n_experts, capacity(layer.cfg, T))
        out_AD = layer.experts(x_TD[disp.token_idx], disp.counts, self.backend, dtype)
        return combine(out_AD, disp, T), disp.n_dropped
