"""What a layer's router did, from its choices: load, balance, dead experts, co-activation, how one layer's
choice predicts the next's, specialisation by data label, the tokens each expert gets, batch economics.

Plain numpy over the routing record of N tokens (no torch): for each MoE layer `topk` [N, K] (the experts
each token chose; expert choice routers are out of scope), and per token its data label [N], token id
[N] and sequence [N]. Legend: N tokens, K experts per token, E experts, L labels.

- load [E]: assignments per expert; share = load / (N·K); utilisation = load / ideal, ideal = N·K/E.
- entropy: H(share) / ln E — 1 when every expert gets the same load, ln K / ln E when K experts get all.
- max_violation: max(load) / mean(load) (Lepikhin et al. 2020's "max violation" of balance + 1).
- dead experts: experts no token chose.
- co-activation [E, E]: tokens that chose both i and j (i ≠ j), and its lift P(i, j) / (P(i)·P(j)).
- next-layer prediction: predict a token's K experts in layer l+1 as the K most frequent ones that tokens
  sharing its layer-l experts went to (counts over the record); hit rate = share of the true choices
  predicted, against the K experts most frequent overall (the basis of expert prefetching).
- specialisation: per expert, the share of its assignments from each label; the mutual information
  I(expert; label) over assignments, normalised by H(label) (1: each label has experts of its own).
- batch economics: distinct experts a batch of B tokens from B different sequences touches, against the
  uniform prediction E·(1 − (1 − K/E)^B) (`moelab.accounting.experts_touched`).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from moelab.accounting import experts_touched


def load_counts(topk: np.ndarray, n_experts: int) -> np.ndarray:
    """Assignments per expert [E] (int64)."""
    return np.bincount(topk.reshape(-1), minlength=n_experts).astype(np.int64)


def balance(load: np.ndarray) -> dict[str, Any]:
    """Share, utilisation, normalised load entropy, max violation and dead experts of a load vector [E]."""
    E, total = len(load), int(load.sum())
    share = load / max(total, 1)
    nz = share[share > 0]
    entropy = float(-(nz * np.log(nz)).sum() / math.log(E)) if E > 1 else 1.0
    return {"load": load.tolist(), "load_share": share.tolist(), "utilisation": (load * E / max(total, 1)).tolist(),
            "entropy": entropy, "max_violation": float(load.max() / max(load.mean(), 1e-12)),
            "dead_experts": int((load == 0).sum())}


def coactivation(topk: np.ndarray, n_experts: int) -> dict[str, Any]:
    """Tokens choosing both i and j [E, E] (zero diagonal) and the lift over independent choices."""
    N, K = topk.shape
    hits = np.zeros((N, n_experts), dtype=np.float64)
    hits[np.arange(N)[:, None], topk] = 1.0
    both = hits.T @ hits
    np.fill_diagonal(both, 0.0)
    p = hits.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.where(np.outer(p, p) > 0, (both / max(N, 1)) / np.outer(p, p), 0.0)
    return {"counts": both.astype(np.int64).tolist(), "lift": lift.tolist()}


def next_layer_prediction(topk_a: np.ndarray, topk_b: np.ndarray, n_experts: int) -> dict[str, float]:
    """How well layer a's choices predict layer b's (the next layer), against the most frequent experts."""
    N, K = topk_b.shape
    hits_a = np.zeros((N, n_experts))
    hits_a[np.arange(N)[:, None], topk_a] = 1.0
    hits_b = np.zeros((N, n_experts))
    hits_b[np.arange(N)[:, None], topk_b] = 1.0
    transition = hits_a.T @ hits_b  # [E_a, E_b]: how often a's expert i co-occurs with b's expert j
    scores = hits_a @ transition  # [N, E_b]
    predicted = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    hit = np.take_along_axis(hits_b, predicted, axis=1).sum() / (N * K)
    frequent = np.argsort(-hits_b.sum(0), kind="stable")[:K]
    baseline = hits_b[:, frequent].sum() / (N * K)
    return {"hit_rate": float(hit), "baseline_hit_rate": float(baseline), "random_hit_rate": K / n_experts}


def specialisation(topk: np.ndarray, labels: np.ndarray, n_experts: int, n_labels: int) -> dict[str, Any]:
    """Per expert the share of its assignments from each label [E, L]; I(expert; label) in nats and
    normalised by H(label) over assignments."""
    K = topk.shape[1]
    joint = np.zeros((n_experts, n_labels))
    np.add.at(joint, (topk.reshape(-1), np.repeat(labels, K)), 1.0)
    total = joint.sum()
    p = joint / max(total, 1)
    pe, pl = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        mi = float(np.nansum(np.where(p > 0, p * np.log(p / (pe * pl)), 0.0)))
    h_label = float(-np.nansum(np.where(pl > 0, pl * np.log(pl), 0.0)))
    share = np.where(joint.sum(1, keepdims=True) > 0, joint / np.maximum(joint.sum(1, keepdims=True), 1), 0.0)
    return {"share_by_label": share.tolist(), "mutual_information": mi,
            "normalised_mutual_information": mi / h_label if h_label > 0 else 0.0}


def top_tokens(topk: np.ndarray, token_ids: np.ndarray, n_experts: int, n: int = 8) -> list[list[list[int]]]:
    """Per expert, its `n` most frequent token ids with their counts: [[token_id, count], ...]."""
    K = topk.shape[1]
    per_expert: list[Counter] = [Counter() for _ in range(n_experts)]
    for e, t in zip(topk.reshape(-1).tolist(), np.repeat(token_ids, K).tolist()):
        per_expert[e][t] += 1
    return [[[t, c] for t, c in counts.most_common(n)] for counts in per_expert]


def batch_economics(topk: np.ndarray, sequences: np.ndarray, n_experts: int, batches: list[int],
                    trials: int = 64, seed: int = 0) -> list[dict[str, float]]:
    """For each B: the mean number of distinct experts touched by B tokens drawn from B different sequences
    (one random token of each of B random sequences, `trials` times), and the uniform prediction."""
    rng = np.random.default_rng(seed)
    K = topk.shape[1]
    by_sequence = [np.flatnonzero(sequences == s) for s in np.unique(sequences)]
    out = []
    for B in batches:
        if len(by_sequence) < B:
            break
        touched = []
        for _ in range(trials):
            chosen = rng.choice(len(by_sequence), size=B, replace=False)
            rows = [rng.choice(by_sequence[s]) for s in chosen]
            touched.append(len(np.unique(topk[rows])))
        out.append({"batch": B, "experts_touched": float(np.mean(touched)),
                    "experts_touched_uniform": experts_touched(n_experts, K, B)})
    return out
