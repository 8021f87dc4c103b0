"""Experts: stacked expert weights, their activation, and the grouped compute backends.

Legend: A = assignments (rows, already in expert order), D = model width, F = expert hidden width,
E = experts, H = width of the first projection (2F for SwiGLU: gate then up; F for GELU).

An expert is an FFN: SwiGLU  out = (silu(x·W_gate) ⊙ x·W_up)·W_down  (Shazeer 2020), or
GELU  out = gelu(x·W_up)·W_down. All experts live in two stacked tensors, `w_in` [E, D, H] and
`w_out` [E, F, D], so the E experts run as one grouped computation over contiguous row segments
(`counts` rows for each expert, in order). Backends, all held to the same per-token reference in tests:

- "loop": one matmul pair per non-empty expert. The weights are split once with `unbind` (indexing
  `w[e]` per expert would make autograd zero-fill a full-size gradient for every expert).
- "padded": scatter rows into an [E, C_max, D] buffer and run two `bmm`s (good when loads are even).
- "grouped_mm": `torch.nn.functional.grouped_mm` with a hand-written backward (`_GroupedMM`):
  dX = grouped_mm(dY, Wᵀ), dW = grouped_mm(Xᵀ, dY). Used when the torch build and the shapes allow it.
- "auto": grouped_mm where available, else loop.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.config import MoEConfig


def activate(h_AH: Tensor, activation: str) -> Tensor:
    """SwiGLU on [gate | up] halves, or GELU."""
    if activation == "swiglu":
        gate, up = h_AH.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h_AH)


def in_width(d_hidden: int, activation: str) -> int:
    return 2 * d_hidden if activation == "swiglu" else d_hidden


class FeedForward(nn.Module):
    """A dense FFN of hidden width `d_hidden` (SwiGLU or GELU): the dense layers, the shared experts
    and the dense twin all use it. Weights: w_in [H, D], w_out [D, F] (nn.Linear layout)."""

    def __init__(self, d_model: int, d_hidden: int, activation: str = "swiglu") -> None:
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(d_model, in_width(d_hidden, activation), bias=False)
        self.w_out = nn.Linear(d_hidden, d_model, bias=False)
        nn.init.normal_(self.w_in.weight, std=0.02)
        nn.init.normal_(self.w_out.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(activate(self.w_in(x), self.activation))


@functools.cache
def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch build runs `grouped_mm` forward on (device, dtype): detected, not assumed."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        x = torch.ones(4, 8, device=device_type, dtype=dtype)
        w = torch.ones(2, 8, 8, device=device_type, dtype=dtype)
        offs = torch.tensor([1, 4], device=device_type, dtype=torch.int32)
        out = F.grouped_mm(x, w, offs=offs)
        return bool(torch.all(out == 8).item())
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


def _grouped_mm_shapes_ok(x_AD: Tensor, w_in: Tensor, w_out: Tensor) -> bool:
    """grouped_mm needs 16-byte aligned strides: every matrix width a multiple of 16 bytes."""
    step = max(1, 16 // x_AD.element_size())
    return all(n % step == 0 for n in (w_in.shape[1], w_in.shape[2], w_out.shape[1], w_out.shape[2]))


class _GroupedMM(torch.autograd.Function):
    """Y[seg_e] = X[seg_e] · W[e] over contiguous segments, with an explicit grouped backward."""

    @staticmethod
    def forward(ctx, x_AK: Tensor, w_EKN: Tensor, offs: Tensor) -> Tensor:
        ctx.save_for_backward(x_AK, w_EKN, offs)
        return F.grouped_mm(x_AK, w_EKN, offs=offs)

    @staticmethod
    def backward(ctx, dy_AN: Tensor):
        x_AK, w_EKN, offs = ctx.saved_tensors
        dy_AN = dy_AN.contiguous()  # an expanded gradient breaks grouped_mm's stride checks
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = F.grouped_mm(dy_AN, w_EKN.transpose(1, 2), offs=offs)
        if ctx.needs_input_grad[1]:
            dw = F.grouped_mm(x_AK.t(), dy_AN, offs=offs)
        return dx, dw, None


def _ffn_grouped_mm(x_AD: Tensor, counts: Tensor, w_in: Tensor, w_out: Tensor, activation: str) -> Tensor:
    offs = counts.cumsum(0).to(torch.int32)
    h = _GroupedMM.apply(x_AD.contiguous(), w_in, offs)
    return _GroupedMM.apply(activate(h, activation).contiguous(), w_out, offs)


def _ffn_loop(x_AD: Tensor, counts: Tensor, w_in: Tensor, w_out: Tensor, activation: str) -> Tensor:
    sizes = counts.tolist()  # one host sync: segment sizes are needed to split on the host
    outs = []
    for x_e, w_in_e, w_out_e, n in zip(x_AD.split(sizes), w_in.unbind(0), w_out.unbind(0), sizes):
        if n:
            outs.append(activate(x_e @ w_in_e, activation) @ w_out_e)
    if not outs:
        return x_AD.new_zeros(0, w_out.shape[-1])
    return torch.cat(outs)


def _ffn_padded(x_AD: Tensor, counts: Tensor, w_in: Tensor, w_out: Tensor, activation: str) -> Tensor:
    E = counts.numel()
    if x_AD.shape[0] == 0:
        return x_AD.new_zeros(0, w_out.shape[-1])
    c_max = int(counts.max())  # one host sync: the padded buffer's size
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=x_AD.device), counts)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(x_AD.shape[0], device=x_AD.device) - starts[expert_of_row]
    x_ECD = x_AD.new_zeros(E, c_max, x_AD.shape[-1]).index_put((expert_of_row, slot), x_AD)
    out_ECD = torch.bmm(activate(torch.bmm(x_ECD, w_in), activation), w_out)
    return out_ECD[expert_of_row, slot]


_BACKENDS = {"loop": _ffn_loop, "padded": _ffn_padded, "grouped_mm": _ffn_grouped_mm}


def resolve_backend(backend: str, x_AD: Tensor, w_in: Tensor, w_out: Tensor) -> str:
    """The backend that will run: "auto" picks grouped_mm where the build and shapes allow it."""
    usable = grouped_mm_available(x_AD.device.type, x_AD.dtype) and _grouped_mm_shapes_ok(x_AD, w_in, w_out)
    if backend == "auto":
        return "grouped_mm" if usable else "loop"
    if backend == "grouped_mm" and not usable:
        raise ValueError(
            f"backend='grouped_mm' is not usable for dtype {x_AD.dtype} on {x_AD.device.type} with widths "
            f"{tuple(w_in.shape[1:])}/{tuple(w_out.shape[1:])} (needs torch.nn.functional.grouped_mm, "
            "float32/bfloat16/float16 and 16-byte-aligned widths); allowed: 'auto', 'loop', 'padded'"
        )
    return backend


def grouped_ffn(x_AD: Tensor, counts: Tensor, w_in: Tensor, w_out: Tensor, activation: str,
                backend: str = "auto") -> Tensor:
    """Run expert e on rows [start_e, start_e + counts[e]) of x_AD; returns [A, D]."""
    return _BACKENDS[resolve_backend(backend, x_AD, w_in, w_out)](x_AD, counts, w_in, w_out, activation)


class Experts(nn.Module):
    """E routed experts as stacked weights: w_in [E, D, H], w_out [E, F, D]."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        self.backend = cfg.backend
        E, D, Fh = cfg.n_experts, cfg.d_model, cfg.d_expert
        self.w_in = nn.Parameter(torch.empty(E, D, in_width(Fh, cfg.activation)))
        self.w_out = nn.Parameter(torch.empty(E, Fh, D))
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02)

    def forward(self, x_AD: Tensor, counts: Tensor) -> Tensor:
        return grouped_ffn(x_AD, counts, self.w_in, self.w_out, self.activation, self.backend)
