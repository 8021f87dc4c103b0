"""The path policy (moelab.layer.policy) and the paths (moelab.layer.paths): which path runs, and each path's MoE layer
against the per-token float64 reference (tests/reference.py), forward and backward."""

from __future__ import annotations

import pytest
import torch

from moelab import MoEConfig
from moelab.layer import expert_ops as kernels
from moelab.layer import paths, policy
from moelab.layer.expert_ops import grouped_mm_available
from moelab.layer.experts import Experts, ExpertStore, weighted_sum
from moelab.layer.fused import routed_ffn
from moelab.layer.moe import MoE
from moelab.layer.policy import DECODE, FUSED, GROUPED, INFERENCE_GROUPED_MAX_ROWS, choose_path
from reference import moe_reference

MOE_CONFIGS = {
    "mixtral": dict(router="topk_softmax", n_experts=4, top_k=2),
    "capacity": dict(router="topk_softmax", n_experts=4, top_k=2, capacity_factor=0.5),
    "deepseek_v3": dict(router="sigmoid", n_experts=8, top_k=2, n_groups=4, topk_groups=2, route_scale=2.5,
                        expert_bias=True, n_shared=1, seq_aux_loss_coef=1e-3),
    "expert_choice": dict(router="expert_choice", n_experts=4, top_k=2, capacity_factor=1.0),
    "gelu_switch": dict(router="switch", n_experts=4, top_k=1, capacity_factor=1.0, activation="gelu"),
}


def layer(d_model: int, d_expert: int, backend: str = "auto", **over) -> MoE:
    return MoE(MoEConfig(d_model=d_model, d_expert=d_expert, n_experts=4, top_k=2, backend=backend, **over))


def path_for(moe: MoE, T: int, dtype=torch.float32):
    x = torch.zeros(T, moe.cfg.d_model, dtype=dtype)
    return choose_path(moe, x, moe.router(x))


def test_auto_takes_the_fused_path_for_large_experts_on_the_cpu_and_the_loop_below():
    assert path_for(layer(512, 256), 3) is FUSED  # d·f = FUSED_MIN_EXPERT_SIZE
    assert path_for(layer(512, 255), 3) is GROUPED["loop"]
    assert path_for(layer(512, 256, backend="loop"), 3) is GROUPED["loop"]
    assert path_for(layer(8, 8), 3) is GROUPED["loop"]  # CPU, float32, small experts


def _auto_moe_and_reference(name: str, dtype: torch.dtype, seed: int):
    """An MoE with backend "auto" and O(1) weights, and the float64 loop-backend copy of it."""
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
    monkeypatch.setattr(policy, "FUSED_MIN_EXPERT_SIZE", 0)  # the fused path at test sizes
    calls = []
    monkeypatch.setattr(paths, "routed_ffn", lambda *a: calls.append(1) or routed_ffn(*a))
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


def test_policy_takes_grouped_mm_for_small_inference_batches_only():
    moe = layer(512, 256)  # d·f = FUSED_MIN_EXPERT_SIZE; top_k = 2 assignments per token
    small, large = INFERENCE_GROUPED_MAX_ROWS // 2, INFERENCE_GROUPED_MAX_ROWS // 2 + 1
    assert path_for(moe, small) is FUSED  # grad enabled: always fused
    with torch.no_grad():
        grouped = GROUPED["grouped_mm"] if grouped_mm_available("cpu", torch.float32) else FUSED
        assert path_for(moe, small) is grouped
        assert path_for(moe, large) is FUSED
        assert path_for(moe.double(), small, torch.float64) is FUSED  # no float64 grouped_mm kernel
        assert path_for(layer(512, 256, backend="loop"), small) is GROUPED["loop"]
        assert path_for(layer(8, 8), small) is GROUPED["loop"]  # small experts: loop
        assert path_for(moe.float(), 1) is DECODE
        assert path_for(layer(512, 256, backend="loop"), 1) is GROUPED["loop"]  # an explicit backend runs as configured


class PerExpertStore(ExpertStore):
    """A store without stacked weights (as quantized or offloaded experts are): only `ffn`."""

    def __init__(self, experts: Experts) -> None:
        super().__init__()
        self.inner, self.n_experts, self.activation = experts, experts.n_experts, experts.activation
        self.calls = 0

    def ffn(self, x_nD, e, dtype=None):
        self.calls += 1
        return self.inner.ffn(x_nD, e, dtype)


@pytest.mark.parametrize("name", ["mixtral", "capacity", "deepseek_v3", "gelu_switch"])
def test_a_store_without_stacked_weights_runs_on_the_per_expert_paths(name):
    """The seam for other stores: one that implements only `ffn` runs the grouped loop and the decode
    path through it, and matches the reference."""
    moe, ref = _auto_moe_and_reference(name, torch.float64, seed=2)
    moe.experts = PerExpertStore(moe.experts)
    for shape, grad in [((2, 5, 8), True), ((3, 8), False), ((1, 8), False)]:
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.set_grad_enabled(grad):
            assert choose_path(moe, x.view(-1, 8), moe.router(x.view(-1, 8))) is (
                DECODE if shape == (1, 8) else GROUPED["loop"])
            y, _ = moe(x)
        torch.testing.assert_close(y, moe_reference(ref, x)[0], atol=1e-12, rtol=1e-12)
    assert moe.experts.calls > 0


@pytest.mark.parametrize("grouped_max_rows", [0, None])
@pytest.mark.parametrize("threshold", [0, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", MOE_CONFIGS)
def test_moe_inference_paths_match_the_reference(name, dtype, threshold, grouped_max_rows, monkeypatch):
    """Under no_grad the auto backend skips autograd (T > 1; fused, grouped_mm or loop path) or decodes a
    single token directly (`weighted_sum` of its k experts, token-choice routers): outputs and statistics equal the
    reference and the grad path."""
    from moelab.layer import experts

    if threshold is not None:
        monkeypatch.setattr(policy, "FUSED_MIN_EXPERT_SIZE", threshold)
    if grouped_max_rows is not None:
        monkeypatch.setattr(policy, "INFERENCE_GROUPED_MAX_ROWS", grouped_max_rows)
    moe, ref = _auto_moe_and_reference(name, dtype, seed=1)
    decoded, taken = [], []
    monkeypatch.setattr(experts, "weighted_sum", lambda *a: decoded.append(1) or weighted_sum(*a))
    monkeypatch.setattr(paths, "routed_ffn", lambda *a: taken.append("fused") or routed_ffn(*a))
    for backend, fn in list(kernels.GROUPED_BACKENDS.items()):
        monkeypatch.setitem(kernels.GROUPED_BACKENDS, backend, lambda *a, b=backend, fn=fn: taken.append(b) or fn(*a))
    grouped = grouped_mm_available("cpu", dtype) and grouped_max_rows is None
    expected = "loop" if threshold is None else "grouped_mm" if grouped else "fused"
    tol = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-5, rtol=1e-5)}.get(
        dtype, dict(atol=3e-2, rtol=3e-2))
    for shape in [(1, 8), (1, 1, 8), (3, 8), (2, 4, 8)]:
        x = torch.randn(*shape, dtype=dtype)
        taken.clear()
        with torch.no_grad():
            y, aux = moe(x, stats=True)
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


