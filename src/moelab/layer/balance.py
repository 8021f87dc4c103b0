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
- `importance_loss`: CV(Importance)², Importanceᵢ = Σ_x G(x)ᵢ, each expert's gate values summed over the
  batch (Shazeer et al. 2017, eqs. 6-7). 0 when every expert gets the same total gate, E − 1 when one gets all.
- `load_loss` with `prob_in_topk`: CV(Load)², Loadᵢ = Σ_x P(x, i), the probability that expert i is in the
  token's top-k under the noise of "noisy_topk" gating, re-drawing only expert i's noise (Shazeer et al.
  2017, appendix A, eqs. 8-11):
      P(x, i) = Φ(((x·W_g)ᵢ − kth_excluding(H(x), k, i)) / σᵢ(x)),  σᵢ(x) = softplus((x·W_noise)ᵢ) + ε
  with H(x) the noisy logits that selected, kth_excluding(H, k, i) the k-th largest of H among the experts
  other than i, Φ the standard normal CDF, ε = `moelab.layer.routing.NOISE_EPS`.
  CV² = Var/mean², the population variance (over the E experts, divided by E), as in the authors'
  tensor2tensor implementation (`CVSquared`); the paper does not say, and davidmrau/mixture-of-experts uses
  torch's sample variance (divided by E − 1), which is E/(E − 1) times this.

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


def cv_squared(x_E: Tensor) -> Tensor:
    """The squared coefficient of variation Var(x)/mean(x)² of x [E], population variance (see the module
    docstring); 0 for equal entries, E − 1 when one entry holds everything, 0 for an all-zero x."""
    mean = x_E.mean()
    return (x_E - mean).square().mean() / (mean.square() + 1e-10)


def importance_loss(topk_idx_TK: Tensor, topk_weight_TK: Tensor, n_experts: int) -> Tensor:
    """CV(Σ_x G(x))² (Shazeer et al. 2017, eqs. 6-7): G(x) the dense gate vector, i.e. each token's k weights
    at its k experts and 0 elsewhere; a uniform scale of the gates (route_scale) does not change it."""
    w = topk_weight_TK.reshape(-1)
    importance_E = w.new_zeros(n_experts).index_add(0, topk_idx_TK.reshape(-1), w)
    return cv_squared(importance_E)


def prob_in_topk(logits_TE: Tensor, noisy_logits_TE: Tensor, noise_std_TE: Tensor, topk_idx_TK: Tensor) -> Tensor:
    """P(x, i) [T, E] (Shazeer et al. 2017, appendix A; the formula in the module docstring): the probability
    that expert i is among the token's k when its own noise is drawn again and the others' is kept;
    differentiable in the clean logits, the noise scale and the other experts' noisy logits. `topk_idx_TK`:
    the experts the noisy logits selected. k = E: every expert is always chosen, P = 1."""
    K, E = topk_idx_TK.shape[-1], noisy_logits_TE.shape[-1]
    if K >= E:
        return torch.ones_like(logits_TE)
    top_TM = noisy_logits_TE.topk(K + 1, dim=-1).values  # [T, K+1], descending
    chosen_TE = torch.zeros_like(noisy_logits_TE, dtype=torch.bool).scatter_(1, topk_idx_TK, True)
    # the k-th largest of the others: the (k+1)-th of all when i is among the k, the k-th when it is not
    threshold_TE = torch.where(chosen_TE, top_TM[:, K:K + 1], top_TM[:, K - 1:K])
    return torch.special.ndtr((logits_TE - threshold_TE) / noise_std_TE)


def load_loss(load_E: Tensor) -> Tensor:
    """CV(Load)² (Shazeer et al. 2017, eq. 11) of a per-expert load [E]: the smooth Σ_x `prob_in_topk` in training,
    or, where no noise was drawn (eval), the counted assignments, where P(x, i) is 0 or 1."""
    return cv_squared(load_E)


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
