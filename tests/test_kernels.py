"""The kernels (moelab.layer.expert_ops) against per-row loops, forward and backward: every grouped backend, the
grouped_mm autograd, the fused routed FFN, the oneDNN linear, the activation."""

from __future__ import annotations

import pytest
import torch

from moelab.layer import fused
from moelab.layer.expert_ops import (
    _GroupedMM,
    activate,
    activate_backward,
    fast_linear,
    grouped_ffn,
    grouped_mm_available,
    matmul_fn,
)
from moelab.layer.fused import _padded_rows, routed_ffn
from moelab.layer.policy import grouped_backend


def reference(x, counts, w_in, w_out, activation):
    rows, start = [], 0
    for e, n in enumerate(counts.tolist()):
        for r in range(start, start + n):
            h = x[r] @ w_in[e]
            if activation == "swiglu":
                g, u = h.chunk(2)
                a = torch.nn.functional.silu(g) * u
            else:
                a = torch.nn.functional.gelu(h)
            rows.append(a @ w_out[e])
        start += n
    return torch.stack(rows) if rows else x.new_zeros(0, w_out.shape[-1])


def backends():
    out = [("loop", torch.float64), ("padded", torch.float64)]
    if grouped_mm_available("cpu", torch.float32):
        out.append(("grouped_mm", torch.float32))
    return out


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 4, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
@pytest.mark.parametrize("backend,dtype", backends())
def test_backend_matches_loop(backend, dtype, counts, activation):
    torch.manual_seed(0)
    E, D, I = 4, 8, 8
    H = 2 * I if activation == "swiglu" else I
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), D, dtype=dtype, requires_grad=True)
    w_in = torch.randn(E, D, H, dtype=dtype, requires_grad=True)
    w_out = torch.randn(E, I, D, dtype=dtype, requires_grad=True)
    y = grouped_ffn(x, counts, w_in, w_out, activation, backend)
    xs, wis, wos = (t.detach().double().requires_grad_() for t in (x, w_in, w_out))
    y_ref = reference(xs, counts, wis, wos, activation)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(y.double(), y_ref, **tol)
    if y.numel():
        y.sum().backward()  # an expanded (broadcast) incoming gradient, the case grouped_mm trips on
        y_ref.sum().backward()
        torch.testing.assert_close(x.grad.double(), xs.grad, **tol)
        torch.testing.assert_close(w_in.grad.double(), wis.grad, **tol)
        torch.testing.assert_close(w_out.grad.double(), wos.grad, **tol)
        assert torch.all(w_in.grad[counts == 0] == 0)  # unused experts get zero gradient


@pytest.mark.skipif(not grouped_mm_available("cpu", torch.float32), reason="no grouped_mm in this build")
def test_grouped_mm_autograd_function_in_bfloat16():
    torch.manual_seed(0)
    x = torch.randn(10, 16, dtype=torch.bfloat16)
    w = torch.randn(3, 16, 16, dtype=torch.bfloat16)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    y = _GroupedMM.apply(x, w, offs)
    ref = torch.cat([x[:4].float() @ w[0].float(), x[4:].float() @ w[2].float()])
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.02)


def test_backend_resolution():
    x = torch.zeros(2, 6, dtype=torch.float64)
    w = torch.zeros(2, 6, 12, dtype=torch.float64), torch.zeros(2, 6, 6, dtype=torch.float64)
    assert grouped_backend("auto", x, w) == "loop"  # float64 has no grouped_mm
    assert grouped_backend("padded", x, w) == "padded"
    assert grouped_backend("padded", x, None) == "loop"  # a store without stacked weights: one expert at a time
    with pytest.raises(ValueError, match="backend='grouped_mm'"):
        grouped_backend("grouped_mm", x, w)


# --- the fused routed path (gather → expert FFN → weight → scatter-add), used by backend "auto" ---

def routed_reference(x, token_idx, weight, counts, w_in, w_out, activation):
    """y[t] = Σ_a weight_a · FFN_e(x[t]), one assignment at a time (float64)."""
    y = [torch.zeros(x.shape[1], dtype=torch.float64) for _ in range(x.shape[0])]
    a = 0
    for e, n in enumerate(counts.tolist()):
        for _ in range(n):
            t = int(token_idx[a])
            y[t] = y[t] + weight[a] * reference(x[t:t + 1], torch.tensor([1]), w_in[e:e + 1], w_out[e:e + 1],
                                                activation)[0]
            a += 1
    return torch.stack(y)


def routed_case(counts, activation, dtype, seed=0, T=6, D=16, I=16):
    """Random expert-ordered assignments: each expert's tokens distinct, as every router produces."""
    g = torch.Generator().manual_seed(seed)
    E = len(counts)
    H = 2 * I if activation == "swiglu" else I
    token_idx = torch.cat([torch.randperm(T, generator=g)[:n] for n in counts]).long()
    x = torch.randn(T, D, generator=g).to(dtype).requires_grad_()
    weight = torch.rand(len(token_idx), generator=g).requires_grad_()
    w_in = (torch.randn(E, D, H, generator=g) * 0.5).to(dtype).requires_grad_()
    w_out = (torch.randn(E, I, D, generator=g) * 0.5).to(dtype).requires_grad_()
    return x, token_idx, weight, torch.tensor(counts), w_in, w_out


@pytest.fixture(params=["workers", "calling thread"])
def threads(request, monkeypatch):
    """The fused FFN on its single-threaded workers (when torch runs ≥ 2 threads) and in the calling thread."""
    if request.param == "calling thread":
        monkeypatch.setattr(fused, "_workers", lambda n: None)
    return request.param


def test_fused_workers_are_single_threaded_and_leave_the_thread_count_alone():
    import threading

    n = max(2, torch.get_num_threads())
    before = torch.get_num_threads()
    pool = fused._workers(n)
    assert pool is not None  # this torch build gives each thread its own count
    assert set(pool.map(lambda _: torch.get_num_threads(), range(4 * n))) == {1}
    torch.set_num_threads(before)  # (n may differ from the count this process runs)
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert torch.get_num_threads() == before and seen == [before]
    assert fused._workers(1) is None


ROUTED_DTYPES = [(torch.float64, {}), (torch.float32, dict(atol=2e-4, rtol=2e-4)),
                 (torch.bfloat16, dict(atol=0.1, rtol=0.05))]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 4, 0], [6, 6, 6, 6], [0, 0, 0, 0], [1]])
@pytest.mark.parametrize("dtype,tol", ROUTED_DTYPES)
def test_routed_ffn_matches_reference(dtype, tol, counts, activation, threads):
    x, token_idx, weight, counts_t, w_in, w_out = routed_case(counts, activation, dtype)
    y = routed_ffn(x, token_idx, weight, counts_t, w_in, w_out, activation)
    assert y.dtype == dtype and y.shape == x.shape
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, w_in, w_out)]
    y_ref = routed_reference(leaves[0], token_idx, leaves[1], counts_t, leaves[2], leaves[3], activation)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    y.sum().backward()  # an expanded incoming gradient
    if y_ref.requires_grad:
        y_ref.sum().backward()
    for t, ref in zip((x, weight, w_in, w_out), leaves):
        expected = ref.grad if ref.grad is not None else torch.zeros_like(ref)  # no assignment: zero gradient
        torch.testing.assert_close(t.grad.double(), expected, **tol)
    assert t.grad.dtype == t.dtype
    assert torch.all(w_in.grad[counts_t == 0] == 0) and torch.all(w_out.grad[counts_t == 0] == 0)


@pytest.mark.parametrize("dtype,tol", ROUTED_DTYPES[:2])
def test_routed_ffn_pads_row_counts_exactly(dtype, tol, threads):
    """Counts above 16 are padded to a bucket with weight-0 copies of the last token; nothing changes."""
    counts = [33, 0, 70, 1, 17]  # 33 -> 34 and 70 -> 72 rows
    assert [_padded_rows(n) for n in counts] == [34, 0, 72, 1, 17]
    x, token_idx, weight, counts_t, w_in, w_out = routed_case(counts, "swiglu", dtype, T=80, D=16, I=16)
    y = routed_ffn(x, token_idx, weight, counts_t, w_in, w_out, "swiglu")
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, w_in, w_out)]
    y_ref = routed_reference(leaves[0], token_idx, leaves[1], counts_t, leaves[2], leaves[3], "swiglu")
    torch.testing.assert_close(y.double(), y_ref, **tol)
    g = torch.randn_like(y_ref)
    (y.double() * g).sum().backward()
    (y_ref * g).sum().backward()
    for t, ref in zip((x, weight, w_in, w_out), leaves):
        torch.testing.assert_close(t.grad.double(), ref.grad, **tol)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_routed_ffn_gradcheck(activation, threads):
    x, token_idx, weight, counts, w_in, w_out = routed_case([2, 0, 3], activation, torch.float64, T=4, D=3, I=2)
    weight = weight.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, wi, wo: routed_ffn(x, token_idx, w, counts, wi, wo, activation), (x, weight, w_in, w_out))


def test_routed_ffn_without_input_gradients():
    x, token_idx, weight, counts, w_in, w_out = routed_case([2, 3], "swiglu", torch.float32)
    y = routed_ffn(x.detach(), token_idx, weight.detach(), counts, w_in, w_out.detach(), "swiglu")
    y.sum().backward()
    assert w_in.grad is not None and w_out.grad is None and x.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_fn_matches_mm_on_transposed_views(dtype):
    torch.manual_seed(0)
    mm = matmul_fn("cpu", dtype)
    a, b = torch.randn(7, 16, dtype=dtype), torch.randn(16, 24, dtype=dtype)
    ref = a.double() @ b.double()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    for a_, b_ in [(a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t())]:
        torch.testing.assert_close(mm(a_, b_).double(), ref, **tol)
    torch.testing.assert_close(mm(a[:0], b), a.new_zeros(0, 24))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_activation_and_its_backward_match_autograd(activation):
    torch.manual_seed(0)
    h = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    a = activate(h, activation)
    if activation == "swiglu":
        gate, up = h[:, :6], h[:, 6:]
        expected = torch.nn.functional.silu(gate) * up
    else:
        expected = torch.nn.functional.gelu(h)
    torch.testing.assert_close(a, expected)
    da = torch.randn_like(a)
    (dh_ref,) = torch.autograd.grad(expected, h, da)
    with torch.no_grad():
        torch.testing.assert_close(activate(h.detach(), activation), expected.detach())  # the in-place variant
        torch.testing.assert_close(activate_backward(h.detach(), da.clone(), activation), dh_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_linear_matches_linear_forward_and_backward(dtype):
    torch.manual_seed(0)
    x = torch.randn(9, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(24, 16, dtype=dtype, requires_grad=True)
    xr, wr = (t.detach().double().requires_grad_() for t in (x, w))
    y, y_ref = fast_linear(x, w), torch.nn.functional.linear(xr, wr)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), wr.grad, atol=1e-5, rtol=1e-5)
