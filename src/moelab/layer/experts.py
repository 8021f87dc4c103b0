"""Where expert weights live: the dense FFN (`FeedForward`) and the storage of an MoE layer's routed
experts (`ExpertStore`, and `Experts`, its stacked dense form).

A store owns the weights; a path (`moelab.layer.paths`) owns the dispatch and calls the store. Every store
computes one expert at a time (`ffn`, and `decode` for one token through its chosen experts); a store
whose weights are dense stacked tensors also hands them out (`stacked`), which the fused, grouped_mm
and padded kernels need. A store of another form (quantized or streamed-from-disk experts) implements
`ffn` and returns None from `stacked`; `moelab.layer.policy` then runs it on the per-expert paths.

Legend: D = model width, I = expert hidden width, H = first projection's width (2I for SwiGLU),
E = experts held, n = rows of one expert's segment.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.config.model import MoEConfig
from moelab.layer.expert_ops import activate, grouped_ffn, in_width

INIT_STD = 0.02  # N(0, 0.02) initial weights (GPT-2, Radford et al. 2019)


class FeedForward(nn.Module):
    """A dense FFN of hidden width `d_hidden` (SwiGLU or GELU): the dense layers, the shared experts
    and the dense twin all use it. Weights: w_in [H, D], w_out [D, I] (nn.Linear layout), drawn from
    N(0, INIT_STD) and N(0, `out_std`) (a smaller `out_std` for projections into a residual stream)."""

    def __init__(self, d_model: int, d_hidden: int, activation: str = "swiglu", out_std: float = INIT_STD) -> None:
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(d_model, in_width(d_hidden, activation), bias=False)
        self.w_out = nn.Linear(d_hidden, d_model, bias=False)
        nn.init.normal_(self.w_in.weight, std=INIT_STD)
        nn.init.normal_(self.w_out.weight, std=out_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(activate(self.w_in(x), self.activation))


def weighted_sum(ffns: list, weights: list[float], x_1D: Tensor) -> Tensor:
    """y [1, D] = Σⱼ wⱼ · ffnⱼ(x) for one token through its k chosen experts: the one torch implementation of a
    decode step's experts (every store's `decode`; moelab's kernels have their own, `native.moe_decode`)."""
    y_1D = None
    for ffn, w in zip(ffns, weights):
        out = ffn(x_1D)
        y_1D = out.mul_(w) if y_1D is None else y_1D.add_(out, alpha=w)
    return y_1D


class ExpertStore(nn.Module):
    """The interface a routed path uses: E experts of one activation.

    `ffn(x_nD, e, dtype)`: expert e's unweighted output for its rows (every store implements it).
    `forward(x_AD, counts, backend, dtype)`: rows in expert order (counts [E] rows per expert) → their
        unweighted outputs [A, D]: the grouped kernel `backend` on stacked weights, else `ffn` per expert.
    `decode(x_1D, experts, weights, dtype)`: y [1, D] = Σⱼ wⱼ · FFN_{eⱼ}(x) for one token (inference).
    `stacked(dtype)`: (w_in [E, D, H], w_out [E, I, D]) as dense tensors, or None when the store has
    no such form. `dtype` (autocast): compute in that dtype, casting the weights as nn.Linear's would.
    """

    n_experts: int
    activation: str

    def forward(self, x_AD: Tensor, counts: Tensor, backend: str = "loop",
                dtype: torch.dtype | None = None) -> Tensor:
        stacked = self.stacked(dtype)
        if stacked is not None:
            return grouped_ffn(x_AD, counts, *stacked, self.activation, backend)
        sizes = counts.tolist()
        outs = [self.ffn(x_e, e, dtype) for e, x_e in enumerate(x_AD.split(sizes)) if sizes[e]]
        return torch.cat(outs) if outs else x_AD.new_zeros(x_AD.shape)

    def ffn(self, x_nD: Tensor, e: int, dtype: torch.dtype | None = None) -> Tensor:
        raise NotImplementedError

    def decode(self, x_1D: Tensor, experts: list[int], weights: list[float],
               dtype: torch.dtype | None = None) -> Tensor:
        return weighted_sum([lambda x, e=e: self.ffn(x, e, dtype) for e in experts], weights, x_1D)

    def stacked(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor] | None:
        return None


class Experts(ExpertStore):
    """E routed experts as stacked dense weights: w_in [E, D, H], w_out [E, I, D] (N(0, INIT_STD) and
    N(0, `out_std`))."""

    def __init__(self, cfg: MoEConfig, out_std: float = INIT_STD) -> None:
        super().__init__()
        self.activation = cfg.activation
        self.n_experts = cfg.n_experts
        E, D, I = cfg.n_experts, cfg.d_model, cfg.d_expert
        self.w_in = nn.Parameter(torch.empty(E, D, in_width(I, cfg.activation)))
        self.w_out = nn.Parameter(torch.empty(E, I, D))
        nn.init.normal_(self.w_in, std=INIT_STD)
        nn.init.normal_(self.w_out, std=out_std)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, w_in={tuple(self.w_in.shape)}, w_out={tuple(self.w_out.shape)}"

    def stacked(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(w_in, w_out), cast to `dtype` when given (differentiable, like nn.Linear's autocast cast)."""
        if dtype is None:
            return self.w_in, self.w_out
        return self.w_in.to(dtype), self.w_out.to(dtype)

    def ffn(self, x_nD: Tensor, e: int, dtype: torch.dtype | None = None) -> Tensor:
        w_in, w_out = self.w_in[e], self.w_out[e]
        if dtype is not None:
            w_in, w_out = w_in.to(dtype), w_out.to(dtype)
        return activate(x_nD @ w_in, self.activation) @ w_out

    @torch.no_grad()
    def keep(self, start: int, stop: int) -> None:
        """Keep only experts [start, stop) (expert parallelism: this rank's slice); the parameters are
        replaced by copies of their slices, marked `expert_parallel` (local, never all-reduced)."""
        self.w_in = nn.Parameter(self.w_in[start:stop].clone(), requires_grad=self.w_in.requires_grad)
        self.w_out = nn.Parameter(self.w_out[start:stop].clone(), requires_grad=self.w_out.requires_grad)
        self.w_in.expert_parallel = self.w_out.expert_parallel = True
        self.n_experts = stop - start
