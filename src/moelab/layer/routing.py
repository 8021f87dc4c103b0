"""Routers: from token vectors to a list of (token, expert, weight) assignments.

Every router returns the same `Routing`, so dispatch and expert compute never know which one ran
(docs/ARCHITECTURE.md, "Routing is the seam"). Router math runs in float32 whatever the input dtype
(float64 inputs keep float64).

Legend: T = tokens, D = model width, E = routed experts, K = experts per token, A = assignments.

Routers
- "topk_softmax": p = softmax(z), z = x·Wᵀ; the top-k of p, i.e. of z (with `expert_bias`, of z + b:
  the bias scales p by exp(b) for selection only; optionally group-limited); weights p_i from the
  unbiased p, renormalised over the k when `norm_topk_prob` (Mixtral; Jiang et al. 2024) or not (OLMoE,
  Qwen `norm_topk_prob=False`).
- "switch": top-1 of the softmax with weight p_i (never renormalised — the router would get no
  gradient); used with a capacity factor (Switch Transformer, Fedus et al. 2021).
- "sigmoid": s = sigmoid(x·Wᵀ); selection on s + b (b: per-expert bias, selection only), optionally
  group-limited (group score = sum of its top-2 biased scores; keep `topk_groups` groups); weights from
  the unbiased s, renormalised over the k and scaled by `route_scale` (DeepSeek-V3, 2024).
- "expert_choice": p = softmax(x·Wᵀ) over experts; each expert takes its top-c tokens by p,
  c = ceil(capacity_factor · T · k / E) (Zhou et al. 2022). A token's experts depend on the *other*
  tokens in the batch, including later ones, so this router is not causal and is unsuitable for
  autoregressive decoding; use it for encoders or for study.
- "noisy_topk": noisy top-k gating (Shazeer et al. 2017, eqs. 3-5), `Router._noisy_topk`. In training (module
  in training mode and grad enabled) H(x)ᵢ = (x·W_g)ᵢ + εᵢ·σᵢ(x), εᵢ ~ N(0, 1), σᵢ(x) = softplus((x·W_noise)ᵢ)
  + NOISE_EPS; the top-k of H with weights G(x) = softmax over the kept k of H. Otherwise (eval, decode,
  no_grad) no noise: the top-k of x·W_g with the softmax over the kept k, i.e. "topk_softmax" with
  `norm_topk_prob` (Mixtral's gate). W_noise [E, D] starts at zero, as in the paper (appendix A: "no signal
  and some noise"): σ = softplus(0) + NOISE_EPS ≈ 0.70 at the start. W_g keeps moelab's N(0, INIT_STD) init.

Assignment order for token-choice routers is rank-major (all tokens' first choices, then all second
choices, ...), so that capacity dropping keeps first choices before second ones (GShard, ST-MoE).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.config.model import MoEConfig
from moelab.layer.expert_ops import fast_linear
from moelab.layer.experts import INIT_STD


@dataclass(frozen=True)
class Routing:
    """What a router decided for T tokens.

    logits [T, E]: raw router logits (float32 at least; for the z-loss).
    probs [T, E] or None: the per-token distribution over experts used by the balance losses and the
        entropy statistic (softmax probabilities; for sigmoid scores, the scores normalised to sum 1).
        The router computes it when asked (`Router.forward(x, with_probs=True)`) or when it is a
        by-product of routing; a decode step does not ask.
    topk_idx [T, K] long, topk_weight [T, K]: each token's chosen experts and their weights (token-choice
        routers); None for expert choice.
    chosen: (token_idx, expert_idx, weight) [A], grouped by expert (expert choice only).
    noisy_logits [T, E], noise_std [T, E]: the noisy logits H that selected and the noise scale σ
        ("noisy_topk" when it drew noise; None otherwise), for the load loss (`moelab.layer.balance.prob_in_topk`).

    `assignments()` gives the flat lists for every router.
    """

    logits: Tensor
    probs: Tensor | None
    topk_idx: Tensor | None = None
    topk_weight: Tensor | None = None
    chosen: tuple[Tensor, Tensor, Tensor] | None = None
    noisy_logits: Tensor | None = None
    noise_std: Tensor | None = None

    @property
    def n_assignments(self) -> int:
        return self.topk_idx.numel() if self.topk_idx is not None else self.chosen[0].numel()

    def assignments(self) -> tuple[Tensor, Tensor, Tensor]:
        """(token_idx [A] long, expert_idx [A] long, weight [A]); token choice in rank-major order
        (a = r·T + t: all first choices, then all second choices, ...), built on each call."""
        if self.topk_idx is None:
            return self.chosen
        T, K = self.topk_idx.shape
        token_idx = torch.arange(T * K, device=self.topk_idx.device) % T
        return token_idx, self.topk_idx.t().reshape(-1), self.topk_weight.t().reshape(-1)

    def expert_idx(self) -> Tensor:
        """Every assignment's expert [A], in no particular order (for counting loads)."""
        return self.topk_idx.reshape(-1) if self.topk_idx is not None else self.chosen[1]


# The router's logits x·Wᵀ [T, E] have few columns: forward and backward (training), oneDNN
# (`fast_linear`) is the faster kernel at every size measured; a forward alone (inference) is faster on
# F.linear's BLAS below T·E = ROUTER_ONEDNN_MIN (docs/BENCHMARKS.md, "Router kernel").
ROUTER_ONEDNN_MIN = 2**18

# added to the noise scale softplus(x·W_noise) of "noisy_topk" for numerical stability (it bounds the
# division in the load estimator), as in the authors' tensor2tensor implementation (`noise_epsilon`)
NOISE_EPS = 1e-2


def expert_choice_capacity(cfg: MoEConfig, n_tokens: int) -> int:
    """Tokens per expert for expert choice: c = ceil(cf · T · k / E), at most T."""
    assert cfg.capacity_factor is not None
    return min(n_tokens, math.ceil(cfg.capacity_factor * n_tokens * cfg.top_k / cfg.n_experts))


def _group_mask(select_TE: Tensor, cfg: MoEConfig, top2_sum: bool) -> Tensor:
    """Mask out experts outside each token's best `topk_groups` groups (set to -inf)."""
    T, E = select_TE.shape
    grouped = select_TE.view(T, cfg.n_groups, E // cfg.n_groups)
    if top2_sum and grouped.shape[-1] >= 2:
        group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
    else:
        group_score = grouped.amax(dim=-1)  # [T, G]
    keep_groups = group_score.topk(cfg.topk_groups, dim=-1).indices  # [T, topk_groups]
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep_groups, True)
    return select_TE.masked_fill(~keep.repeat_interleave(E // cfg.n_groups, dim=1), float("-inf"))


class Router(nn.Module):
    """The learned router: weight [E, D], a learned logit bias [E] when `cfg.biases` (gpt-oss), when
    `cfg.expert_bias` a selection bias [E], and for "noisy_topk" the noise weight W_noise `noise_weight` [E, D].

    The bias is a buffer updated by `moelab.layer.balance.update_expert_bias`, never by the gradient.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        self.weight.requires_grad_(not cfg.freeze_router)
        self.register_buffer("bias", torch.zeros(cfg.n_experts, dtype=torch.float32), persistent=True)
        if cfg.biases:  # a learned bias on the logits (gpt-oss), unlike `bias`, which only selects
            self.logit_bias = nn.Parameter(torch.zeros(cfg.n_experts))
        if cfg.router == "noisy_topk":
            self.noise_weight = nn.Parameter(torch.zeros(cfg.n_experts, cfg.d_model))
            self.noise_weight.requires_grad_(not cfg.freeze_router)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=INIT_STD)
        self.bias.zero_()
        if self.cfg.router == "noisy_topk":
            nn.init.zeros_(self.noise_weight)

    def forward(self, x_TD: Tensor, with_probs: bool = True) -> Routing:
        """Route T tokens; `with_probs=False` skips the full distribution where routing does not need it
        (the layer asks for it only when it computes its statistics: see `moelab.layer.moe`)."""
        cfg = self.cfg
        T = x_TD.shape[0]
        dtype = torch.promote_types(x_TD.dtype, torch.float32)  # float32 at least, whatever comes in
        linear = fast_linear if torch.is_grad_enabled() or T * cfg.n_experts >= ROUTER_ONEDNN_MIN else F.linear
        device = x_TD.device.type
        no_autocast = torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext()
        with no_autocast:  # router math stays float32 under autocast too
            logits_TE = linear(x_TD.to(dtype), self.weight.to(dtype))
            if cfg.biases:
                logits_TE = logits_TE + self.logit_bias.to(dtype)
        if cfg.router == "expert_choice":
            return self._expert_choice(logits_TE)
        if cfg.router == "noisy_topk":
            return self._noisy_topk(x_TD.to(dtype), logits_TE, with_probs)
        sigmoid = cfg.router == "sigmoid"
        # renormalised top-k softmax: p_i / Σ_chosen p_j = softmax over the chosen logits, so the full
        # softmax is needed only by the balance losses and statistics
        from_chosen_logits = cfg.router == "topk_softmax" and cfg.norm_topk_prob
        probs_TE = None
        if sigmoid:
            scores_TE = torch.sigmoid(logits_TE)
            if with_probs:
                probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        elif from_chosen_logits:
            scores_TE = None
            if with_probs:
                probs_TE = torch.softmax(logits_TE, dim=-1)
        else:
            scores_TE = probs_TE = torch.softmax(logits_TE, dim=-1)
        # selection: sigmoid scores + bias (DeepSeek-V3); for softmax the bias is added to the logits,
        # i.e. it scales the probabilities by exp(b) — scale-free, so one rate suits sharp and flat routers
        select_TE = scores_TE if sigmoid else logits_TE  # topk's indices carry no gradient
        if cfg.expert_bias:
            select_TE = select_TE.detach() + self.bias.to(select_TE.dtype)
        if cfg.n_groups > 1:
            select_TE = _group_mask(select_TE.detach(), cfg, top2_sum=sigmoid)
        topk_idx_TK = select_TE.topk(cfg.top_k, dim=-1).indices
        if from_chosen_logits:
            weight_TK = torch.softmax(logits_TE.gather(1, topk_idx_TK), dim=-1)
        else:
            weight_TK = scores_TE.gather(1, topk_idx_TK)
            if cfg.norm_topk_prob and cfg.router != "switch":
                weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).add_(1e-20)
        if cfg.route_scale != 1.0:
            weight_TK = weight_TK * cfg.route_scale
        return Routing(logits_TE, probs_TE, topk_idx_TK, weight_TK)

    def _expert_choice(self, logits_TE: Tensor) -> Routing:
        T, E = logits_TE.shape
        probs_TE = torch.softmax(logits_TE, dim=-1)
        c = expert_choice_capacity(self.cfg, T)
        # each expert's top-c tokens; a stable sort breaks ties by token position, on every device
        weight_TE, token_TE = torch.sort(probs_TE, dim=0, descending=True, stable=True)
        weight_CE, token_CE = weight_TE[:c], token_TE[:c]
        expert_idx = torch.arange(E, device=logits_TE.device).repeat_interleave(c)
        chosen = (token_CE.t().reshape(-1), expert_idx, weight_CE.t().reshape(-1) * self.cfg.route_scale)
        return Routing(logits_TE, probs_TE, chosen=chosen)

    def _noisy_topk(self, x_TD: Tensor, logits_TE: Tensor, with_probs: bool) -> Routing:
        """Noisy top-k gating (module docstring): noise only in training mode with grad enabled; `probs` is the
        full softmax of the clean logits x·W_g (entropy statistic, Switch loss)."""
        cfg = self.cfg
        probs_TE = torch.softmax(logits_TE, dim=-1) if with_probs else None
        noisy_TE = std_TE = None
        select_TE = logits_TE
        if self.training and torch.is_grad_enabled():
            device = x_TD.device.type
            no_autocast = torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext()
            with no_autocast:
                std_TE = F.softplus(F.linear(x_TD, self.noise_weight.to(x_TD.dtype))) + NOISE_EPS
            noisy_TE = select_TE = logits_TE + torch.randn_like(logits_TE) * std_TE
        top_TK, topk_idx_TK = select_TE.topk(cfg.top_k, dim=-1)
        weight_TK = torch.softmax(top_TK, dim=-1)  # G(x) = softmax(KeepTopK(H(x), k)) at the kept k
        if cfg.route_scale != 1.0:
            weight_TK = weight_TK * cfg.route_scale
        return Routing(logits_TE, probs_TE, topk_idx_TK, weight_TK, noisy_logits=noisy_TE, noise_std=std_TE)
