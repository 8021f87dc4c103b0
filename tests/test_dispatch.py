"""Permute / combine against explicit loops."""

from __future__ import annotations

import torch

from moelab.layer.dispatch import combine, permute, token_choice_capacity
from moelab.layer.routing import Routing


def routing_of(token_idx, expert_idx, weight, E):
    T = max(token_idx) + 1
    chosen = (torch.tensor(token_idx), torch.tensor(expert_idx), torch.tensor(weight, dtype=torch.float64))
    return Routing(torch.zeros(T, E), torch.full((T, E), 1.0 / E), chosen=chosen)


def test_permute_sorts_stably_and_counts():
    r = routing_of([0, 1, 2, 0, 1, 2], [2, 0, 2, 1, 2, 0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], E=4)
    d = permute(r, 4, capacity=None)
    # expert 0: assignments 1, 5; expert 1: 3; expert 2: 0, 2, 4 (stable order); expert 3: none
    assert d.token_idx.tolist() == [1, 2, 0, 0, 2, 1]
    assert d.weight.tolist() == [0.2, 0.6, 0.4, 0.1, 0.3, 0.5]
    assert d.counts.tolist() == [2, 1, 3, 0]
    assert d.n_dropped.item() == 0


def test_capacity_keeps_the_first_assignments_of_each_expert():
    r = routing_of([0, 1, 2, 0, 1, 2], [2, 0, 2, 1, 2, 0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], E=4)
    d = permute(r, 4, capacity=1)
    assert d.token_idx.tolist() == [1, 0, 0]  # first of expert 0, of expert 1, of expert 2
    assert d.counts.tolist() == [1, 1, 1, 0]
    assert d.n_dropped.item() == 3


def test_capacity_zero_drops_everything_and_combine_gives_zeros():
    r = routing_of([0, 1, 2], [0, 1, 0], [1.0, 1.0, 1.0], E=2)
    d = permute(r, 2, capacity=0)
    assert d.token_idx.numel() == 0 and d.counts.tolist() == [0, 0] and d.n_dropped.item() == 3
    y = combine(torch.zeros(0, 5, dtype=torch.float64), d, n_tokens=3)
    assert torch.all(y == 0) and y.shape == (3, 5)


def test_combine_is_a_weighted_scatter_add():
    r = routing_of([0, 1, 0], [0, 1, 1], [0.5, 2.0, 0.25], E=2)
    d = permute(r, 2, capacity=None)
    out = torch.arange(6, dtype=torch.float64).view(3, 2)  # rows in expert order: a0, a1, a2
    y = combine(out, d, n_tokens=2)
    expected = torch.zeros(2, 2, dtype=torch.float64)
    for row, (t, w) in enumerate(zip(d.token_idx.tolist(), d.weight.tolist())):
        expected[t] += w * out[row]
    torch.testing.assert_close(y, expected)


def test_capacity_formula():
    assert token_choice_capacity(1.0, 4096, 2, 8) == 1024
    assert token_choice_capacity(1.25, 10, 1, 4) == 4  # ceil(3.125)
