"""Noisy top-k gating (Shazeer et al. 2017): the gate against a hand computation with the noise fixed, the eval
gate against plain top-k softmax with W_g, and the gradients that reach W_noise."""

from __future__ import annotations

import math

import pytest
import torch

from moelab import MoEConfig
from moelab.layer.moe import MoE
from moelab.layer.routing import NOISE_EPS, Router

E, D, K = 5, 3, 2


def noisy_cfg(**kw) -> MoEConfig:
    return MoEConfig(**{"d_model": D, "d_expert": 4, "n_experts": E, "top_k": K, "router": "noisy_topk",
                        "aux_loss_coef": 0.0, "z_loss_coef": 0.0, **kw})


def hand_gate(x: list[float], w_g: list[list[float]], w_n: list[list[float]], eps: list[float], k: int):
    """One token by hand: H_i = x·W_g[i] + eps_i·(softplus(x·W_noise[i]) + NOISE_EPS); the k largest H, softmax."""
    h = []
    for i in range(len(w_g)):
        clean = sum(a * b for a, b in zip(x, w_g[i]))
        std = math.log1p(math.exp(sum(a * b for a, b in zip(x, w_n[i])))) + NOISE_EPS
        h.append(clean + eps[i] * std)
    kept = sorted(range(len(h)), key=lambda i: -h[i])[:k]
    z = sum(math.exp(h[i]) for i in kept)
    return kept, [math.exp(h[i]) / z for i in kept]


def test_training_gate_matches_a_hand_computation(monkeypatch):
    torch.manual_seed(0)
    router = Router(noisy_cfg())
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, D))
        router.noise_weight.copy_(torch.randn(E, D))
    x = torch.randn(4, D)
    eps = torch.randn(4, E)
    monkeypatch.setattr(torch, "randn_like", lambda t: eps.to(t.dtype))
    r = router.train()(x)
    for t in range(4):
        kept, gates = hand_gate(x[t].tolist(), router.weight.tolist(), router.noise_weight.tolist(), eps[t].tolist(), K)
        assert r.topk_idx[t].tolist() == kept
        assert r.topk_weight[t].tolist() == pytest.approx(gates, rel=1e-5)
    assert r.noisy_logits is not None and r.noise_std is not None


def test_eval_and_no_grad_gate_is_plain_topk_softmax_with_w_g():
    """Noise only in training mode with grad: otherwise the layer is "topk_softmax" (renormalised) with W_g."""
    torch.manual_seed(1)
    noisy = MoE(noisy_cfg(route_scale=2.0))
    with torch.no_grad():
        noisy.router.noise_weight.normal_()  # a noise scale that would change the routing if it were drawn
    plain = MoE(noisy_cfg(router="topk_softmax", route_scale=2.0))
    state = {k: v for k, v in noisy.state_dict().items() if k != "router.noise_weight"}
    plain.load_state_dict(state)
    x = torch.randn(2, 16, D)
    r = noisy.router.eval()(x.view(-1, D))
    logits = x.view(-1, D) @ noisy.router.weight.detach().t()
    top, idx = logits.topk(K, dim=-1)
    assert torch.equal(r.topk_idx, idx) and r.noise_std is None
    torch.testing.assert_close(r.topk_weight, 2.0 * torch.softmax(top, -1))
    y_plain, _ = plain(x)
    y_eval, _ = noisy.eval()(x)
    torch.testing.assert_close(y_eval, y_plain)
    with torch.no_grad():
        y_nograd, _ = noisy.train()(x)
    torch.testing.assert_close(y_nograd, y_plain)
    y_train, _ = noisy.train()(x)
    assert not torch.allclose(y_train, y_plain)  # in training the noise changes the routing


def test_gradients_reach_w_noise_through_the_load_loss():
    torch.manual_seed(2)
    moe = MoE(noisy_cfg(load_loss_coef=1.0)).train()
    y, aux = moe(torch.randn(2, 8, D))
    assert set(aux.losses) == {"load"}
    aux.losses["load"].backward()
    grad = moe.router.noise_weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert moe.router.weight.grad.abs().sum() > 0
    # without noise (eval) the load is the counted assignments: a constant, no gradient
    _, aux = moe.eval()(torch.randn(2, 8, D), stats=True)
    assert not aux.losses["load"].requires_grad


def test_noise_weight_starts_at_zero_and_freezes_with_the_router():
    router = Router(noisy_cfg())
    assert torch.equal(router.noise_weight, torch.zeros(E, D)) and router.noise_weight.requires_grad
    frozen = Router(noisy_cfg(freeze_router=True))
    assert not frozen.noise_weight.requires_grad and not frozen.weight.requires_grad
    assert not hasattr(Router(noisy_cfg(router="topk_softmax")), "noise_weight")


@pytest.mark.parametrize("n_experts,top_k,tokens", [(3, 3, 4), (1, 1, 2), (4, 1, 1)])
def test_edge_cases_k_equals_e_one_expert_one_token(n_experts, top_k, tokens):
    """k = E: every expert is always chosen, so P(x, i) = 1 and the load loss is 0; all losses stay finite."""
    torch.manual_seed(5)
    moe = MoE(noisy_cfg(n_experts=n_experts, top_k=top_k, importance_loss_coef=1.0, load_loss_coef=1.0)).train()
    _, aux = moe(torch.randn(tokens, D))
    if top_k == n_experts:
        assert aux.losses["load"].item() == 0.0
    total = aux.total_loss
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(moe.router.noise_weight.grad).all()
