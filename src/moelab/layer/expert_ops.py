"""Compute kernels of the expert FFNs: the activation, the float32 oneDNN linear and the grouped products
(loop, padded, grouped_mm with its autograd); the fused routed FFN is in
`moelab.layer.fused`. Plain functions on tensors: which one runs is decided by `moelab.layer.policy`; the weights
are owned by `moelab.layer.experts`. Measurements behind the rules here: docs/BENCHMARKS.md ("Path policy,
kernels and layout").

Legend: A = assignments (rows, in expert order), D = model width, I = expert hidden width,
H = width of the first projection (2I for SwiGLU: gate then up; I for GELU), E = experts, T = tokens,
n = rows of one expert's segment.

An expert is an FFN: SwiGLU  out = (silu(x·W_gate) ⊙ x·W_up)·W_down  (Shazeer 2020), or
GELU  out = gelu(x·W_up)·W_down, with stacked weights w_in [E, D, H] and w_out [E, I, D].
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

# ------------------------------------------------------------------------------------------- activation

def in_width(d_hidden: int, activation: str) -> int:
    """H: the first projection's width for a hidden width I (SwiGLU projects to gate and up)."""
    return 2 * d_hidden if activation == "swiglu" else d_hidden


def activate(h_nH: Tensor, activation: str) -> Tensor:
    """a [n, I] = silu(gate) ⊙ up on h's [gate | up] halves (SwiGLU), or gelu(h)."""
    if activation != "swiglu":
        return F.gelu(h_nH)
    gate, up = h_nH.chunk(2, dim=-1)
    a = F.silu(gate)
    return a * up if a.requires_grad else a.mul_(up)  # in place when no graph needs silu's output


def activate_backward(h_nH: Tensor, da_nI: Tensor, activation: str) -> Tensor:
    """dh [n, H] from da = ∂L/∂a, a = activate(h): SwiGLU dgate = da ⊙ up ⊙ silu'(gate), dup = da ⊙ silu(gate).
    Overwrites da."""
    if activation != "swiglu":
        return torch.ops.aten.gelu_backward(da_nI, h_nH)
    gate, up = h_nH.chunk(2, dim=-1)
    I = gate.shape[-1]
    dh = torch.empty_like(h_nH)
    torch.mul(da_nI, F.silu(gate), out=dh[:, I:])
    torch.ops.aten.silu_backward(da_nI.mul_(up), gate, grad_input=dh[:, :I])
    return dh


# ------------------------------------------------------------------------------ oneDNN linear (float32)

@functools.cache
def onednn_matmul_available(dtype: torch.dtype) -> bool:
    """Whether `torch.ops.mkldnn._linear_pointwise` (oneDNN's inner product) runs in `dtype` on the CPU
    and agrees with `torch.mm`: detected, not assumed (it is an internal op of torch's CPU build)."""
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        a = torch.arange(12, dtype=dtype).view(3, 4) / 8
        b = torch.arange(20, dtype=dtype).view(4, 5) / 8
        out = op(a, b.t(), None, "none", [], "")
        return bool(torch.equal(out, torch.mm(a, b)))
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


def _mm_onednn(a: Tensor, b: Tensor) -> Tensor:
    """a @ b through oneDNN (it computes x · Wᵀ, so b is passed transposed; views, no copies)."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")


def matmul_fn(device_type: str, dtype: torch.dtype, rows: int = 2):
    """The fastest plain `a @ b` here for 2-D operands with `rows` rows: oneDNN's inner product in
    float32 on the CPU (torch's float32 `mm` takes a slower BLAS path there), except for a single row,
    where BLAS's matrix-vector product is faster; else `torch.mm` (in bfloat16 already oneDNN)."""
    if device_type == "cpu" and dtype == torch.float32 and rows > 1 and onednn_matmul_available(dtype):
        return _mm_onednn
    return torch.mm


class _Linear(torch.autograd.Function):
    """y = x·Wᵀ with the forward and both backward products on `matmul_fn`."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return matmul_fn(x.device.type, x.dtype, x.shape[0])(x, w.t())

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w = ctx.saved_tensors
        dy = dy.contiguous()
        mm = matmul_fn(dy.device.type, dy.dtype, dy.shape[0])
        dx = mm(dy, w) if ctx.needs_input_grad[0] else None
        dw = matmul_fn(dy.device.type, dy.dtype, dy.shape[1])(dy.t(), x) if ctx.needs_input_grad[1] else None
        return dx, dw


def fast_linear(x: Tensor, w: Tensor) -> Tensor:
    """`F.linear(x, w)` (no bias) for 2-D x with its products on `matmul_fn`: oneDNN in float32 on the
    CPU, where that is the faster kernel; exactly `F.linear` everywhere else."""
    if x.dim() == 2 and x.shape[0] > 1 and w.dtype == x.dtype \
            and matmul_fn(x.device.type, x.dtype, x.shape[0]) is _mm_onednn:
        return _Linear.apply(x, w)
    return F.linear(x, w)


# ------------------------------------------------------------- grouped products over expert segments

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


def grouped_mm_usable(x: Tensor, w_in: Tensor, w_out: Tensor) -> bool:
    """grouped_mm runs here for x's device and dtype, and every matrix width is a multiple of 16 bytes
    (its stride alignment rule)."""
    step = max(1, 16 // x.element_size())
    return grouped_mm_available(x.device.type, x.dtype) and all(
        n % step == 0 for n in (w_in.shape[1], w_in.shape[2], w_out.shape[1], w_out.shape[2]))


class _GroupedMM(torch.autograd.Function):
    """Y[seg_e] = X[seg_e] · W[e] over contiguous segments, with an explicit grouped backward
    dX = grouped_mm(dY, Wᵀ), dW = grouped_mm(Xᵀ, dY) (torch's own backward is slower on the CPU and
    rejects expanded gradients)."""

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
    """One matmul pair per non-empty expert; the weights split once with `unbind` (indexing w[e] per
    expert would make autograd zero-fill a full-size gradient for every expert)."""
    sizes = counts.tolist()  # one host sync: segment sizes are needed to split on the host
    outs = [activate(x_e @ w_in_e, activation) @ w_out_e
            for x_e, w_in_e, w_out_e, n in zip(x_AD.split(sizes), w_in.unbind(0), w_out.unbind(0), sizes) if n]
    return torch.cat(outs) if outs else x_AD.new_zeros(0, w_out.shape[-1])


def _ffn_padded(x_AD: Tensor, counts: Tensor, w_in: Tensor, w_out: Tensor, activation: str) -> Tensor:
    """Rows scattered into an [E, C_max, D] buffer, two `bmm`s (good when loads are even)."""
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


GROUPED_BACKENDS = {"loop": _ffn_loop, "padded": _ffn_padded, "grouped_mm": _ffn_grouped_mm}


def grouped_ffn(x_AD: Tensor, counts: Tensor, w_in: Tensor, w_out: Tensor, activation: str,
                backend: str) -> Tensor:
    """Expert e on rows [start_e, start_e + counts[e]) of x_AD → unweighted outputs [A, D]; `backend` is
    one of GROUPED_BACKENDS (`moelab.layer.policy.grouped_backend` resolves "auto" and checks usability)."""
    return GROUPED_BACKENDS[backend](x_AD, counts, w_in, w_out, activation)
