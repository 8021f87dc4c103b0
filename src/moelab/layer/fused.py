"""The fused routed FFN: y [T, D] = Σ over assignments of weight · expert FFN(x[token]), computed one
expert segment at a time — gather the segment's tokens, run the expert, scatter-add — with a
hand-written backward, on single-threaded workers that each take a share of the experts.

Nothing A × D wide is materialised: every temporary is one expert's size, so it comes back from the
allocator's free lists instead of costing fresh pages. The per-expert ops are small; run as parallel
regions of torch's intra-op threads, each waits for all of its threads, and on a busy CPU one of them
is often descheduled. So the experts are split into groups of about equal rows, one per worker
thread; a worker runs its ops on one thread from start to finish, into its own y (and dx), and
the workers meet once per call (docs/BENCHMARKS.md, "Oversubscription"). Where a torch build cannot
give a thread its own thread count, or torch runs one thread, the segments run in the calling thread.

Legend: T = tokens, D = model width, H = first projection's width, I = expert hidden width, E = experts,
A = assignments in expert order, n = rows of one expert's segment (padded).
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.layer.expert_ops import _mm_onednn, activate, activate_backward, matmul_fn

# Below this many rows the weight-gradient product xᵀ·dy (inner dimension = rows) is faster with
# `torch.mm(out=)` than with oneDNN plus a copy into the stacked gradient (docs/BENCHMARKS.md).
_ONEDNN_WGRAD_MIN_ROWS = 256


class Segment(NamedTuple):
    """One expert's rows: its index i among the segments, expert e, padded row count n, token indices
    [n], weights [n, 1], the number of real (unpadded) rows, and where they start in the assignments."""

    i: int
    e: int
    n: int
    idx: Tensor
    w: Tensor
    rows: int
    start: int


def _padded_rows(n: int) -> int:
    """n rounded up to one of 16 steps per octave above 16 rows (≤ 6 % extra)."""
    if n <= 16:
        return n
    step = 1 << max(0, n.bit_length() - 5)
    return -(-n // step) * step


def _segments(sizes: list[int], token_idx: Tensor, weight_A: Tensor) -> list[Segment]:
    """A `Segment` for every expert with rows.

    Row counts are padded (`_padded_rows`): oneDNN builds a kernel per distinct matrix shape and keeps
    1024 of them, and a spread-out load would otherwise make new shapes on every call. A padding row
    repeats the segment's last token with weight 0: it adds exact zeros to y, dx and the weight gradients.
    """
    out, start = [], 0
    w_A1 = weight_A[:, None]
    for e, rows in enumerate(sizes):
        if rows:
            idx, w = token_idx[start:start + rows], w_A1[start:start + rows]
            pad = _padded_rows(rows) - rows
            if pad:
                idx = torch.cat((idx, idx[-1:].expand(pad)))
                w = torch.cat((w, w.new_zeros(pad, 1)))
            out.append(Segment(len(out), e, rows + pad, idx, w, rows, start))
        start += rows
    return out


def _add_rows(y: Tensor, idx: Tensor, rows: Tensor, n: int) -> None:
    """y[idx[:n]] += rows[:n] for one expert's segment, whose first n tokens are distinct (a token picks
    an expert at most once; an expert picks a token at most once); rows past n are padding.

    Not `index_add_`, whose parallel sort-based scatter is slow for this: a handful of rows go through the
    accumulating `index_put_`, larger segments gather, add and write back.
    """
    if n <= 16:
        y.index_put_((idx[:n],), rows[:n], accumulate=True)
    else:
        idx = idx[:n]
        y.index_copy_(0, idx, y.index_select(0, idx).add_(rows[:n]))


def _matmul_into(out: Tensor, a: Tensor, b: Tensor, mm) -> None:
    """out = a @ b, written into `out` (a slice of a stacked weight gradient)."""
    if mm is _mm_onednn and a.shape[1] >= _ONEDNN_WGRAD_MIN_ROWS:
        out.copy_(mm(a, b))  # oneDNN has no out= variant
    else:
        torch.mm(a, b, out=out)


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


# ----------------------------------------------------------------------------------- the workers

@functools.cache
def _workers(n: int) -> ThreadPoolExecutor | None:
    """n threads whose torch ops run on one thread each, or None where that cannot be arranged: n < 2, or
    a torch build whose thread count is not per thread (checked: each worker must report 1 and the
    calling thread n afterwards)."""
    if n < 2:
        return None

    def single_threaded() -> None:
        torch.get_num_threads()  # first settle this thread's count from the process-wide one ...
        torch.set_num_threads(1)  # ... then set it (this also changes the process-wide default)

    pool = ThreadPoolExecutor(n, thread_name_prefix="moelab-experts", initializer=single_threaded)
    all_started = threading.Barrier(n)
    seen = list(pool.map(lambda _: (all_started.wait(), torch.get_num_threads())[1], range(n)))
    torch.set_num_threads(n)  # the process-wide default back, for threads started later
    if seen != [1] * n or torch.get_num_threads() != n:
        pool.shutdown()
        return None
    return pool


def _parts(segments: list[Segment], n: int) -> list[list[Segment]]:
    """At most n groups of segments with about equal rows each: the largest segment first, each to the
    group with the fewest rows so far."""
    parts: list[list[Segment]] = [[] for _ in range(n)]
    rows = [0] * n
    for s in sorted(segments, key=lambda s: -s.n):
        j = rows.index(min(rows))
        parts[j].append(s)
        rows[j] += s.n
    return [p for p in parts if p]


def _run(fn, calls: list[tuple]) -> None:
    """fn(*args) for each args in `calls`: on the workers, each under no_grad (a thread's grad mode is its
    own), when there is more than one; else in the calling thread."""
    pool = _workers(torch.get_num_threads()) if len(calls) > 1 else None
    if pool is None:
        for args in calls:
            fn(*args)
        return

    def no_grad_fn(*args):
        with torch.no_grad():
            fn(*args)

    for future in [pool.submit(no_grad_fn, *args) for args in calls]:
        future.result()


def _split(segments: list[Segment]) -> list[list[Segment]]:
    """The segments in groups, one per worker (one group when there are no workers)."""
    n = torch.get_num_threads()
    return _parts(segments, n if _workers(n) is not None else 1)


def _sum_into_first(parts: list[Tensor]) -> Tensor:
    for other in parts[1:]:
        parts[0].add_(other)
    return parts[0]


# --------------------------------------------------------------------------------- forward, backward

def _forward_part(part: list[Segment], x_TD: Tensor, w_in: Tensor, w_out: Tensor, activation: str,
                  y_TD: Tensor, h_saved: list[Tensor | None] | None) -> None:
    for s in part:
        mm = matmul_fn(x_TD.device.type, x_TD.dtype, s.n)
        h = mm(F.embedding(s.idx, x_TD), w_in[s.e])  # [n, H]; embedding = the fastest row gather here
        _add_rows(y_TD, s.idx, mm(activate(h, activation).mul_(s.w), w_out[s.e]), s.rows)
        if h_saved is not None:
            h_saved[s.i] = h


def _routed_forward(x_TD: Tensor, weight_A: Tensor, w_in: Tensor, w_out: Tensor, token_idx: Tensor,
                    sizes: list[int], activation: str, keep_h: bool) -> tuple[Tensor, list[Tensor]]:
    """y [T, D] and, with `keep_h`, every segment's pre-activation h in segment order (for the backward)."""
    segments = _segments(sizes, token_idx, weight_A)
    parts = _split(segments)
    ys = [x_TD.new_zeros(x_TD.shape) for _ in parts] or [x_TD.new_zeros(x_TD.shape)]
    h_saved = [None] * len(segments) if keep_h else None
    _run(_forward_part, [(p, x_TD, w_in, w_out, activation, y, h_saved) for p, y in zip(parts, ys)])
    return _sum_into_first(ys), h_saved or []


def _backward_part(part: list[Segment], h_saved: list[Tensor], x_TD: Tensor, dy_TD: Tensor, w_in: Tensor,
                   w_out: Tensor, activation: str, dx_TD: Tensor | None, dw_A: Tensor | None,
                   dw_in: Tensor | None, dw_out: Tensor | None) -> None:
    for s in part:
        h = h_saved[s.i]
        mm = matmul_fn(dy_TD.device.type, dy_TD.dtype, s.n)
        dy = F.embedding(s.idx, dy_TD)  # [n, D]
        dz = mm(dy, w_out[s.e].t())  # [n, I]
        a = activate(h, activation)
        if dw_A is not None:  # padding rows (see _segments) have w = 0; their dw is not a weight's gradient
            torch.linalg.vecdot(dz[:s.rows], a[:s.rows], out=dw_A[s.start:s.start + s.rows])
        if dw_out is not None:
            _matmul_into(dw_out[s.e], a.mul_(s.w).t(), dy, mm)  # a becomes z = w·a
        if dx_TD is not None or dw_in is not None:
            dh = activate_backward(h, dz.mul_(s.w), activation)  # da = w·dz
            if dx_TD is not None:
                _add_rows(dx_TD, s.idx, mm(dh, w_in[s.e].t()), s.rows)
            if dw_in is not None:
                _matmul_into(dw_in[s.e], F.embedding(s.idx, x_TD).t(), dh, mm)


class _RoutedFFN(torch.autograd.Function):
    """y[t] = Σ_{a : token(a) = t} w_a · FFN_{e(a)}(x[t]) over assignments sorted by expert.

    Expert e owns rows [start_e, start_e + sizes[e]) of `token_idx`/`weight_A`. For each non-empty
    expert: gather its tokens, h = x·W_in, a = act(h), z = w·a (the routing weight folded into the
    activation — the same product as weighting the output, on a narrower tensor), y += z·W_out
    (see `_add_rows`).

    Backward, per expert, with dy_e = dy[tokens] and a recomputed from the saved h:
        dz = dy_e·W_outᵀ, dW_out = zᵀ·dy_e, dw = Σ_i dz ⊙ a, da = w·dz, dh = act'(h)·da,
        dx[tokens] += dh·W_inᵀ, dW_in = x_eᵀ·dh.
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, weight_A: Tensor, w_in: Tensor, w_out: Tensor, token_idx: Tensor,
                sizes: list[int], activation: str) -> Tensor:
        y_TD, h_saved = _routed_forward(x_TD, weight_A, w_in, w_out, token_idx, sizes, activation, keep_h=True)
        ctx.save_for_backward(x_TD, weight_A, w_in, w_out, token_idx, *h_saved)
        ctx.sizes, ctx.activation = sizes, activation
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD: Tensor):
        x_TD, weight_A, w_in, w_out, token_idx, *h_saved = ctx.saved_tensors
        sizes = ctx.sizes
        need_x, need_w, need_win, need_wout = ctx.needs_input_grad[:4]
        dy_TD = dy_TD.contiguous()
        dw_A = torch.empty_like(weight_A) if need_w else None
        dw_in, dw_out = (_grad_buffer(w, sizes) if need else None
                         for w, need in ((w_in, need_win), (w_out, need_wout)))
        parts = _split(_segments(sizes, token_idx, weight_A))
        dxs = [torch.zeros_like(x_TD) if need_x else None for _ in parts] or [torch.zeros_like(x_TD)]
        _run(_backward_part, [(part, h_saved, x_TD, dy_TD, w_in, w_out, ctx.activation, dx, dw_A, dw_in, dw_out)
                              for part, dx in zip(parts, dxs)])
        return _sum_into_first(dxs) if need_x else None, dw_A, dw_in, dw_out, None, None, None


def routed_ffn(x_TD: Tensor, token_idx: Tensor, weight_A: Tensor, counts: Tensor, w_in: Tensor, w_out: Tensor,
               activation: str) -> Tensor:
    """The fused routed FFN: y [T, D] = Σ over assignments of weight · expert FFN(x[token]).

    token_idx [A], weight_A [A] and counts [E] are in expert order (`moelab.layer.dispatch.permute`), and the
    tokens inside one expert's segment are distinct, as every router produces them. weight_A is cast to
    x's dtype, as the unfused combine does.
    """
    sizes = counts.tolist()  # segment sizes on the host; on the CPU this is a read, not a device sync
    weight_A = weight_A.to(x_TD.dtype)
    if torch.is_grad_enabled() and (x_TD.requires_grad or weight_A.requires_grad or w_in.requires_grad
                                    or w_out.requires_grad):
        return _RoutedFFN.apply(x_TD, weight_A, w_in, w_out, token_idx, sizes, activation)
    return _routed_forward(x_TD, weight_A, w_in, w_out, token_idx, sizes, activation, keep_h=False)[0]
