"""Routed experts in the inference weight formats of `moelab.inference.formats`, one expert at a time.

    ew = expert_weights(gate_up_HD, down_DI, quant, group_size=32, activation="swiglu")   # ExpertWeights
    ew.ffn(x_nD), ew.nbytes                               # one expert's FFN, its bytes per token
    store = QuantizedExperts([ew_0, ..., ew_{E-1}])       # an ExpertStore (moelab.layer.experts): MoE.experts = store

Legend: D = model width, I = expert hidden width, H = width of the first projection (2I for SwiGLU),
E = experts, k = experts per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moelab.inference import native
from moelab.inference.formats import LinearWeight, linear_weight
from moelab.layer.expert_ops import activate, in_width
from moelab.layer.experts import ExpertStore, weighted_sum


class ExpertWeights:
    """One routed expert for inference: gate_up [H, D] (SwiGLU: gate rows then up rows; GELU: up) and
    down [D, I], each a LinearWeight. ffn(x) = down(silu(x·W_gateᵀ) ⊙ x·W_upᵀ), or down(gelu(x·W_upᵀ))."""

    __slots__ = ("gate_up", "down", "activation")

    def __init__(self, gate_up: LinearWeight, down: LinearWeight, activation: str) -> None:
        self.gate_up, self.down, self.activation = gate_up, down, activation

    def ffn(self, x_nD: Tensor) -> Tensor:
        return self.down(activate(self.gate_up(x_nD), self.activation))

    @property
    def nbytes(self) -> int:
        """Bytes of weights one token through this expert reads."""
        return self.gate_up.nbytes + self.down.nbytes


def expert_weights(gate_up: Tensor, down: Tensor, quant: str | None = None, group_size: int = 32,
                   activation: str = "swiglu") -> ExpertWeights:
    """One expert from its float weights: gate_up [H, D] = [W_gate; W_up] (H = 2I for SwiGLU, I for GELU), down
    [D, I] (both nn.Linear layout), in format `quant`. ValueError when the shapes disagree."""
    if activation not in ("swiglu", "gelu"):
        raise ValueError(f"activation={activation!r} is not supported: allowed 'swiglu', 'gelu'")
    if gate_up.dim() != 2 or down.dim() != 2 or gate_up.shape != (in_width(down.shape[1], activation), down.shape[0]):
        raise ValueError(f"expert weights of shapes gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do not "
                         f"fit one {activation} expert: need gate_up [{'2I' if activation == 'swiglu' else 'I'}, D] "
                         "and down [D, I]")
    return ExpertWeights(linear_weight(gate_up, quant, group_size), linear_weight(down, quant, group_size), activation)


class QuantizedExperts(ExpertStore):
    """E routed experts as per-expert `ExpertWeights` (any format): `ffn` and `decode`; `stacked()` is None,
    so `moelab.layer.policy` runs the store on the decode path and the grouped loop."""

    def __init__(self, experts: Sequence[ExpertWeights]) -> None:
        super().__init__()
        if not experts:
            raise ValueError("QuantizedExperts needs at least one expert")
        self.weights = list(experts)
        self.n_experts = len(self.weights)
        self.activation = self.weights[0].activation
        if any(ew.activation != self.activation for ew in self.weights):
            raise ValueError("QuantizedExperts: all experts must have the same activation")

    def extra_repr(self) -> str:
        w = self.weights[0]
        return (f"n_experts={self.n_experts}, quant={w.gate_up.quant!r}, gate_up={w.gate_up}, down={w.down}, "
                f"activation={self.activation!r}")

    @property
    def nbytes(self) -> int:
        return sum(ew.nbytes for ew in self.weights)

    def ffn(self, x_nD: Tensor, e: int, dtype: torch.dtype | None = None) -> Tensor:
        y = self.weights[e].ffn(x_nD)
        return y if dtype is None else y.to(dtype)

    def decode(self, x_1D: Tensor, experts: list[int], weights: list[float],
               dtype: torch.dtype | None = None) -> Tensor:
        return decode_experts([self.weights[e] for e in experts], weights, self.activation, x_1D, dtype)


def decode_experts(chosen: list[ExpertWeights], weights: list[float], activation: str, x_1D: Tensor,
                   dtype: torch.dtype | None = None) -> Tensor:
    """y [1, D] = Σⱼ wⱼ · FFN_j(x) over the k `chosen` experts: one call of moelab's kernels where every chosen
    weight runs on them in one format (`moelab.inference.native.moe_decode`), else the stores' torch decode
    (`moelab.layer.experts.weighted_sum` of the experts' FFNs)."""
    gate_ups, downs = [ew.gate_up.native for ew in chosen], [ew.down.native for ew in chosen]
    if native.same_format(gate_ups) and native.same_format(downs):
        y_1D = native.moe_decode(gate_ups, downs, weights, x_1D, activation)
        return y_1D if y_1D.dtype == (dtype or x_1D.dtype) else y_1D.to(dtype or x_1D.dtype)
    y_1D = weighted_sum([ew.ffn for ew in chosen], weights, x_1D)
    return y_1D if dtype is None else y_1D.to(dtype)
