"""Each grouped compute backend against a per-expert loop, forward and backward."""

from __future__ import annotations

import pytest
import torch

from moelab.experts import _GroupedMM, grouped_ffn, grouped_mm_available, resolve_backend


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
    E, D, F_ = 4, 8, 8
    H = 2 * F_ if activation == "swiglu" else F_
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), D, dtype=dtype, requires_grad=True)
    w_in = torch.randn(E, D, H, dtype=dtype, requires_grad=True)
    w_out = torch.randn(E, F_, D, dtype=dtype, requires_grad=True)
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
    w_in, w_out = torch.zeros(2, 6, 12, dtype=torch.float64), torch.zeros(2, 6, 6, dtype=torch.float64)
    assert resolve_backend("auto", x, w_in, w_out) == "loop"  # float64 has no grouped_mm
    assert resolve_backend("padded", x, w_in, w_out) == "padded"
    with pytest.raises(ValueError, match="backend='grouped_mm'"):
        resolve_backend("grouped_mm", x, w_in, w_out)
