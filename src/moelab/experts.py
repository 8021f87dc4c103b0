"""Experts: stacked expert weights, their activation, and the grouped compute backends.

Legend: A = assignments (rows, already in expert order), D = model width, F = expert hidden width,
E = experts, H = width of the first projection (2F for SwiGLU: gate then up; F for GELU), T = tokens.

An expert is an FFN: SwiGLU  out = (silu(x·W_gate) ⊙ x·W_up)·W_down  (Shazeer 2020), or
GELU  out = gelu(x·W_up)·W_down. All experts live in two stacked tensors, `w_in` [E, D, H] and
`w_out` [E, F, D], so the E experts run as one grouped computation over contiguous row segments
(`counts` rows for each expert, in order). Backends, all held to the same per-token reference in tests:

- "loop": one matmul pair per non-empty expert. The weights are split once with `unbind` (indexing
  `w[e]` per expert would make autograd zero-fill a full-size gradient for every expert).
- "padded": scatter rows into an [E, C_max, D] buffer and run two `bmm`s (good when loads are even).
- "grouped_mm": `torch.nn.functional.grouped_mm` with a hand-written backward (`_GroupedMM`):
  dX = grouped_mm(dY, Wᵀ), dW = grouped_mm(Xᵀ, dY). Used when the torch build and the shapes allow it.
  These three take the gathered rows [A, D] and return unweighted outputs [A, D]; the MoE layer then
  weights and combines them (`moelab.dispatch.combine`).
- "auto": on the CPU, the fused routed path (`routed_ffn`, `_RoutedFFN`): for each expert's segment,
  gather its tokens, run the FFN with the routing weight folded into the activation, and scatter-add
  into y [T, D], with a hand-written backward. No [A, D]-sized tensor is ever materialised (every
  temporary is one expert's size, so it stays in cache and off the page-fault path), and the matmuls
  go through oneDNN where the build has it (`matmul_fn`) — for experts of at least
  `FUSED_MIN_EXPERT_SIZE` = d·f; smaller experts on the CPU take "loop" (below). A single token under
  no_grad (a decode step) runs `decode_ffn`, and an inference batch of at most
  `INFERENCE_GROUPED_MAX_ROWS` assignments grouped_mm (`compute_path`). Elsewhere: grouped_mm where
  available, else loop.
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
    if backend == "auto":  # on the CPU the loop is as fast or faster in training (inference: compute_path)
        return "grouped_mm" if usable and x_AD.device.type != "cpu" else "loop"
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


# --------------------------------------------------------------------------------------------------
# The fused routed path: gather → expert FFN → weight → scatter-add, one expert segment at a time.
# --------------------------------------------------------------------------------------------------


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
    """The fastest plain `a @ b` here for 2-D operands with `rows` rows: in float32 on the CPU, oneDNN's
    inner product (torch's float32 `mm` takes a BLAS path that reaches under half of oneDNN's rate on
    this AMD EPYC: measured 1.7-2.2x faster at the expert shapes from 4 rows up), except for a single
    row, where the BLAS matrix-vector product is faster (0.09 vs 0.12 ms for 1024 x 1024); else
    `torch.mm` (which in bfloat16 already runs oneDNN's matmul)."""
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


# Below this many rows the weight-gradient product xᵀ·dy (inner dimension = rows) is faster with
# `torch.mm(out=)` than with oneDNN plus a copy into the stacked gradient (measured: crossover near 256
# rows for D = 1024, F = 512 in float32).
_ONEDNN_WGRAD_MIN_ROWS = 256


def _matmul_into(out: Tensor, a: Tensor, b: Tensor, mm) -> None:
    """out = a @ b, written into `out` (a slice of a stacked weight gradient)."""
    if mm is _mm_onednn and a.shape[1] >= _ONEDNN_WGRAD_MIN_ROWS:
        out.copy_(mm(a, b))  # oneDNN has no out= variant
    else:
        torch.mm(a, b, out=out)


def _act_forward(h_nH: Tensor, activation: str) -> Tensor:
    """The unweighted activation a [n, F] from h [n, H]."""
    if activation == "swiglu":
        gate, up = h_nH.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
    return F.gelu(h_nH)


def _routed_forward(x_TD: Tensor, weight_A: Tensor, w_in: Tensor, w_out: Tensor, token_idx: Tensor,
                    sizes: list[int], activation: str, h_saved: list[Tensor] | None = None) -> Tensor:
    """The forward of `_RoutedFFN` (see there); appends each expert's pre-activation to `h_saved`
    when given (for the backward)."""
    y_TD = x_TD.new_zeros(x_TD.shape)
    for (e, n, idx, w), rows in zip(_segments(sizes, token_idx, weight_A), filter(None, sizes)):
        mm = matmul_fn(x_TD.device.type, x_TD.dtype, n)
        h = mm(F.embedding(idx, x_TD), w_in[e])  # [n, H]; embedding = the fastest row gather here
        _add_rows(y_TD, idx, mm(_act_forward(h, activation).mul_(w), w_out[e]), rows)
        if h_saved is not None:
            h_saved.append(h)
    return y_TD


def decode_ffn(x_1D: Tensor, experts: list[int], weights: list[float], w_in: Tensor, w_out: Tensor,
               activation: str) -> Tensor:
    """One token through its chosen experts, for inference: y = Σⱼ wⱼ · FFN_{eⱼ}(x).

    The decode step of generation: no sort, gather or scatter — per chosen expert two products on
    views of the stacked weights, the routing weight folded into the second (`addmm`'s alpha). The
    first expert's `addmm` has beta = 0 (its input is ignored), so no zero tensor is made: one op
    fewer, ~40 µs of ~900 on a cold cache (measured, E = 8, k = 2, float32 and bfloat16).
    """
    y_1D = None
    for e, w in zip(experts, weights):
        a_1F = _act_forward(torch.mm(x_1D, w_in[e]), activation)
        y_1D = torch.addmm(x_1D, a_1F, w_out[e], beta=0, alpha=w) if y_1D is None \
            else y_1D.addmm_(a_1F, w_out[e], alpha=w)
    return y_1D


class _RoutedFFN(torch.autograd.Function):
    """y[t] = Σ_{a : token(a) = t} w_a · FFN_{e(a)}(x[t]) over assignments sorted by expert.

    Expert e owns rows [start_e, start_e + sizes[e]) of `token_idx`/`weight_A`. For each non-empty
    expert: gather its tokens, h = x·W_in, a = act(h), z = w·a (the routing weight folded into the
    activation — the same product as weighting the output, on a narrower tensor), y += z·W_out
    (see `_add_rows`). Every temporary is the size of one expert's segment, so nothing A × D wide is
    materialised (fresh large tensors cost page faults on every call on the CPU).

    Backward, per expert, with dy_e = dy[tokens] and a recomputed from the saved h:
        dz = dy_e·W_outᵀ, dW_out = zᵀ·dy_e, dw = Σ_f dz ⊙ a, da = w·dz, dh = act'(h)·da,
        dx[tokens] += dh·W_inᵀ, dW_in = x_eᵀ·dh.
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, weight_A: Tensor, w_in: Tensor, w_out: Tensor, token_idx: Tensor,
                sizes: list[int], activation: str) -> Tensor:
        h_saved: list[Tensor] = []
        y_TD = _routed_forward(x_TD, weight_A, w_in, w_out, token_idx, sizes, activation, h_saved)
        ctx.save_for_backward(x_TD, weight_A, w_in, w_out, token_idx, *h_saved)
        ctx.sizes, ctx.activation = sizes, activation
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD: Tensor):
        x_TD, weight_A, w_in, w_out, token_idx, *h_saved = ctx.saved_tensors
        sizes, activation = ctx.sizes, ctx.activation
        need_x, need_w, need_win, need_wout = ctx.needs_input_grad[:4]
        dy_TD = dy_TD.contiguous()
        dx_TD = torch.zeros_like(x_TD) if need_x else None
        dw_A = torch.empty_like(weight_A) if need_w else None
        dw_in, dw_out = (_grad_buffer(w, sizes) if need else None
                         for w, need in ((w_in, need_win), (w_out, need_wout)))
        F_ = w_out.shape[1]
        start = 0
        for (e, n, idx, w), h, rows in zip(_segments(sizes, token_idx, weight_A), h_saved, filter(None, sizes)):
            mm = matmul_fn(dy_TD.device.type, dy_TD.dtype, n)
            dy = F.embedding(idx, dy_TD)  # [n, D]
            dz = mm(dy, w_out[e].t())  # [n, F]
            if activation == "swiglu":
                gate, up = h[:, :F_], h[:, F_:]
                s = F.silu(gate)
                a = s * up
            else:
                a = F.gelu(h)
            if need_w:  # padding rows (see _segments) have w = 0; their dw is not a weight's gradient
                torch.linalg.vecdot(dz[:rows], a[:rows], out=dw_A[start:start + rows])
                start += rows
            if need_wout:
                _matmul_into(dw_out[e], a.mul_(w).t(), dy, mm)  # a becomes z = w·a
            if need_x or need_win:
                da = dz.mul_(w)
                if activation == "swiglu":
                    dh = torch.empty_like(h)
                    torch.mul(da, s, out=dh[:, F_:])
                    torch.ops.aten.silu_backward(da.mul_(up), gate, grad_input=dh[:, :F_])
                else:
                    dh = torch.ops.aten.gelu_backward(da, h)
                if need_x:
                    _add_rows(dx_TD, idx, mm(dh, w_in[e].t()), rows)
                if need_win:
                    _matmul_into(dw_in[e], F.embedding(idx, x_TD).t(), dh, mm)
        return dx_TD, dw_A, dw_in, dw_out, None, None, None


def _segments(sizes: list[int], token_idx: Tensor, weight_A: Tensor):
    """(expert, padded rows n, token indices [n], weights [n, 1]) for every expert with rows.

    Row counts above 16 are padded up to one of 16 steps per octave (≤ 6% extra rows): oneDNN builds a
    kernel per distinct matrix shape and keeps 1024 of them; with unpadded counts a router whose load
    is spread out makes E x 6 shapes per step, every call then rebuilds its kernel (measured ~1 ms each
    in bfloat16, 0.7 ms in float32, against ~0.5 ms for the product itself). A padding row repeats the
    segment's last token with weight 0: it adds exact zeros to y, dx and the weight gradients.
    """
    start = 0
    w_A1 = weight_A[:, None]
    for e, n in enumerate(sizes):
        if n:
            idx, w = token_idx[start:start + n], w_A1[start:start + n]
            pad = _padded_rows(n) - n
            if pad:
                idx = torch.cat((idx, idx[-1:].expand(pad)))
                w = torch.cat((w, w.new_zeros(pad, 1)))
            yield e, n + pad, idx, w
        start += n


def _add_rows(y: Tensor, idx: Tensor, rows: Tensor, n: int) -> None:
    """y[idx[:n]] += rows[:n] for one expert's segment, whose first n tokens are distinct (a token picks
    an expert at most once; an expert picks a token at most once); rows past n are padding.

    Not `index_add_`: it runs a parallel sort-based scatter with many parallel regions, each of which
    waits a scheduler time slice when the CPU is oversubscribed (measured 28 ms for one row and 80 ms
    for 1024 rows on a busy machine, against 0.004 and 0.1 ms idle). A handful of rows go through the
    accumulating `index_put_`; larger segments gather, add and write back (3 parallel regions; 0.14 vs
    0.08 ms for 512 rows when idle).
    """
    if n <= 16:
        y.index_put_((idx[:n],), rows[:n], accumulate=True)
    else:
        idx = idx[:n]
        y.index_copy_(0, idx, y.index_select(0, idx).add_(rows[:n]))


def _padded_rows(n: int) -> int:
    if n <= 16:
        return n
    step = 1 << max(0, n.bit_length() - 5)  # 16 steps per octave
    return -(-n // step) * step


def _grad_buffer(w: Tensor, sizes: list[int]) -> Tensor:
    """An uninitialised gradient for a stacked weight, zeroed for the experts without rows (the rest
    is written by the per-expert products)."""
    grad = torch.empty_like(w)
    unused = [e for e, n in enumerate(sizes) if not n]
    if len(unused) == len(sizes):
        grad.zero_()
    elif unused:
        grad[torch.tensor(unused, device=w.device)] = 0
    return grad


def routed_ffn(x_TD: Tensor, token_idx: Tensor, weight_A: Tensor, counts: Tensor, w_in: Tensor, w_out: Tensor,
               activation: str) -> Tensor:
    """The fused routed path: y [T, D] = Σ over assignments of weight · expert FFN(x[token]).

    token_idx [A], weight_A [A] and counts [E] are in expert order (`moelab.dispatch.permute`), and the
    tokens inside one expert's segment are distinct, as every router produces them (a token picks an
    expert at most once; an expert picks a token at most once). weight_A is cast to x's dtype, as the
    unfused combine does.
    """
    sizes = counts.tolist()  # segment sizes on the host; on the CPU this is a read, not a device sync
    weight_A = weight_A.to(x_TD.dtype)
    if torch.is_grad_enabled() and (x_TD.requires_grad or weight_A.requires_grad or w_in.requires_grad
                                    or w_out.requires_grad):
        return _RoutedFFN.apply(x_TD, weight_A, w_in, w_out, token_idx, sizes, activation)
    return _routed_forward(x_TD, weight_A, w_in, w_out, token_idx, sizes, activation)  # inference


# The fused path pays a fixed Python cost per expert in forward and backward; the loop backend's
# per-expert ops run in autograd's C++ engine. Measured fwd+bwd of one layer, 2048 tokens, 2 threads
# (auto-fused / loop ms): d·f = 128·128, E = 16: 27.9 / 22.9; E = 64, k = 8: 120.9 / 87.6;
# 256·256: 73.3 / 70.4; 512·256: 117.2 / 123.8; 1024·512, E = 8: 325 / 384.
FUSED_MIN_EXPERT_SIZE = 512 * 256


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype an autocast region would run x's matmuls in (x float32 inside one), else None."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def cpu_auto(backend: str, x_TD: Tensor) -> bool:
    """Backend "auto" on the CPU (elsewhere host-side segment sizes would cost a device sync per layer,
    so "auto" keeps grouped_mm there)."""
    return backend == "auto" and x_TD.device.type == "cpu"


def fused_path_usable(backend: str, x_TD: Tensor, expert_size: int) -> bool:
    """Whether the MoE layer takes the fused routed path: `cpu_auto` and experts of d·f =
    `expert_size` ≥ FUSED_MIN_EXPERT_SIZE (smaller ones run faster on the loop backend)."""
    return cpu_auto(backend, x_TD) and expert_size >= FUSED_MIN_EXPERT_SIZE


# Inference (no_grad) batches of few assignments — a decode step of a batch, a short prompt — run faster
# as one grouped_mm over all segments than on the fused path, which pays ~10 small ops per expert.
# Measured, no_grad, cold cache, ms per call (fused / grouped_mm / loop), A = T·k assignments:
# bfloat16 E = 64, k = 8: A = 64 14.8/12.5/13.3, A = 1024 41.3/32.0/35.0, A = 8192 96.1/90.4/89.5,
# A = 32768 395/512/453; E = 8, k = 2, A = 8192 98.0/102.8/98.0; float32 E = 64, k = 8, A = 128
# 33.8/30.2/30.7; E = 8, k = 2, A = 8192 170/226/210. At A = 8192 grouped_mm wins or loses by ~5 %
# depending on E and dtype (float32 large experts: fused by 25 %), so the cut is below that.
INFERENCE_GROUPED_MAX_ROWS = 4096


def compute_path(backend: str, x_TD: Tensor, n_assign: int, w_in: Tensor, w_out: Tensor) -> str:
    """What the MoE layer runs for a batch of `n_assign` assignments (T > 1): "fused" (`routed_ffn`)
    when `fused_path_usable`, except for small inference batches, which take "grouped_mm" where usable;
    otherwise the configured `grouped_ffn` backend."""
    expert_size = w_in.shape[1] * w_out.shape[1]  # d·f
    if not fused_path_usable(backend, x_TD, expert_size):
        return backend
    if (not torch.is_grad_enabled() and n_assign <= INFERENCE_GROUPED_MAX_ROWS
            and grouped_mm_available(x_TD.device.type, x_TD.dtype) and _grouped_mm_shapes_ok(x_TD, w_in, w_out)):
        return "grouped_mm"
    return "fused"


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

    def weights(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(w_in, w_out), cast to `dtype` when given (autocast: differentiable, like nn.Linear's cast)."""
        if dtype is None:
            return self.w_in, self.w_out
        return self.w_in.to(dtype), self.w_out.to(dtype)

    def forward(self, x_AD: Tensor, counts: Tensor, backend: str | None = None,
                dtype: torch.dtype | None = None) -> Tensor:
        """Rows already in expert order → expert outputs [A, D] (unweighted); `backend` overrides the
        configured one."""
        return grouped_ffn(x_AD, counts, *self.weights(dtype), self.activation, backend or self.backend)

    def path(self, x_TD: Tensor, n_assign: int) -> str:
        """`compute_path` for this layer's weights."""
        return compute_path(self.backend, x_TD, n_assign, self.w_in, self.w_out)

    def routed(self, x_TD: Tensor, token_idx: Tensor, weight_A: Tensor, counts: Tensor,
               dtype: torch.dtype | None = None) -> Tensor:
        """Tokens [T, D] and expert-ordered assignments → the weighted, combined output y [T, D]."""
        return routed_ffn(x_TD, token_idx, weight_A, counts, *self.weights(dtype), self.activation)

    def decode(self, x_1D: Tensor, experts: list[int], weights: list[float],
               dtype: torch.dtype | None = None) -> Tensor:
        """One token [1, D] through its chosen experts with their weights (inference) → y [1, D]."""
        w_in, w_out = self.w_in, self.w_out
        if dtype is not None:  # autocast: cast only the chosen experts, now indexed 0..k-1
            w_in, w_out, experts = w_in[experts].to(dtype), w_out[experts].to(dtype), list(range(len(experts)))
        return decode_ffn(x_1D, experts, weights, w_in, w_out, self.activation)
