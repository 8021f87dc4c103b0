"""Balance losses against hand computations and loops; the bias update against a skewed stream; the importance and
load losses of noisy top-k gating (Shazeer et al. 2017) by hand and the smooth load against Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch

from moelab import MoEConfig
from moelab.layer import balance
from moelab.layer.balance import expert_counts, router_entropy, seq_aux_loss, switch_loss, update_expert_bias, z_loss
from moelab.layer.moe import MoE
from moelab.layer.routing import NOISE_EPS


@pytest.mark.parametrize("E,k", [(4, 1), (8, 2), (16, 4)])
def test_switch_loss_is_one_when_uniform_and_E_when_collapsed(E, k):
    T = 4 * E
    uniform_probs = torch.full((T, E), 1.0 / E)
    balanced_idx = torch.arange(T * k) % E  # every expert gets the same number of assignments
    assert switch_loss(uniform_probs, expert_counts(balanced_idx, E)).item() == pytest.approx(1.0)
    collapsed_probs = torch.zeros(T, E)
    collapsed_probs[:, 0] = 1.0
    collapsed_idx = torch.zeros(T * k, dtype=torch.long)
    assert switch_loss(collapsed_probs, expert_counts(collapsed_idx, E)).item() == pytest.approx(E)


def test_switch_loss_matches_a_loop():
    torch.manual_seed(0)
    T, E, k = 9, 5, 2
    probs = torch.softmax(torch.randn(T, E), -1)
    idx = torch.randint(0, E, (T * k,))
    f = [sum(1 for i in idx.tolist() if i == e) / (T * k) for e in range(E)]
    P = [sum(probs[t, e].item() for t in range(T)) / T for e in range(E)]
    expected = E * sum(fe * pe for fe, pe in zip(f, P))
    assert switch_loss(probs, expert_counts(idx, E)).item() == pytest.approx(expected, rel=1e-6)


def test_seq_aux_loss_matches_a_loop_and_is_one_when_uniform():
    torch.manual_seed(1)
    B, S, E, k = 3, 4, 6, 2
    probs = torch.softmax(torch.randn(B * S, E), -1)
    topk = torch.stack([torch.randperm(E)[:k] for _ in range(B * S)])
    total = 0.0
    for b in range(B):
        rows = range(b * S, (b + 1) * S)
        for e in range(E):
            f = E / (k * S) * sum(1 for t in rows if e in topk[t].tolist())
            P = sum(probs[t, e].item() for t in rows) / S
            total += f * P
    assert seq_aux_loss(probs, topk, S).item() == pytest.approx(total / B, rel=1e-6)
    uniform = torch.full((E, E), 1.0 / E)
    cyc = torch.stack([torch.tensor([t % E, (t + 1) % E]) for t in range(E)])
    assert seq_aux_loss(uniform, cyc, E).item() == pytest.approx(1.0)


def test_z_loss_and_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    assert router_entropy(torch.full((3, 8), 1 / 8)).item() == pytest.approx(math.log(8), rel=1e-6)


def test_bias_update_formula():
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([10.0, 2.0, 4.0, 4.0]), rate=0.1)  # mean = 5
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


def imbalance(load: torch.Tensor) -> float:
    return (load.max() / load.mean()).item()


@pytest.mark.parametrize("router,rate", [("sigmoid", 0.01), ("topk_softmax", 0.05)])  # softmax: logit units
def test_bias_update_moves_a_skewed_stream_toward_uniform(router, rate):
    """Router weights favour expert 0 heavily; bias updates alone (no gradient) must even the load."""
    torch.manual_seed(0)
    E = 8
    cfg = MoEConfig(d_model=16, d_expert=8, n_experts=E, top_k=2, router=router, expert_bias=True,
                    bias_update_rate=rate, aux_loss_coef=0.0, z_loss_coef=0.0)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.3)
        moe.router.weight[0] += 1.0  # tokens with a positive component along this skew pick expert 0
    skew = torch.ones(16) * 0.5
    first = last = None
    for step in range(300):
        x = torch.randn(256, 16) + skew
        _, aux = moe(x)
        if step == 0:
            first = aux.load
        last = aux.load
        moe.update_expert_bias(aux.load)
    assert imbalance(first) > 3.0  # the stream really is skewed
    assert imbalance(last) < 1.5, f"load still skewed: {last.tolist()}"
    assert imbalance(last) < imbalance(first) / 2
    assert moe.router.bias[0] < 0  # the overloaded expert was pushed down


def test_bias_update_is_a_noop_without_expert_bias():
    moe = MoE(MoEConfig(d_model=16, d_expert=8, n_experts=4, top_k=1))
    moe.update_expert_bias(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    assert torch.all(moe.router.bias == 0)


def test_cv_squared_is_the_population_variance_over_the_squared_mean():
    assert balance.cv_squared(torch.tensor([2.0, 2.0, 2.0])).item() == 0.0
    assert balance.cv_squared(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.25)  # var 1 (sample: 2), mean² 4
    assert balance.cv_squared(torch.tensor([8.0, 0.0, 0.0, 0.0])).item() == pytest.approx(3.0)  # all on one: E - 1
    assert balance.cv_squared(torch.zeros(4)).item() == 0.0


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _cv2(v: list[float]) -> float:
    m = sum(v) / len(v)
    return sum((a - m) ** 2 for a in v) / len(v) / m**2


def test_importance_and_load_losses_match_a_hand_computation(monkeypatch):
    """Through the layer, with the noise fixed: importance_i = Σ_t G(x_t)_i and load_i = Σ_t P(x_t, i),
    P(x, i) = Φ((clean_i − k-th largest of the other experts' H) / σ_i), both by loops over plain floats."""
    torch.manual_seed(3)
    T, E, D, k = 6, 4, 3, 2
    cfg = MoEConfig(d_model=D, d_expert=4, n_experts=E, top_k=k, router="noisy_topk", aux_loss_coef=0.0,
                    z_loss_coef=0.0, importance_loss_coef=0.3, load_loss_coef=0.7, route_scale=2.0)
    moe = MoE(cfg).train()
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn(E, D))
        moe.router.noise_weight.copy_(torch.randn(E, D) * 0.5)
    x, eps = torch.randn(T, D), torch.randn(T, E)
    monkeypatch.setattr(torch, "randn_like", lambda t: eps.to(t.dtype))
    _, aux = moe(x)
    wg, wn = moe.router.weight.tolist(), moe.router.noise_weight.tolist()
    importance, load = [0.0] * E, [0.0] * E
    for t in range(T):
        xt = x[t].tolist()
        clean = [sum(a * b for a, b in zip(xt, wg[i])) for i in range(E)]
        std = [math.log1p(math.exp(sum(a * b for a, b in zip(xt, wn[i])))) + NOISE_EPS for i in range(E)]
        h = [clean[i] + eps[t, i].item() * std[i] for i in range(E)]
        kept = sorted(range(E), key=lambda i: -h[i])[:k]
        z = sum(math.exp(h[i]) for i in kept)
        for i in kept:
            importance[i] += math.exp(h[i]) / z
        for i in range(E):
            kth_excluding = sorted((h[j] for j in range(E) if j != i), reverse=True)[k - 1]
            load[i] += _phi((clean[i] - kth_excluding) / std[i])
    assert aux.losses["importance"].item() == pytest.approx(0.3 * _cv2(importance), rel=1e-4)
    assert aux.losses["load"].item() == pytest.approx(0.7 * _cv2(load), rel=1e-4)


def test_smooth_load_estimator_matches_monte_carlo():
    """E over the noise of P(x, i) is P(expert i in the top-k): over N noise draws for one token, the mean of
    P(x, i) minus the indicator "i was chosen" is zero within 5 standard errors of that difference."""
    torch.manual_seed(4)
    N, k = 40_000, 2
    clean = torch.tensor([1.0, 0.6, 0.2, -0.3, -0.7]).expand(N, -1)
    std = torch.tensor([0.5, 1.0, 0.7, 1.2, 0.9]).expand(N, -1)
    noisy = clean + torch.randn(N, 5) * std
    chosen = noisy.topk(k, dim=-1).indices
    p = balance.prob_in_topk(clean, noisy, std, chosen)  # [N, E]
    hit = torch.zeros(N, 5).scatter_(1, chosen, 1.0)
    diff = p - hit
    se = diff.std(0) / math.sqrt(N)
    assert (diff.mean(0).abs() < 5 * se).all(), (p.mean(0), hit.mean(0), se)
    assert p.sum(-1).mean().item() == pytest.approx(k, abs=0.02)  # the expected number chosen is k
    assert hit.mean(0).min() > 0.05 and hit.mean(0).max() < 0.95  # probabilities far from 0 and 1: a real test
