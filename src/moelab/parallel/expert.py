"""Expert parallelism: E experts split evenly over the N ranks of a process group (GShard, Lepikhin et
al. 2020; Switch, Fedus et al. 2021), everything else data-parallel.

Legend: T = this rank's tokens, D = model width, E = experts, El = E / N experts per rank, K = experts
per token, A = this rank's kept assignments, R = rows this rank's experts receive, N = ranks.

One MoE layer on rank r (`ExpertParallelMoE.forward`):
    router(x_TD)            on r's own tokens (identical router weights on every rank)
    permute                 rows in global expert order; with a capacity, the drop decision is the one
                            the single-process run makes on the concatenated global batch (below)
    all_to_all(counts)      counts [N, El] sent ↔ received: rank q owns experts [q·El, (q+1)·El)
    all_to_all(rows)        x rows [A, D] → [R, D] (differentiable: `all_to_all_rows`)
    regroup + local FFN     received rows put expert-major, grouped FFN over w_in/w_out[El]
    all_to_all back, combine  weight · out scatter-added to r's tokens                      y [T, D]

Matching the single-process run (global batch = the ranks' batches concatenated in rank order):
- Capacity C = ceil(cf · T_global · K / E) with T_global summed over ranks. The single-process permute
  keeps an assignment if its position in its expert's segment (assignments in rank-major order: all
  first choices of the global batch, then all second choices, ...) is < C. Each rank all-gathers the
  per-(choice, expert) counts [K, E] of every rank and computes that global position exactly, so the
  same assignments are dropped as in one process.
- Switch load-balance loss E · Σᵢ fᵢ · Pᵢ: fᵢ is all-reduced (global fraction of assignments, no
  gradient); Pᵢ stays the rank's own mean probability. Each rank's loss E · Σ f_global · P_rank then
  averages over ranks to exactly the single-process loss (equal T per rank), and so do its gradients
  after the data-parallel gradient mean. The z-loss and sequence-wise loss are means over tokens or
  sequences already, so their per-rank values average to the global value unchanged.
- Statistics in `MoEAux` are global: load [E] is summed over ranks (so the aux-loss-free bias update,
  applied on every rank, stays identical everywhere and equals the single-process one), dropped_frac
  and router_entropy are global means, n_tokens is T_global.
- Gradients: each rank's loss is the mean over its own tokens; the objective is the mean of the
  ranks' losses. Replicated parameters: all-reduce-mean. Expert slices receive, through the all-to-all
  backward, the gradient of every rank's loss, i.e. N × the gradient of the mean: they are divided by
  N and never communicated (`moelab.parallel.runtime.sync_gradients`).
Expert choice routing is refused: an expert picks its top tokens from the whole batch, which would need
a global sort over all ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab import balance
from moelab.dispatch import Dispatch, combine, permute, token_choice_capacity
from moelab.experts import activate, grouped_ffn
from moelab.moe import MoE, MoEAux
from moelab.routing import Routing


def group_size(group=None) -> int:
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    return dist.get_rank(group)


@dataclass
class CommStats:
    """What this process's expert-parallel all-to-alls did since the last `reset()`: wall seconds spent in
    them (forward and backward; on CUDA the stream is synchronised around each call so that the time is
    the exchange's, not the queue's), rows sent to other ranks and rows received from them."""

    seconds: float = 0.0
    rows_sent: int = 0
    rows_received: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.seconds, self.rows_sent, self.rows_received, self.calls = 0.0, 0, 0, 0


comm_stats = CommStats()  # process-wide: one process is one rank


def _timed_all_to_all(out: Tensor, x: Tensor, out_splits, in_splits, group) -> None:
    sync = x.is_cuda and torch.cuda.is_available()
    if sync:
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    if sync:
        torch.cuda.synchronize(x.device)
    comm_stats.seconds += time.perf_counter() - t0
    comm_stats.calls += 1


class _AllToAllRows(torch.autograd.Function):
    """out = all_to_all_single(x) with uneven splits along dim 0; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        _timed_all_to_all(out, x.contiguous(), out_splits, in_splits, group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits), *grad_out.shape[1:]))
        _timed_all_to_all(grad_in, grad_out.contiguous(), in_splits, out_splits, ctx.group)
        return grad_in, None, None, None


def all_to_all_rows(x: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    """Send rows x[in_splits[q] block] to rank q, receive out_splits[q] rows from rank q; differentiable.

    Every rank of `group` must call it (also with zero rows), in the same order.
    """
    return _AllToAllRows.apply(x, out_splits, in_splits, group)


class ExpertParallelExperts(nn.Module):
    """The local slice of the stacked experts, w_in [El, D, H] and w_out [El, F, D], of rank r: global
    experts [r·El, (r+1)·El). Parameter names match `moelab.experts.Experts`, so a state dict differs
    from the single-process one only in the expert tensors' first dimension.

    `forward(x_AD, counts_E)` takes this rank's rows in global expert order and returns each row's
    (unweighted) expert output [A, D], as `Experts.forward` does: rows travel to the rank owning their
    expert and back. `routed` is the fused entry point's signature, built on `forward`.
    """

    def __init__(self, w_in: Tensor, w_out: Tensor, n_experts: int, activation: str, backend: str,
                 group=None) -> None:
        super().__init__()
        N, r = group_size(group), group_rank(group)
        if n_experts % N:
            raise ValueError(f"n_experts={n_experts} is not divisible by the expert-parallel world size {N}: "
                             "each rank must hold the same number of experts")
        El = n_experts // N
        self.n_experts, self.n_local, self.rank, self.world = n_experts, El, r, N
        self.activation, self.backend, self.group = activation, backend, group
        sl = slice(r * El, (r + 1) * El)
        self.w_in = nn.Parameter(w_in.detach()[sl].clone())
        self.w_out = nn.Parameter(w_out.detach()[sl].clone())
        self.w_in.expert_parallel = True  # marks: local slice, gradient never all-reduced
        self.w_out.expert_parallel = True
        self.last_exchange: dict[str, int] = {}  # rows sent/received by the last forward (benchmarks)

    def extra_repr(self) -> str:
        return f"experts {self.rank * self.n_local}..{(self.rank + 1) * self.n_local - 1} of {self.n_experts}"

    def forward(self, x_AD: Tensor, counts_E: Tensor) -> Tensor:
        N, El = self.world, self.n_local
        send_NL = counts_E.to(torch.long).view(N, El)
        recv_NL = torch.empty_like(send_NL)
        _timed_all_to_all(recv_NL, send_NL.contiguous(), None, None, self.group)  # counts [from rank, expert]
        send_splits = send_NL.sum(1).tolist()  # host sizes for the row exchange (one small read on the CPU)
        recv_splits = recv_NL.sum(1).tolist()
        self.last_exchange = {"rows_sent": sum(send_splits), "rows_received": sum(recv_splits),
                              "rows_kept_local": send_splits[self.rank]}
        comm_stats.rows_sent += sum(send_splits) - send_splits[self.rank]  # rows that leave this rank
        comm_stats.rows_received += sum(recv_splits) - recv_splits[self.rank]
        x_RD = all_to_all_rows(x_AD, recv_splits, send_splits, self.group)  # [R, D], rank-major
        order = _expert_major_order(recv_NL)
        counts_L = recv_NL.sum(0)
        out_RD = self._local_ffn(x_RD[order], counts_L)  # expert-major
        back_RD = torch.empty_like(out_RD).index_copy(0, order, out_RD) if order.numel() else out_RD
        return all_to_all_rows(back_RD, send_splits, recv_splits, self.group)  # [A, D], original order

    def _local_ffn(self, x_RD: Tensor, counts_L: Tensor) -> Tensor:
        if x_RD.shape[0] == 0:
            # keep the graph connected (the first all-to-all's backward must run on every rank) and
            # give the local weights a (zero) gradient, as the single-process stacked gradient has
            h = activate(x_RD @ self.w_in[0], self.activation)
            return h @ self.w_out[0]
        return grouped_ffn(x_RD, counts_L, self.w_in, self.w_out, self.activation, self.backend)

    def routed(self, x_TD: Tensor, token_idx: Tensor, weight_A: Tensor, counts: Tensor) -> Tensor:
        """y [T, D] = Σ over assignments of weight · expert(x[token]) (the fused path's contract)."""
        out_AD = self(x_TD[token_idx], counts)
        disp = Dispatch(token_idx=token_idx, weight=weight_A, counts=counts, n_dropped=counts.new_zeros(()))
        return combine(out_AD, disp, x_TD.shape[0])


def _expert_major_order(recv_NL: Tensor) -> Tensor:
    """Row indices that reorder received rows from [rank][expert] blocks to [expert][rank] blocks."""
    sizes = recv_NL.flatten()  # rank-major block sizes
    starts = (sizes.cumsum(0) - sizes).view_as(recv_NL)
    sizes_t, starts_t = recv_NL.t().flatten(), starts.t().flatten()  # expert-major blocks
    total = int(sizes.sum())
    new_starts = sizes_t.cumsum(0) - sizes_t
    shift = torch.repeat_interleave(starts_t - new_starts, sizes_t, output_size=total)
    return torch.arange(total, device=recv_NL.device) + shift


def global_capacity_permute(routing: Routing, n_experts: int, top_k: int, capacity_factor: float,
                            group=None) -> tuple[Dispatch, int]:
    """`dispatch.permute` with the capacity and drop decisions of the single-process run over the global
    batch (the ranks' token lists concatenated in rank order). Returns the dispatch and T_global."""
    E, K = n_experts, top_k
    T = routing.token_idx.numel() // K
    expert_idx = routing.expert_idx
    level = torch.arange(K, device=expert_idx.device).repeat_interleave(T)  # choice rank of each assignment
    local_KE = torch.bincount(level * E + expert_idx, minlength=K * E).view(K, E)
    mine = torch.cat([local_KE.flatten(), local_KE.new_tensor([T])])  # one all-gather: counts [K·E] and T
    gathered = [torch.empty_like(mine) for _ in range(group_size(group))]
    dist.all_gather(gathered, mine, group=group)
    all_NKE = torch.stack([g[:-1] for g in gathered]).view(-1, K, E)
    T_global = int(sum(int(g[-1]) for g in gathered))
    C = token_choice_capacity(capacity_factor, T_global, K, E)
    r = group_rank(group)
    # global position of the first assignment of (rank r, choice j, expert e) inside expert e's segment
    before_levels = all_NKE.sum(0).cumsum(0) - all_NKE.sum(0)  # [K, E]: earlier choices, all ranks
    before_ranks = all_NKE[:r].sum(0)  # [K, E]: same choice, lower ranks
    offset_KE = before_levels + before_ranks
    order = torch.sort(expert_idx, stable=True).indices
    counts = torch.bincount(expert_idx, minlength=E)
    e_sorted, j_sorted = expert_idx[order], level[order]
    pos_in_expert = torch.arange(order.numel(), device=order.device) - (counts.cumsum(0) - counts)[e_sorted]
    local_before_level = (local_KE.cumsum(0) - local_KE)[j_sorted, e_sorted]
    global_pos = offset_KE[j_sorted, e_sorted] + pos_in_expert - local_before_level
    keep = global_pos < C
    order = order[keep]
    kept_counts = torch.bincount(expert_idx[order], minlength=E)
    disp = Dispatch(token_idx=routing.token_idx[order], weight=routing.weight[order], counts=kept_counts,
                    n_dropped=(counts - kept_counts).sum())
    return disp, T_global


class ExpertParallelMoE(MoE):
    """An `MoE` layer whose routed experts are split over the ranks of `group` (see the module doc).

    Built from a single-process `MoE` by `apply_expert_parallel`: it shares that layer's router and
    shared experts and holds an `ExpertParallelExperts` with this rank's slice. Same call and return
    as `MoE`: y [..., D] and `MoEAux`, whose statistics are global and whose losses are this rank's
    share (their mean over ranks equals the single-process value).
    """

    def __init__(self, moe: MoE, group=None) -> None:
        nn.Module.__init__(self)
        cfg = moe.cfg
        if cfg.router == "expert_choice":
            raise ValueError("router='expert_choice' is not supported with expert parallelism: each expert "
                             "picks its tokens from the whole global batch; allowed: 'topk_softmax', 'switch', "
                             "'sigmoid'")
        self.cfg = cfg
        self.group = group
        self.router = moe.router
        self.experts = ExpertParallelExperts(moe.experts.w_in, moe.experts.w_out, cfg.n_experts, cfg.activation,
                                             cfg.backend, group)
        self.shared = moe.shared
        self.shared_gate = moe.shared_gate

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        cfg = self.cfg
        shape = x.shape
        x_TD = self._flatten(x)
        T = x_TD.shape[0]  # no early return for T = 0: every rank must join the collectives
        routing = self.router(x_TD)
        if cfg.capacity_factor is not None:
            disp, _ = global_capacity_permute(routing, cfg.n_experts, cfg.top_k, cfg.capacity_factor, self.group)
        else:
            disp = permute(routing, cfg.n_experts, None)
        out_AD = self.experts(x_TD[disp.token_idx], disp.counts)
        y_TD = self._add_shared(combine(out_AD, disp, T), x_TD)
        return y_TD.view(shape), self._global_aux(routing, disp, T, shape)

    def _global_aux(self, routing: Routing, disp: Dispatch, T: int, shape: torch.Size) -> MoEAux:
        cfg = self.cfg
        E = cfg.n_experts
        losses: dict[str, Tensor] = {}
        # one all-reduce for the statistics: [load E | dropped | assignments | tokens | entropy·T]
        with torch.no_grad():
            dev = routing.probs.device
            entropy_sum = balance.router_entropy(routing.probs).double() * T if T else torch.zeros((), device=dev)
            scalars = [disp.n_dropped, torch.tensor(routing.expert_idx.numel(), device=dev),
                       torch.tensor(T, device=dev), entropy_sum]
            stats = torch.cat([balance.expert_counts(routing.expert_idx, E).double(),
                               torch.stack([v.to(device=dev, dtype=torch.double) for v in scalars])])
            dist.all_reduce(stats, group=self.group)
        load = stats[:E].float()
        n_assign, n_tokens = stats[E + 1], stats[E + 2]
        if cfg.aux_loss_coef > 0:
            f_E = (load / n_assign).to(routing.probs.dtype)
            P_E = routing.probs.sum(dim=0) / max(T, 1)  # this rank's mean probability
            losses["load_balance"] = cfg.aux_loss_coef * E * (f_E * P_E).sum()
        if cfg.seq_aux_loss_coef > 0:
            seq_len = shape[-2] if len(shape) >= 3 else T
            losses["seq_aux"] = cfg.seq_aux_loss_coef * balance.seq_aux_loss(routing.probs, routing.topk_idx, seq_len)
        if cfg.z_loss_coef > 0:
            losses["z"] = cfg.z_loss_coef * balance.z_loss(routing.logits)
        return MoEAux(losses=losses, load=load, dropped_frac=(stats[E] / n_assign).float(),
                      router_entropy=(stats[E + 3] / n_tokens).float(), n_tokens=int(n_tokens))


def apply_expert_parallel(model: nn.Module, group=None, expert_parallel: int | None = None) -> nn.Module:
    """Swap every `MoE` layer of a built model (an `MoETransformer` or a bare `MoE`) for an
    `ExpertParallelMoE` holding this rank's expert slice; returns the model (a bare MoE is returned as
    its replacement). Call on every rank after building the same model with the same seed (or after
    loading the same full state), before creating the optimizer. `expert_parallel`, when given, is the
    rank count the run was configured for and must equal the group's size.

    Raises ValueError when n_experts is not divisible by the group size, when `expert_parallel` differs
    from it, or for the expert-choice router.
    """
    if not dist.is_initialized():
        raise RuntimeError("apply_expert_parallel needs torch.distributed initialised (see setup_from_env)")
    N = group_size(group)
    if expert_parallel is not None and expert_parallel != N:
        raise ValueError(f"expert_parallel={expert_parallel} does not match the process group's world size {N}")
    if isinstance(model, MoE):
        _check_divisible(model, N)
        return model if isinstance(model, ExpertParallelMoE) else ExpertParallelMoE(model, group)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)
               and not isinstance(m, ExpertParallelMoE)]
    for _, m in targets:
        _check_divisible(m, N)
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ExpertParallelMoE(m, group))
    return model


def _check_divisible(moe: MoE, N: int) -> None:
    if moe.cfg.n_experts % N:
        raise ValueError(f"n_experts={moe.cfg.n_experts} is not divisible by the expert-parallel world size "
                         f"{N}: choose a world size that divides n_experts")
