"""Plain reference implementations the fast paths are held to: loops over tokens and experts.

Written independently of moelab's vectorised code: Python lists, per-token loops, float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def expert_ffn(x_d, w_in_dh, w_out_fd, activation):
    h = x_d @ w_in_dh
    if activation == "swiglu":
        f = w_out_fd.shape[0]
        a = F.silu(h[:f]) * h[f:]
    else:
        a = F.gelu(h)
    return a @ w_out_fd


def route_token(logits_e, cfg, bias=None):
    """One token's chosen experts (selected by sorting Python floats) and their weights (torch
    scalars, so gradients flow to the router as in the real layer).

    Selection is on sigmoid scores + bias (DeepSeek-V3) or, for the softmax routers, on logits + bias
    (the bias scales the probabilities by exp(b)); the weights come from the unbiased scores."""
    E = logits_e.shape[0]
    scores_t = torch.sigmoid(logits_e) if cfg.router == "sigmoid" else torch.softmax(logits_e, dim=0)
    ranked = scores_t if cfg.router == "sigmoid" else logits_e
    sel = [float(v) + (float(bias[i]) if bias is not None and cfg.expert_bias else 0.0)
           for i, v in enumerate(ranked.detach())]
    allowed = set(range(E))
    if cfg.n_groups > 1:
        size = E // cfg.n_groups
        gscores = []
        for g in range(cfg.n_groups):
            members = sorted((sel[i] for i in range(g * size, (g + 1) * size)), reverse=True)
            gscores.append(sum(members[:2]) if cfg.router == "sigmoid" and size >= 2 else members[0])
        best = sorted(range(cfg.n_groups), key=lambda g: -gscores[g])[: cfg.topk_groups]
        allowed = {i for g in best for i in range(g * size, (g + 1) * size)}
    chosen = sorted(allowed, key=lambda i: -sel[i])[: cfg.top_k]
    w = [scores_t[i] for i in chosen]
    if cfg.norm_topk_prob and cfg.router != "switch":
        total = sum(w)
        w = [v / (total + 1e-20) for v in w]
    return chosen, [v * cfg.route_scale for v in w]


def moe_reference(moe, x):
    """y for an moelab `MoE` computed token by token from its parameters (float64 math)."""
    cfg = moe.cfg
    x_TD = x.reshape(-1, cfg.d_model).double()
    T = x_TD.shape[0]
    W_r = moe.router.weight.double()
    w_in = moe.experts.w_in.double()
    w_out = moe.experts.w_out.double()
    logits = [torch.stack([x_TD[t] @ W_r[e] for e in range(cfg.n_experts)]) for t in range(T)]
    assignments = []  # (token, expert, weight) in processing order
    if cfg.router == "expert_choice":
        c = min(T, math.ceil(cfg.capacity_factor * T * cfg.top_k / cfg.n_experts))
        probs = [torch.softmax(logits[t], dim=0) for t in range(T)]
        for e in range(cfg.n_experts):
            for t in sorted(range(T), key=lambda t: -float(probs[t][e].detach()))[:c]:
                assignments.append((t, e, probs[t][e] * cfg.route_scale))
    else:
        choices = [route_token(logits[t], cfg, moe.router.bias) for t in range(T)]
        for r in range(cfg.top_k):  # rank-major: first choices are served first
            for t in range(T):
                assignments.append((t, choices[t][0][r], choices[t][1][r]))
        if cfg.capacity_factor is not None:
            cap = math.ceil(cfg.capacity_factor * T * cfg.top_k / cfg.n_experts)
            used = [0] * cfg.n_experts
            kept = []
            for t, e, w in assignments:
                if used[e] < cap:
                    used[e] += 1
                    kept.append((t, e, w))
            assignments = kept
    rows = [torch.zeros(cfg.d_model, dtype=torch.float64) for _ in range(T)]
    for t, e, w in assignments:
        rows[t] = rows[t] + w * expert_ffn(x_TD[t], w_in[e], w_out[e], cfg.activation)
    if moe.shared is not None:
        for t in range(T):
            s = expert_ffn(x_TD[t], moe.shared.w_in.weight.double().t(), moe.shared.w_out.weight.double().t(),
                           cfg.activation)
            if moe.shared_gate is not None:
                s = s * torch.sigmoid(x_TD[t] @ moe.shared_gate.weight.double()[0])
            rows[t] = rows[t] + s
    return torch.stack(rows).reshape(x.shape), assignments
