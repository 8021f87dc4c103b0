"""The MoE layer: router → permute → grouped experts → combine, plus always-on shared experts.

    x [..., D] ─ flatten ─► x_TD
      router(x_TD)                 → Routing (A = T·K assignments, or E·c for expert choice)
      permute(routing, capacity)   → rows in expert order, counts per expert, dropped count
      experts(x_TD[token_idx])     → grouped compute over contiguous segments      [A, D]
      combine(out, weights)        → scatter-add back per token                    [T, D]
      + shared(x_TD) (· sigmoid(x·w_gate) when shared_gate)
    returns y [..., D] and MoEAux (losses and statistics; nothing is kept on the module)

References: Shazeer et al. 2017 (sparsely-gated MoE); Fedus et al. 2021 (Switch); Jiang et al. 2024
(Mixtral); Dai et al. 2024 (DeepSeekMoE shared experts); DeepSeek-AI 2024 (DeepSeek-V3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from moelab import balance
from moelab.config import MoEConfig
from moelab.dispatch import combine, permute, token_choice_capacity
from moelab.experts import Experts, FeedForward, autocast_dtype, cpu_auto
from moelab.routing import Router


class MoEAux:
    """What one MoE forward returns besides its output.

    losses: weighted auxiliary losses by name ("load_balance", "seq_aux", "z"); only those whose
        coefficient is > 0. Add `total_loss` to the training loss.
    load [E]: assignments each expert was selected for (before capacity dropping), float32.
    dropped_frac: fraction of assignments dropped by capacity (token choice) or, for expert choice,
        the fraction of tokens that no expert picked.
    router_entropy: mean entropy (nats) of the per-token router distribution.
    n_tokens: T, the number of tokens routed.

    A forward under `torch.no_grad()` returns these *deferred*: they are computed from the routing
    the first time one of them is read (the same values), so inference, which never reads them, does
    not pay the ~15 small ops per layer they cost (a decode step of one token is made of small ops).
    A forward with grad enabled computes them at once, so the losses always carry their graph. Until
    read, pickled or dropped, a deferred MoEAux keeps its layer's Routing (probs and logits [T, E]) and
    the layer alive. `ExpertParallelMoE` never defers: its statistics are collectives, which every rank
    must run in the same order.
    """

    def __init__(self, losses: dict[str, Tensor] | None = None, load: Tensor | None = None,
                 dropped_frac: Tensor | None = None, router_entropy: Tensor | None = None,
                 n_tokens: int = 0) -> None:
        self._values = (losses if losses is not None else {}, load, dropped_frac, router_entropy)
        self._compute: Callable[[], MoEAux] | None = None
        self.n_tokens = n_tokens

    @classmethod
    def deferred(cls, compute: Callable[[], MoEAux], n_tokens: int) -> MoEAux:
        """An MoEAux whose values `compute()` gives on first read."""
        aux = cls(n_tokens=n_tokens)
        aux._compute = compute
        return aux

    def __getstate__(self) -> dict:
        self._get(0)  # compute deferred values first: the closure cannot be pickled
        return self.__dict__.copy()

    def _get(self, i: int):
        if self._compute is not None:
            self._values, self._compute = self._compute()._values, None
        return self._values[i]

    losses = property(lambda self: self._get(0))
    load = property(lambda self: self._get(1))
    dropped_frac = property(lambda self: self._get(2))
    router_entropy = property(lambda self: self._get(3))

    @property
    def total_loss(self) -> Tensor | float:
        return sum(self.losses.values()) if self.losses else 0.0

    def __repr__(self) -> str:
        state = "deferred" if self._compute is not None else \
            f"losses={self.losses}, load={self.load}, dropped_frac={self.dropped_frac}, " \
            f"router_entropy={self.router_entropy}"
        return f"MoEAux({state}, n_tokens={self.n_tokens})"


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer configured by `MoEConfig`.

    Input x [..., d_model] (the last-but-one dimension is taken as the sequence for the sequence-wise
    loss); output y of the same shape and dtype, and an `MoEAux`.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.shared = FeedForward(cfg.d_model, cfg.shared_width, cfg.activation) if cfg.n_shared else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.shared_gate else None

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        cfg = self.cfg
        shape = x.shape
        x_TD = self._flatten(x)
        T = x_TD.shape[0]
        if T == 0:
            return x.clone(), MoEAux(load=x.new_zeros(cfg.n_experts, dtype=torch.float32), n_tokens=0)

        routing = self.router(x_TD)
        cast = autocast_dtype(x_TD)
        if cast is None:
            y_TD, n_dropped = self._routed(x_TD, routing)
        else:  # in an autocast region the experts run in its dtype, weights cast as nn.Linear's would be
            with torch.autocast(x_TD.device.type, enabled=False):
                y_TD, n_dropped = self._routed(x_TD.to(cast), routing, cast)

        return self._add_shared(y_TD, x_TD).view(shape), self._aux(routing, n_dropped, T, shape)

    def _aux(self, routing, n_dropped: Tensor | int, T: int, shape: torch.Size) -> MoEAux:
        """The losses and statistics: now under grad, else deferred to their first read (`MoEAux`)."""
        if torch.is_grad_enabled():
            return self._compute_aux(routing, n_dropped, T, shape)
        return MoEAux.deferred(lambda: self._compute_aux(routing, n_dropped, T, shape), T)

    def _routed(self, x_TD: Tensor, routing, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | int]:
        """The routed experts' combined output y [T, D] and the number of assignments dropped;
        `dtype`: cast the expert weights to it (autocast)."""
        cfg, T = self.cfg, x_TD.shape[0]
        if T == 1 and routing.topk_idx is not None and not torch.is_grad_enabled() \
                and cpu_auto(cfg.backend, x_TD):  # a decode step: nothing to sort or drop
            experts, weights = routing.topk_idx.tolist()[0], routing.topk_weight.tolist()[0]  # no row select:
            return self.experts.decode(x_TD, experts, weights, dtype), 0  # each op costs ~50 µs at decode
        capacity = None
        if cfg.capacity_factor is not None and cfg.router != "expert_choice":
            capacity = token_choice_capacity(cfg.capacity_factor, T, cfg.top_k, cfg.n_experts)
        disp = permute(routing, cfg.n_experts, capacity)
        path = self.experts.path(x_TD, disp.token_idx.numel())
        if path == "fused":  # gather → experts → combine, one expert segment at a time
            y_TD = self.experts.routed(x_TD, disp.token_idx, disp.weight, disp.counts, dtype)
        else:
            y_TD = combine(self.experts(x_TD[disp.token_idx], disp.counts, path, dtype), disp, T)
        return y_TD, disp.n_dropped

    def _flatten(self, x: Tensor) -> Tensor:
        """x [..., D] → x_TD [T, D], after checking the width."""
        if x.dim() == 0 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"MoE input has shape {tuple(x.shape)}: its last dimension must equal d_model={self.cfg.d_model}"
            )
        return x.reshape(-1, self.cfg.d_model)

    def _add_shared(self, y_TD: Tensor, x_TD: Tensor) -> Tensor:
        """y + the always-on shared experts' output (· sigmoid(x·w_gate) when shared_gate)."""
        if self.shared is None:
            return y_TD
        shared_TD = self.shared(x_TD)
        if self.shared_gate is not None:
            shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD))
        return y_TD + shared_TD

    def _compute_aux(self, routing, n_dropped: Tensor | int, T: int, shape: torch.Size) -> MoEAux:
        cfg = self.cfg
        losses: dict[str, Tensor] = {}
        load = balance.expert_counts(routing.expert_idx, cfg.n_experts)
        if routing.topk_idx is not None:  # token choice: balance losses apply
            if cfg.aux_loss_coef > 0:
                losses["load_balance"] = cfg.aux_loss_coef * balance.switch_loss(routing.probs, routing.expert_idx)
            if cfg.seq_aux_loss_coef > 0:
                seq_len = shape[-2] if len(shape) >= 3 else T
                losses["seq_aux"] = cfg.seq_aux_loss_coef * balance.seq_aux_loss(
                    routing.probs, routing.topk_idx, seq_len)
            dropped = torch.as_tensor(n_dropped, device=load.device).float() / routing.expert_idx.numel()
        else:  # expert choice: a token no expert picked is "dropped"
            picked = torch.zeros(T, dtype=torch.bool, device=load.device)
            picked[routing.token_idx] = True
            dropped = 1.0 - picked.float().mean()
        if cfg.z_loss_coef > 0:
            losses["z"] = cfg.z_loss_coef * balance.z_loss(routing.logits)
        with torch.no_grad():
            entropy = balance.router_entropy(routing.probs)
        return MoEAux(losses=losses, load=load, dropped_frac=dropped.detach(), router_entropy=entropy,
                      n_tokens=T)

    @torch.no_grad()
    def update_bias(self, load: Tensor) -> None:
        """Auxiliary-loss-free balancing step (call after optimizer.step()); no-op without expert_bias."""
        if self.cfg.expert_bias:
            balance.update_expert_bias(self.router.bias, load, self.cfg.bias_update_rate)
