"""The MoE layer against the per-token float64 reference in tests/reference.py, forward and backward."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moelab import MoEConfig
from moelab.layer.expert_ops import grouped_mm_available
from moelab.layer.moe import MoE, MoEAux
from reference import moe_reference

D, I = 8, 8  # tiny widths, 16-byte aligned so grouped_mm can run in float32

CONFIGS = {
    "mixtral": dict(router="topk_softmax", n_experts=4, top_k=2),
    "olmoe_unnormalised": dict(router="topk_softmax", n_experts=4, top_k=2, norm_topk_prob=False),
    "switch_capacity": dict(router="switch", n_experts=4, top_k=1, capacity_factor=1.0),
    "topk_capacity": dict(router="topk_softmax", n_experts=4, top_k=2, capacity_factor=0.5),
    "deepseek_v3": dict(router="sigmoid", n_experts=8, top_k=2, n_groups=4, topk_groups=2, route_scale=2.5,
                        expert_bias=True, n_shared=1, seq_aux_loss_coef=1e-3),
    "softmax_groups": dict(router="topk_softmax", n_experts=8, top_k=3, n_groups=4, topk_groups=2),
    "softmax_bias": dict(router="topk_softmax", n_experts=8, top_k=2, expert_bias=True, n_groups=4, topk_groups=2),
    "expert_choice": dict(router="expert_choice", n_experts=4, top_k=2, capacity_factor=1.0),
    "qwen2_shared_gate": dict(router="topk_softmax", n_experts=4, top_k=2, n_shared=2, shared_gate=True,
                              norm_topk_prob=False),
    "gelu": dict(router="topk_softmax", n_experts=4, top_k=2, activation="gelu"),
}
BACKENDS = ["loop", "padded", "grouped_mm"]


def make(name: str, backend: str, dtype=torch.float64, seed: int = 0, bias_std: float = 0.1, **over) -> MoE:
    torch.manual_seed(seed)
    kw = dict(d_model=D, d_expert=I, backend=backend) | CONFIGS[name] | over
    moe = MoE(MoEConfig(**kw)).to(dtype)
    with torch.no_grad():  # larger weights than the LM init so that outputs and gradients are O(1)
        for p in moe.parameters():
            p.normal_(0, 0.5)
        moe.router.bias.normal_(0, bias_std)
    return moe


def dtype_for(backend: str) -> torch.dtype:
    if backend == "grouped_mm":
        if not grouped_mm_available("cpu", torch.float32):
            pytest.skip("this torch build has no grouped_mm on the CPU")
        return torch.float32
    return torch.float64


def tol(dtype):
    return dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_forward_and_backward_match_reference(name, backend):
    dtype = dtype_for(backend)
    moe = make(name, backend, dtype)
    x = torch.randn(2, 5, D, dtype=dtype, requires_grad=True)
    y, aux = moe(x)
    assert y.shape == x.shape and y.dtype == dtype

    ref_moe = make(name, "loop", torch.float64)
    ref_moe.load_state_dict({k: v.double() for k, v in moe.state_dict().items()})
    x_ref = x.detach().double().requires_grad_()
    y_ref, assignments = moe_reference(ref_moe, x_ref)
    torch.testing.assert_close(y.double(), y_ref, **tol(dtype))

    g = torch.randn_like(y_ref)
    (y.double() * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, **tol(dtype))
    for (pname, p), p_ref in zip(moe.named_parameters(), ref_moe.parameters()):
        torch.testing.assert_close(p.grad.double(), p_ref.grad, **tol(dtype), msg=pname)

    # statistics: load counts every routed choice, dropped fraction matches the reference's drops
    if moe.cfg.router != "expert_choice":
        T, k = 10, moe.cfg.top_k
        assert aux.load.sum().item() == T * k
        assert aux.dropped_frac.item() == pytest.approx(1 - len(assignments) / (T * k))


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "switch_capacity", "expert_choice",
                                  "qwen2_shared_gate", "gelu"])
@pytest.mark.parametrize("backend", ["loop", "padded"])
def test_gradcheck(name, backend):
    moe = make(name, backend, torch.float64)
    names = [n for n, _ in moe.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in moe.parameters())
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        y, aux = torch.func.functional_call(moe, dict(zip(names, ps)), (x,))
        return y, aux.total_loss

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    seq=st.integers(1, 6),
    n_experts=st.integers(1, 6),
    data=st.data(),
)
def test_property_shapes_and_edge_cases(lead, seq, n_experts, data):
    """T = 1, E = 1, k = E, experts with no tokens, heavy dropping, any batch/sequence shape."""
    top_k = data.draw(st.integers(1, n_experts), label="top_k")
    router = data.draw(st.sampled_from(["topk_softmax", "switch", "sigmoid", "expert_choice"]), label="router")
    backend = data.draw(st.sampled_from(["loop", "padded"]), label="backend")
    cf = data.draw(st.sampled_from([None, 0.01, 0.5, 1.0, 2.0]), label="capacity_factor")
    if router == "switch":
        top_k = 1
    if router == "expert_choice" and cf is None:
        cf = 1.0
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    moe = MoE(MoEConfig(d_model=D, d_expert=I, n_experts=n_experts, top_k=top_k, router=router,
                        capacity_factor=cf, backend=backend, n_shared=data.draw(st.integers(0, 1)))).double()
    x = torch.randn(*lead, seq, D, dtype=torch.float64)
    y, aux = moe(x)
    y_ref, assignments = moe_reference(moe, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    assert aux.load.shape == (n_experts,)


def test_every_assignment_dropped_gives_zero_routed_output():
    """With the smallest capacity most tokens are dropped; a dropped token's routed output is zero."""
    moe = make("switch_capacity", "loop", capacity_factor=1e-6)
    x = torch.randn(40, D, dtype=torch.float64)
    y, aux = moe(x)
    _, assignments = moe_reference(moe, x)
    kept_tokens = {t for t, _, _ in assignments}
    assert len(kept_tokens) <= moe.cfg.n_experts  # capacity 1 per expert
    for t in range(40):
        if t not in kept_tokens:
            assert torch.all(y[t] == 0)
    assert aux.dropped_frac.item() == pytest.approx(1 - len(assignments) / 40)


def test_wrong_input_width_is_a_clear_error():
    moe = make("mixtral", "loop")
    with pytest.raises(ValueError, match="d_model=8"):
        moe(torch.randn(3, D + 1, dtype=torch.float64))


def test_router_math_is_float32_for_bfloat16_input():
    moe = make("mixtral", "loop", torch.bfloat16)
    routing = moe.router(torch.randn(5, D, dtype=torch.bfloat16))
    assert routing.logits.dtype == torch.float32 and routing.topk_weight.dtype == torch.float32
    y, _ = moe(torch.randn(5, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_routing_values_read_first_under_no_grad_keep_their_graph(name):
    """The flat assignment lists are built from the [T, K] choices on each call; a first call inside
    no_grad (as a statistic might make) must not strip the gradient a later loss needs."""
    moe = make(name, "loop")
    x = torch.randn(6, D, dtype=torch.float64)
    grads = []
    for read_first_without_grad in (False, True):
        moe.router.weight.grad = None
        routing = moe.router(x)
        if read_first_without_grad:
            with torch.no_grad():
                routing.probs.sum(), routing.assignments()[2].sum()
        ((routing.probs ** 2).sum() + routing.assignments()[2].sum()).backward()
        grads.append(moe.router.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_softmax_expert_bias_selects_on_logits_and_weights_from_unbiased_probabilities(norm_topk_prob):
    """A bias comparable to the logits changes which experts are chosen (checked), and the layer still
    equals the reference: selection on logits + bias, weights from the unbiased softmax."""
    top_k = 2
    moe = make("mixtral", "loop", expert_bias=True, norm_topk_prob=norm_topk_prob, bias_std=1.5, seed=3)
    x = torch.randn(12, D, dtype=torch.float64, requires_grad=True)
    unbiased = moe.router.weight.detach().matmul(x.detach().t()).t().topk(top_k, dim=-1).indices
    assert not torch.equal(moe.router(x).topk_idx, unbiased)  # the bias moved some choices
    y, _ = moe(x)
    x_ref = x.detach().requires_grad_()
    y_ref, _ = moe_reference(moe, x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-10)


def test_input_dtype_other_than_the_layers_is_a_clear_error():
    moe = make("mixtral", "auto", torch.float32)
    for dtype in (torch.float64, torch.bfloat16):
        with pytest.raises(ValueError, match=rf"MoE input dtype {dtype} differs from the layer's dtype torch.float32"):
            moe(torch.randn(3, D, dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # inside autocast a float32 layer takes any input
        assert moe(torch.randn(3, D, dtype=torch.bfloat16))[0].dtype == torch.bfloat16


@pytest.mark.parametrize("stats", [None, True])
def test_zero_tokens_give_an_empty_output(stats):
    moe = make("deepseek_v3", "auto")
    x = torch.randn(2, 0, D, dtype=torch.float64, requires_grad=True)
    y, aux = moe(x, stats=stats)
    assert y.shape == x.shape and aux.n_tokens == 0 and aux.losses == {}
    assert aux.load.shape == (8,) and aux.load.sum() == 0 and aux.dropped_frac == 0 and aux.router_entropy == 0


def test_freeze_router_and_losses_off():
    moe = make("mixtral", "loop", freeze_router=True, aux_loss_coef=0.0, z_loss_coef=0.0)
    assert not moe.router.weight.requires_grad
    y, aux = moe(torch.randn(4, D, dtype=torch.float64))
    assert aux.losses == {} and aux.total_loss == 0.0
    y.sum().backward()
    assert moe.router.weight.grad is None and moe.experts.w_in.grad is not None


def test_losses_are_returned_separately_and_weighted():
    weighted = make("deepseek_v3", "loop", aux_loss_coef=0.5, z_loss_coef=0.25, seq_aux_loss_coef=2.0)
    unit = make("deepseek_v3", "loop", aux_loss_coef=1.0, z_loss_coef=1.0, seq_aux_loss_coef=1.0)
    unit.load_state_dict(weighted.state_dict())
    x = torch.randn(2, 6, D, dtype=torch.float64)
    _, a = weighted(x)
    _, b = unit(x)
    assert isinstance(a, MoEAux) and set(a.losses) == {"load_balance", "seq_aux", "z"}
    for name, coef in {"load_balance": 0.5, "z": 0.25, "seq_aux": 2.0}.items():
        torch.testing.assert_close(a.losses[name], coef * b.losses[name])
    torch.testing.assert_close(a.total_loss, sum(a.losses.values()))


def test_backends_agree_in_float32_on_a_larger_batch():
    ref = make("deepseek_v3", "loop", torch.float32)
    x = torch.randn(64, D)
    y_ref, _ = ref(x)
    for backend in ("padded", "grouped_mm", "auto"):
        if backend == "grouped_mm" and not grouped_mm_available("cpu", torch.float32):
            continue
        other = make("deepseek_v3", backend, torch.float32)
        other.load_state_dict(ref.state_dict())
        torch.testing.assert_close(other(x)[0], y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["deepseek_v3", "switch_capacity", "expert_choice"])
def test_statistics_rule_grad_or_asked(name, monkeypatch):
    """Statistics are computed with grad enabled or when asked (`stats=True`), with the same values under
    no_grad as with grad; an inference forward that does not ask computes none of them."""
    from moelab.layer import balance

    moe = make(name, "loop", z_loss_coef=1e-2, aux_loss_coef=1e-2)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    _, eager = moe(x)  # grad enabled: computed, with the graph
    assert eager.total_loss.requires_grad and eager.load is not None
    calls = []
    real = balance.router_entropy
    monkeypatch.setattr(balance, "router_entropy", lambda p: calls.append(1) or real(p))
    with torch.no_grad():
        y_quiet, quiet = moe(x)
    assert calls == [] and quiet.n_tokens == 10 and quiet.losses == {} and quiet.total_loss == 0.0
    assert quiet.load is None and quiet.dropped_frac is None and quiet.router_entropy is None
    with torch.no_grad():
        y_asked, asked = moe(x, stats=True)
    assert calls == [1] and asked.n_tokens == 10
    torch.testing.assert_close(y_asked, y_quiet)
    for field in ("load", "dropped_frac", "router_entropy"):
        torch.testing.assert_close(getattr(asked, field), getattr(eager, field), atol=1e-12, rtol=1e-12)
    if name == "expert_choice":
        assert asked.topk_idx is None
    else:
        assert asked.topk_idx.shape == (10, moe.cfg.top_k)
    assert set(asked.losses) == set(eager.losses)
    for key, value in eager.losses.items():
        torch.testing.assert_close(asked.losses[key], value.detach(), atol=1e-12, rtol=1e-12)
    assert not asked.total_loss.requires_grad
    _, declined = moe(x, stats=False)  # grad enabled, but not asked: none
    assert declined.load is None and declined.losses == {}
    revived = pickle.loads(pickle.dumps(asked))
    torch.testing.assert_close(revived.load, eager.load)


@pytest.mark.parametrize("path", ["fused", "grouped_mm", "loop", "decode"])
def test_cpu_autocast_runs_the_experts_in_bfloat16_and_matches_float32(path, monkeypatch):
    """Training or evaluating with `TrainConfig(dtype="bfloat16")` wraps float32 layers in CPU autocast:
    every expert path runs in bfloat16 (the router stays float32) and agrees with the float32 layer."""
    from moelab.layer import experts, paths, policy

    if path == "grouped_mm" and not grouped_mm_available("cpu", torch.bfloat16):
        pytest.skip("this torch build has no grouped_mm on the CPU")
    monkeypatch.setattr(policy, "FUSED_MIN_EXPERT_SIZE", 10**9 if path == "loop" else 0)
    monkeypatch.setattr(policy, "INFERENCE_GROUPED_MAX_ROWS", 10**9 if path == "grouped_mm" else 0)
    taken = []
    for module, name in ((paths, "routed_ffn"), (experts, "weighted_sum")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name: taken.append(name) or real(*a))
    moe = make("mixtral", "auto", torch.float32)
    x = torch.randn(1 if path == "decode" else 6, D)
    grad = path in ("fused", "loop")
    with torch.set_grad_enabled(grad):
        y_ref, _ = moe(x)
        if grad:
            y_ref.sum().backward()
            grads_ref = [p.grad.clone() for p in moe.parameters()]
            moe.zero_grad()
        taken.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = moe(x)
    assert y.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert moe.router(x).logits.dtype == torch.float32  # router math stays float32
    assert taken == {"fused": ["routed_ffn"], "decode": ["weighted_sum"]}.get(path, [])
    torch.testing.assert_close(y.float(), y_ref, atol=5e-2, rtol=5e-2)
    if grad:
        y.float().sum().backward()
        for p, g_ref in zip(moe.parameters(), grads_ref):
            assert p.grad.dtype == torch.float32
            torch.testing.assert_close(p.grad, g_ref, atol=1e-1, rtol=5e-2)
