"""The MoE layer: router → one chosen path over the routed experts → + always-on shared experts.

    x [..., D] ─ flatten ─► x_TD
      routing = router(x_TD)                      Routing (T·K assignments, or E·c for expert choice)
      path = policy.choose_path(layer, x_TD, routing)  (the path installed on the layer, if any)
      y_TD, n_dropped = path(layer, x_TD, routing, dtype)      moelab.layer.paths
      + shared(x_TD) (· sigmoid(x·w_gate) when shared_gate)
      aux = layer_aux(cfg, routing, n_dropped, ...)            losses and statistics
    returns y [..., D] and MoEAux; nothing is kept on the module

Statistics rule (the one place it is decided): a forward computes its MoEAux losses and statistics
when `stats=True`, or when `stats` is None (the default) and grad is enabled — i.e. in training, so the
losses always carry their graph. Otherwise (inference; `stats=False`) the MoEAux holds only n_tokens:
the router then skips the full probability distribution and nothing is counted, so a decode step pays
for none of it. Routing analytics ask explicitly: `model(ids, stats=True)` under no_grad.

References: Shazeer et al. 2017 (sparsely-gated MoE); Fedus et al. 2021 (Switch); Jiang et al. 2024
(Mixtral); Dai et al. 2024 (DeepSeekMoE shared experts); DeepSeek-AI 2024 (DeepSeek-V3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moelab.config.model import MoEConfig
from moelab.layer import balance
from moelab.layer.biased_experts import BiasedExperts
from moelab.layer.experts import INIT_STD, Experts, ExpertStore, FeedForward
from moelab.layer.paths import Path
from moelab.layer.policy import choose_path
from moelab.layer.routing import Router, Routing


@dataclass
class MoEAux:
    """What one MoE forward returns besides its output (see the statistics rule in the module doc).

    losses: weighted auxiliary losses by name ("load_balance", "seq_aux", "z", "importance", "load"); only
        those whose coefficient is > 0. Add `total_loss` to the training loss.
    load [E] float32: assignments each expert was selected for (before capacity dropping).
    dropped_frac: fraction of assignments dropped by capacity (token choice) or, for expert choice,
        the fraction of tokens that no expert picked.
    router_entropy: mean entropy (nats) of the per-token router distribution.
    n_tokens: T, the number of tokens routed.
    topk_idx [T, K]: each token's chosen experts (token-choice routers; None for expert choice).
    load, dropped_frac, router_entropy and topk_idx are None when the statistics were not computed.
    Under expert parallelism load, dropped_frac, router_entropy and n_tokens are over all ranks (their
    reduction is a collective: every rank must compute statistics alike); topk_idx is this rank's.
    """

    losses: dict[str, Tensor] = field(default_factory=dict)
    load: Tensor | None = None
    dropped_frac: Tensor | None = None
    router_entropy: Tensor | None = None
    n_tokens: int = 0
    topk_idx: Tensor | None = None

    @property
    def total_loss(self) -> Tensor | float:
        return sum(self.losses.values()) if self.losses else 0.0


def layer_aux(cfg: MoEConfig, routing: Routing, n_dropped: Tensor | int, seq_len: int,
              reduce: Callable[[Tensor], object] | None = None) -> MoEAux:
    """The losses and statistics of one forward of a layer configured by `cfg`.

    `reduce`, when given, sums a tensor in place over the processes that share the layer (expert
    parallelism): the counts (load, dropped, tokens, entropy·T) go through it in one call, so the
    statistics are global; the Switch loss takes the global fraction fᵢ and this process's Pᵢ
    (`balance.switch_loss`), so its mean over equal-sized ranks is the single-process loss; the
    sequence-wise and z losses are means over this process's sequences and tokens; the importance and the
    smooth load loss (Shazeer et al. 2017) sum this process's tokens (the load loss without noise, in eval,
    takes the global counts).
    """
    E, T, probs = cfg.n_experts, routing.logits.shape[0], routing.probs
    token_choice = routing.topk_idx is not None
    dtype = torch.promote_types(probs.dtype, torch.float32)
    with torch.no_grad():
        load = balance.expert_counts(routing.expert_idx(), E).to(dtype)
        if token_choice:
            dropped = torch.as_tensor(n_dropped, device=load.device)
        else:  # expert choice: a token that no expert picked is "dropped"
            picked = torch.zeros(T, dtype=torch.bool, device=load.device)
            picked[routing.chosen[0]] = True
            dropped = T - picked.sum()
        entropy_sum = balance.router_entropy(probs) * T if T else probs.new_zeros(())
        stats = torch.cat([load, torch.stack([dropped.to(dtype), load.new_tensor(T), entropy_sum.to(dtype)])])
        if reduce is not None:
            reduce(stats)
    load, dropped, n_tokens, entropy_sum = stats[:E], stats[E], stats[E + 1], stats[E + 2]
    losses: dict[str, Tensor] = {}
    if T and token_choice:
        if cfg.aux_loss_coef > 0:
            losses["load_balance"] = cfg.aux_loss_coef * balance.switch_loss(probs, load)
        if cfg.seq_aux_loss_coef > 0:
            losses["seq_aux"] = cfg.seq_aux_loss_coef * balance.seq_aux_loss(probs, routing.topk_idx, seq_len)
        if cfg.importance_loss_coef > 0:
            losses["importance"] = cfg.importance_loss_coef * balance.importance_loss(
                routing.topk_idx, routing.topk_weight, E)
        if cfg.load_loss_coef > 0:  # smooth where noise was drawn; else P(x, i) is 0 or 1: the counts
            load_E = load if routing.noise_std is None else balance.prob_in_topk(
                routing.logits, routing.noisy_logits, routing.noise_std, routing.topk_idx).sum(0)
            losses["load"] = cfg.load_loss_coef * balance.load_loss(load_E)
    if T and cfg.z_loss_coef > 0:
        losses["z"] = cfg.z_loss_coef * balance.z_loss(routing.logits)
    n_tokens_int = T if reduce is None else int(n_tokens)  # a host read only when reduced over ranks
    return MoEAux(losses=losses, load=load.float(),
                  dropped_frac=dropped / (load.sum() if token_choice else n_tokens).clamp_min(1),
                  router_entropy=entropy_sum / n_tokens.clamp_min(1), n_tokens=n_tokens_int,
                  topk_idx=routing.topk_idx)


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype an autocast region would run x's matmuls in (x float32 inside one), else None."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer configured by `MoEConfig`.

    Input x [..., d_model] (the last-but-one dimension is taken as the sequence for the sequence-wise
    loss); output y of the same shape and dtype, and an `MoEAux`. `out_std`: the initial std of the
    projections into the residual stream (the experts' and shared experts' w_out).

    `experts` is the store of the routed experts' weights (`moelab.layer.experts`); `path`, None by default,
    is a path installed to override `moelab.layer.policy` (expert parallelism installs its all-to-all).
    """

    def __init__(self, cfg: MoEConfig, out_std: float = INIT_STD) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts: ExpertStore = BiasedExperts(cfg, out_std) if cfg.biases else Experts(cfg, out_std)
        self.shared = FeedForward(cfg.d_model, cfg.shared_width, cfg.activation, out_std) if cfg.n_shared else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.shared_gate else None
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=INIT_STD)
        self.path: Path | None = None

    def forward(self, x: Tensor, stats: bool | None = None) -> tuple[Tensor, MoEAux]:
        """y, aux for x [..., d_model]; `stats`: compute the MoEAux statistics (None: when grad is enabled)."""
        shape = x.shape
        x_TD = self._flatten(x)
        want_stats = torch.is_grad_enabled() if stats is None else stats
        routing = self.router(x_TD, with_probs=want_stats)
        cast = autocast_dtype(x_TD)
        if cast is None:
            y_TD, n_dropped = choose_path(self, x_TD, routing)(self, x_TD, routing, None)
        else:  # in an autocast region the experts run in its dtype, weights cast as nn.Linear's would be
            x_cast = x_TD.to(cast)
            with torch.autocast(x_TD.device.type, enabled=False):
                y_TD, n_dropped = choose_path(self, x_cast, routing)(self, x_cast, routing, cast)
        y = self._add_shared(y_TD, x_TD).view(shape)
        if not want_stats:
            return y, MoEAux(n_tokens=x_TD.shape[0])
        seq_len = shape[-2] if len(shape) >= 3 else x_TD.shape[0]
        reduce = self.path.reduce if self.path is not None else None
        return y, layer_aux(self.cfg, routing, n_dropped, seq_len, reduce)

    def _flatten(self, x: Tensor) -> Tensor:
        """x [..., D] → x_TD [T, D], after checking the width and the dtype."""
        if x.dim() == 0 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"MoE input has shape {tuple(x.shape)}: its last dimension must equal d_model={self.cfg.d_model}"
            )
        dtype = self.router.weight.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"MoE input dtype {x.dtype} differs from the layer's dtype {dtype}: convert one to "
                             "the other (x.to(dtype) or layer.to(dtype)), or run inside torch.autocast")
        return x.reshape(-1, self.cfg.d_model)

    def _add_shared(self, y_TD: Tensor, x_TD: Tensor) -> Tensor:
        """y + the always-on shared experts' output (· sigmoid(x·w_gate) when shared_gate)."""
        if self.shared is None:
            return y_TD
        shared_TD = self.shared(x_TD)
        if self.shared_gate is not None:
            shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD))
        return y_TD + shared_TD

    @torch.no_grad()
    def update_expert_bias(self, load: Tensor) -> None:
        """Auxiliary-loss-free balancing step (call after optimizer.step()); no-op without expert_bias."""
        if self.cfg.expert_bias:
            balance.update_expert_bias(self.router.bias, load, self.cfg.bias_update_rate)
