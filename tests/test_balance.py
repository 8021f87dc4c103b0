"""Balance losses against hand computations and loops; the bias update against a skewed stream."""

from __future__ import annotations

import math

import pytest
import torch

from moelab import MoEConfig
from moelab.layer.balance import expert_counts, router_entropy, seq_aux_loss, switch_loss, update_expert_bias, z_loss
from moelab.layer.moe import MoE


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
