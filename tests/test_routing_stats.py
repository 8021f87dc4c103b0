"""Routing statistics on planted routing records, against hand counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moelab.accounting import experts_touched
from moelab.analysis.routing_stats import (
    balance,
    batch_economics,
    coactivation,
    load_counts,
    next_layer_prediction,
    specialisation,
    top_tokens,
)

E, K = 8, 2


def test_all_tokens_to_the_same_k_experts():
    topk = np.tile([3, 5], (100, 1))
    b = balance(load_counts(topk, E))
    assert b["dead_experts"] == E - K and b["load"][3] == b["load"][5] == 100
    assert b["entropy"] == pytest.approx(math.log(K) / math.log(E))
    assert b["max_violation"] == pytest.approx(100 / (200 / E))
    assert b["utilisation"][3] == pytest.approx(E / K)


def test_uniform_load():
    topk = np.array([[e, (e + 1) % E] for e in range(E)] * 5)
    b = balance(load_counts(topk, E))
    assert b["entropy"] == pytest.approx(1.0) and b["dead_experts"] == 0 and b["max_violation"] == pytest.approx(1.0)


def test_coactivation_counts_pairs():
    topk = np.array([[0, 1], [0, 1], [1, 2]])
    co = coactivation(topk, 3)
    assert co["counts"] == [[0, 2, 0], [2, 0, 1], [0, 1, 0]]
    assert co["lift"][0][1] == pytest.approx((2 / 3) / ((2 / 3) * 1.0))


def test_next_layer_prediction_planted():
    rng = np.random.default_rng(0)
    a = np.stack([rng.choice(E, K, replace=False) for _ in range(400)])
    follows = (a + 3) % E  # layer b = layer a shifted: fully predictable
    pred = next_layer_prediction(a, follows, E)
    assert pred["hit_rate"] == pytest.approx(1.0) and pred["baseline_hit_rate"] < 0.5
    independent = np.stack([rng.choice(E, K, replace=False) for _ in range(400)])
    assert next_layer_prediction(a, independent, E)["hit_rate"] < 0.45


def test_each_label_to_its_own_experts_is_full_specialisation():
    labels = np.array([0] * 50 + [1] * 50)
    topk = np.where(labels[:, None] == 0, [[0, 1]], [[2, 3]])
    s = specialisation(topk, labels, 4, 2)
    assert s["normalised_mutual_information"] == pytest.approx(1.0)
    assert s["share_by_label"][0] == [1.0, 0.0] and s["share_by_label"][3] == [0.0, 1.0]
    mixed = specialisation(np.tile([[0, 1]], (100, 1)), labels, 4, 2)
    assert mixed["normalised_mutual_information"] == pytest.approx(0.0, abs=1e-12)


def test_top_tokens():
    topk = np.array([[0, 1], [0, 2], [0, 1]])
    assert top_tokens(topk, np.array([7, 9, 7]), 3, n=2)[0] == [[7, 2], [9, 1]]


def test_batch_economics_bounds_and_the_uniform_formula():
    rng = np.random.default_rng(1)
    n_seq, per_seq = 300, 4
    topk = np.stack([rng.choice(E, K, replace=False) for _ in range(n_seq * per_seq)])  # a uniform router
    seqs = np.repeat(np.arange(n_seq), per_seq)
    points = batch_economics(topk, seqs, E, [1, 2, 4, 8, 16, 64], trials=400)
    assert points[0]["experts_touched"] == K  # one token touches exactly its K experts
    for p in points:
        assert p["experts_touched"] <= E
        assert p["experts_touched_uniform"] == pytest.approx(experts_touched(E, K, p["batch"]))
        assert p["experts_touched"] == pytest.approx(p["experts_touched_uniform"], rel=0.05)  # simulation vs formula
    collapsed = batch_economics(np.tile([3, 5], (n_seq, 1)), np.arange(n_seq), E, [1, 64])
    assert [p["experts_touched"] for p in collapsed] == [2, 2]


def test_coactivation_lift_where_no_expert_is_always_chosen():
    """Four tokens, P(0) = 3/4, P(1) = P(2) = 1/2, P(3) = 1/4: every lift P(i, j) / (P(i)·P(j)) by hand."""
    topk = np.array([[0, 1], [0, 2], [1, 2], [0, 3]])
    co = coactivation(topk, 4)
    assert co["counts"] == [[0, 1, 1, 1], [1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    lift = np.array(co["lift"])
    assert lift[0, 1] == pytest.approx((1 / 4) / (3 / 4 * 1 / 2))  # 2/3: chosen together less than by chance
    assert lift[1, 2] == pytest.approx((1 / 4) / (1 / 2 * 1 / 2))  # 1
    assert lift[0, 3] == pytest.approx((1 / 4) / (3 / 4 * 1 / 4))  # 4/3
    assert lift[2, 3] == 0.0 and lift[3, 2] == 0.0 and np.allclose(lift, lift.T) and np.all(np.diag(lift) == 0)


def test_skewed_load_entropy_and_violation_by_hand():
    """Shares 1/2, 1/4, 1/8, 1/8: H = 1.75 ln 2 nats, normalised by ln 4 = 2 ln 2 → 0.875; max/mean = 4/2."""
    topk = np.array([[0, 1], [0, 2], [0, 1], [0, 3]])
    b = balance(load_counts(topk, 4))
    assert b["load"] == [4, 2, 1, 1] and b["load_share"] == [0.5, 0.25, 0.125, 0.125]
    assert b["entropy"] == pytest.approx(0.875) and b["max_violation"] == pytest.approx(2.0)
    assert b["utilisation"] == pytest.approx([2.0, 1.0, 0.5, 0.5]) and b["dead_experts"] == 0
