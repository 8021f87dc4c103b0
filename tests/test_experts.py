"""Each grouped compute backend against a per-expert loop, forward and backward."""

from __future__ import annotations

import pytest
import torch

from moelab.experts import (
    FUSED_MIN_EXPERT_SIZE,
    INFERENCE_GROUPED_MAX_ROWS,
    _GroupedMM,
    _padded_rows,
    compute_path,
    decode_ffn,
    fast_linear,
    fused_path_usable,
    grouped_ffn,
    grouped_mm_available,
    matmul_fn,
    resolve_backend,
    routed_ffn,
)


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


def routed_case(counts, activation, dtype, seed=0, T=6, D=16, F_=16):
    """Random expert-ordered assignments: each expert's tokens distinct, as every router produces."""
    g = torch.Generator().manual_seed(seed)
    E = len(counts)
    H = 2 * F_ if activation == "swiglu" else F_
    token_idx = torch.cat([torch.randperm(T, generator=g)[:n] for n in counts]).long()
    x = torch.randn(T, D, generator=g).to(dtype).requires_grad_()
    weight = torch.rand(len(token_idx), generator=g).requires_grad_()
    w_in = (torch.randn(E, D, H, generator=g) * 0.5).to(dtype).requires_grad_()
    w_out = (torch.randn(E, F_, D, generator=g) * 0.5).to(dtype).requires_grad_()
    return x, token_idx, weight, torch.tensor(counts), w_in, w_out


ROUTED_DTYPES = [(torch.float64, {}), (torch.float32, dict(atol=2e-4, rtol=2e-4)),
                 (torch.bfloat16, dict(atol=0.1, rtol=0.05))]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 4, 0], [6, 6, 6, 6], [0, 0, 0, 0], [1]])
@pytest.mark.parametrize("dtype,tol", ROUTED_DTYPES)
def test_routed_ffn_matches_reference(dtype, tol, counts, activation):
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
def test_routed_ffn_pads_row_counts_exactly(dtype, tol):
    """Counts above 16 are padded to a bucket with weight-0 copies of the last token; nothing changes."""
    counts = [33, 0, 70, 1, 17]  # 33 -> 34 and 70 -> 72 rows
    assert [_padded_rows(n) for n in counts] == [34, 0, 72, 1, 17]
    x, token_idx, weight, counts_t, w_in, w_out = routed_case(counts, "swiglu", dtype, T=80, D=16, F_=16)
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
def test_routed_ffn_gradcheck(activation):
    x, token_idx, weight, counts, w_in, w_out = routed_case([2, 0, 3], activation, torch.float64, T=4, D=3, F_=2)
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


MOE_CONFIGS = {
    "mixtral": dict(router="topk_softmax", n_experts=4, top_k=2),
    "capacity": dict(router="topk_softmax", n_experts=4, top_k=2, capacity_factor=0.5),
    "deepseek_v3": dict(router="sigmoid", n_experts=8, top_k=2, n_groups=4, topk_groups=2, route_scale=2.5,
                        expert_bias=True, n_shared=1, seq_aux_loss_coef=1e-3),
    "expert_choice": dict(router="expert_choice", n_experts=4, top_k=2, capacity_factor=1.0),
    "gelu_switch": dict(router="switch", n_experts=4, top_k=1, capacity_factor=1.0, activation="gelu"),
}


def test_auto_takes_the_fused_path_for_large_experts_on_the_cpu_and_the_loop_below():
    x = torch.zeros(3, 8)
    assert fused_path_usable("auto", x, FUSED_MIN_EXPERT_SIZE)
    assert not fused_path_usable("auto", x, FUSED_MIN_EXPERT_SIZE - 1)
    assert not fused_path_usable("loop", x, FUSED_MIN_EXPERT_SIZE)
    assert resolve_backend("auto", x, torch.zeros(2, 8, 16), torch.zeros(2, 8, 8)) == "loop"  # CPU, float32


def _auto_moe_and_reference(name: str, dtype: torch.dtype, seed: int):
    """An MoE with backend "auto" and O(1) weights, and the float64 loop-backend copy of it."""
    from moelab import MoE, MoEConfig

    torch.manual_seed(seed)
    moe = MoE(MoEConfig(d_model=8, d_expert=8, backend="auto", **MOE_CONFIGS[name])).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
    ref = MoE(moe.cfg.replace(backend="loop")).double()
    ref.load_state_dict({k: v.double() for k, v in moe.state_dict().items()})
    return moe, ref


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", MOE_CONFIGS)
def test_moe_auto_takes_the_fused_path_and_matches_the_reference(name, dtype, monkeypatch):
    """The MoE layer with backend "auto" (the fused path on the CPU) against the per-token reference."""
    from moelab import experts
    from reference import moe_reference

    monkeypatch.setattr(experts, "FUSED_MIN_EXPERT_SIZE", 0)  # the fused path at test sizes
    calls = []
    monkeypatch.setattr(experts, "routed_ffn", lambda *a: calls.append(1) or routed_ffn(*a))
    moe, ref = _auto_moe_and_reference(name, dtype, seed=0)
    x = torch.randn(2, 5, 8, dtype=dtype, requires_grad=True)
    x_ref = x.detach().double().requires_grad_()
    y, aux = moe(x)
    y_ref, _ = moe_reference(ref, x_ref)
    tol = {} if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    g = torch.randn_like(y_ref)
    ((y.double() * g).sum() + aux.total_loss).backward()
    _, aux_ref = ref(x_ref)  # the same losses, from the reference-checked loop layer
    ((y_ref * g).sum() + aux_ref.total_loss).backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, **tol)
    for (pname, p), p_ref in zip(moe.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad.double(), p_ref.grad, **tol, msg=pname)
    assert calls == [1]


def test_compute_path_takes_grouped_mm_for_small_inference_batches_only():
    w_in, w_out = torch.zeros(4, 512, 512), torch.zeros(4, 256, 512)  # d·f = FUSED_MIN_EXPERT_SIZE
    x = torch.zeros(3, 512)
    small, large = INFERENCE_GROUPED_MAX_ROWS, INFERENCE_GROUPED_MAX_ROWS + 1
    assert compute_path("auto", x, small, w_in, w_out) == "fused"  # grad enabled: always fused
    with torch.no_grad():
        grouped = "grouped_mm" if grouped_mm_available("cpu", torch.float32) else "fused"
        assert compute_path("auto", x, small, w_in, w_out) == grouped
        assert compute_path("auto", x, large, w_in, w_out) == "fused"
        assert compute_path("auto", x.double(), small, w_in.double(), w_out.double()) == "fused"  # no fp64 kernel
        assert compute_path("loop", x, small, w_in, w_out) == "loop"
        assert compute_path("auto", x, small, w_in[:, :8], w_out[:, :, :8]) == "auto"  # small experts: loop


@pytest.mark.parametrize("grouped_max_rows", [0, None])
@pytest.mark.parametrize("threshold", [0, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", MOE_CONFIGS)
def test_moe_inference_paths_match_the_reference(name, dtype, threshold, grouped_max_rows, monkeypatch):
    """Under no_grad the auto backend skips autograd (T > 1; fused, grouped_mm or loop path) or decodes a
    single token directly (`decode_ffn`, token-choice routers): outputs and statistics equal the
    reference and the grad path."""
    from moelab import experts
    from reference import moe_reference

    if threshold is not None:
        monkeypatch.setattr(experts, "FUSED_MIN_EXPERT_SIZE", threshold)
    if grouped_max_rows is not None:
        monkeypatch.setattr(experts, "INFERENCE_GROUPED_MAX_ROWS", grouped_max_rows)
    moe, ref = _auto_moe_and_reference(name, dtype, seed=1)
    decoded, taken = [], []
    monkeypatch.setattr(experts, "decode_ffn", lambda *a: decoded.append(1) or decode_ffn(*a))
    monkeypatch.setattr(experts, "routed_ffn", lambda *a: taken.append("fused") or routed_ffn(*a))
    for backend, fn in list(experts._BACKENDS.items()):
        monkeypatch.setitem(experts._BACKENDS, backend, lambda *a, b=backend, fn=fn: taken.append(b) or fn(*a))
    grouped = grouped_mm_available("cpu", dtype) and grouped_max_rows is None
    expected = "loop" if threshold is None else "grouped_mm" if grouped else "fused"
    tol = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-5, rtol=1e-5)}.get(
        dtype, dict(atol=3e-2, rtol=3e-2))
    for shape in [(1, 8), (1, 1, 8), (3, 8), (2, 4, 8)]:
        x = torch.randn(*shape, dtype=dtype)
        taken.clear()
        with torch.no_grad():
            y, aux = moe(x)
        single = x.numel() == 8 and name != "expert_choice"  # decoded directly
        assert taken == ([] if single else [expected]), (shape, taken)
        y_ref, _ = moe_reference(ref, x.double())
        if dtype == torch.bfloat16:  # bf16 rounds each stage to ~0.4 % of its magnitude (outputs reach ~20)
            tol = dict(atol=2e-2 * y_ref.detach().abs().max().item(), rtol=3e-2)
        torch.testing.assert_close(y.double(), y_ref, **tol)
        _, aux_grad = moe(x)  # grad enabled: the autograd path
        torch.testing.assert_close(aux.load, aux_grad.load)
        torch.testing.assert_close(aux.dropped_frac, aux_grad.dropped_frac)
    # the two single-token inputs decoded directly, except for expert choice (not causal; no decode step)
    assert len(decoded) == (0 if name == "expert_choice" else 2)


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
