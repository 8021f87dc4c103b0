"""Load balancing: auxiliary losses (through the gradient) and the auxiliary-loss-free bias update.

Legend: T = tokens, E = experts, K = experts per token, B = sequences, S = tokens per sequence.

Losses (unweighted here; the MoE layer multiplies by the coefficient from its config):
- `switch_loss`: E · Σᵢ fᵢ · Pᵢ, fᵢ = fraction of the T·K assignments routed to expert i, Pᵢ = mean
  router probability of expert i (Fedus et al. 2021, eq. 4; for K > 1 as in Mixtral/OLMoE).
  Equals 1 for perfectly uniform routing and E for total collapse onto one expert.
- `seq_aux_loss`: the same product computed per sequence and averaged over sequences, with
  fᵢ = E/(K·S) · #{t : i ∈ topk(t)} and Pᵢ = mean over the sequence of the normalised scores
  (DeepSeek-V3, 2024, eqs. 17–20; α is the coefficient). Also 1 when uniform.
- `z_loss`: mean over tokens of (log Σⱼ exp(zⱼ))², penalising large router logits (ST-MoE, Zoph et
  al. 2022, eq. 5).

Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3): after each optimizer step, outside the
gradient, `update_expert_bias` nudges each expert's selection bias by γ · sign(mean load − loadᵢ):
overloaded experts become less likely to be selected, underloaded ones more.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expert_counts(expert_idx: Tensor, n_experts: int) -> Tensor:
    """Assignments per expert [E] (float32) from a flat list of expert indices."""
    return torch.bincount(expert_idx, minlength=n_experts).float()


def switch_loss(probs_TE: Tensor, load_E: Tensor) -> Tensor:
    """E · Σᵢ fᵢ · Pᵢ (Fedus et al. 2021) with fᵢ = loadᵢ / Σⱼ loadⱼ, the fraction of the routed choices
    that went to expert i (`expert_counts`; under expert parallelism the load summed over the ranks, so
    fᵢ is global), and Pᵢ the mean probability of expert i over the T tokens of `probs_TE`."""
    E = probs_TE.shape[-1]
    f_E = (load_E / load_E.sum()).to(probs_TE.dtype)
    P_E = probs_TE.mean(dim=0)
    return E * (f_E * P_E).sum()


def seq_aux_loss(probs_TE: Tensor, topk_idx_TK: Tensor, seq_len: int) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over the T / seq_len sequences."""
    T, E = probs_TE.shape
    K = topk_idx_TK.shape[-1]
    B = T // seq_len
    assert B * seq_len == T, "tokens must be whole sequences"
    hits_BSE = torch.zeros(T, E, device=probs_TE.device).scatter_(1, topk_idx_TK, 1.0).view(B, seq_len, E)
    f_BE = hits_BSE.sum(1) * (E / (K * seq_len))
    P_BE = probs_TE.view(B, seq_len, E).mean(1)
    return (f_BE * P_BE).sum(-1).mean()


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)²."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def router_entropy(probs_TE: Tensor) -> Tensor:
    """Mean over tokens of the entropy (nats) of the router distribution; log E when uniform."""
    return -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()


@torch.no_grad()
def update_expert_bias(bias_E: Tensor, load_E: Tensor, rate: float) -> Tensor:
    """Auxiliary-loss-free bias update, in place: bᵢ += γ · sign(mean(load) − loadᵢ).

    Call after the optimizer step with the load (assignments per expert) observed in that step,
    summed over micro-batches. Returns the bias for convenience.
    """
    load_E = load_E.to(bias_E.device, torch.float32)
    bias_E += rate * torch.sign(load_E.mean() - load_E)
    return bias_E
