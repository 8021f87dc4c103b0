"""Expert parallelism: E experts split evenly over the N ranks of a process group (GShard, Lepikhin et
al. 2020; Switch, Fedus et al. 2021), everything else data-parallel.

Legend: T = this rank's tokens, D = model width, E = experts, El = E / N experts per rank, K = experts
per token, A = this rank's kept assignments, R = rows this rank's experts receive, N = ranks.

`apply_expert_parallel(model)` keeps each MoE layer and installs the all-to-all path (`AllToAllPath`)
in it, with the layer's expert store cut to this rank's slice. One MoE layer on rank r:
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
- The losses and statistics come from the layer's own `moelab.layer.moe.layer_aux`, with the path's `reduce`
  (an all-reduce sum over the group): load [E] is summed over ranks (so the aux-loss-free bias update,
  applied on every rank, stays identical everywhere and equals the single-process one), dropped_frac
  and router_entropy are global means, n_tokens is T_global. The Switch loss E · Σᵢ fᵢ · Pᵢ takes the
  global fraction fᵢ (no gradient) and the rank's own mean probability Pᵢ, so each rank's loss averages
  over ranks to exactly the single-process loss (equal T per rank), and so do its gradients after the
  data-parallel gradient mean. The z-loss and sequence-wise loss are means over tokens or sequences
  already, so their per-rank values average to the global value unchanged.
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

from moelab.layer.dispatch import Dispatch, combine, permute, token_choice_capacity
from moelab.layer.experts import Experts
from moelab.layer.moe import MoE
from moelab.layer.paths import Path
from moelab.layer.policy import grouped_backend
from moelab.layer.routing import Routing


@dataclass
class ExchangeStats:
    """What one layer's all-to-alls did since the last reset: wall seconds spent in them (forward and
    backward; on CUDA the stream is synchronised around each call so that the time is the exchange's,
    not the queue's), rows sent to other ranks, rows received from them, and the number of calls."""

    seconds: float = 0.0
    rows_sent: int = 0
    rows_received: int = 0
    calls: int = 0

    def __add__(self, other: ExchangeStats) -> ExchangeStats:
        return ExchangeStats(self.seconds + other.seconds, self.rows_sent + other.rows_sent,
                             self.rows_received + other.rows_received, self.calls + other.calls)


def _timed_all_to_all(out: Tensor, x: Tensor, out_splits, in_splits, group, stats: ExchangeStats) -> None:
    sync = x.is_cuda and torch.cuda.is_available()
    if sync:
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    if sync:
        torch.cuda.synchronize(x.device)
    stats.seconds += time.perf_counter() - t0
    stats.calls += 1


class _AllToAllRows(torch.autograd.Function):
    """out = all_to_all_single(x) with uneven splits along dim 0; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group, stats: ExchangeStats) -> Tensor:
        ctx.splits, ctx.group, ctx.stats = (out_splits, in_splits), group, stats
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        _timed_all_to_all(out, x.contiguous(), out_splits, in_splits, group, stats)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits), *grad_out.shape[1:]))
        _timed_all_to_all(grad_in, grad_out.contiguous(), in_splits, out_splits, ctx.group, ctx.stats)
        return grad_in, None, None, None, None


def all_to_all_rows(x: Tensor, out_splits: list[int], in_splits: list[int], group=None,
                    stats: ExchangeStats | None = None) -> Tensor:
    """Send rows x[in_splits[q] block] to rank q, receive out_splits[q] rows from rank q; differentiable.
    Time and calls (forward and backward) are added to `stats` when given.

    Every rank of `group` must call it (also with zero rows), in the same order.
    """
    return _AllToAllRows.apply(x, out_splits, in_splits, group, stats if stats is not None else ExchangeStats())


class AllToAllPath(Path):
    """The expert-parallel path of one MoE layer: its store holds this rank's experts [r·El, (r+1)·El)
    of `n_experts`; rows in global expert order travel to the rank owning their expert and back (see
    the module doc). Holds this layer's `ExchangeStats` (`moelab.parallel.exchange_stats`)."""

    name = "all_to_all"

    def __init__(self, n_experts: int, group=None, batch_group=None) -> None:
        self.group = group  # the ranks the experts are split over (the exchange)
        # the ranks whose batches together form the global batch (statistics, capacity): `group` itself
        # for expert parallelism alone, the whole world on a (dp_shard, ep) mesh (moelab.parallel.mesh)
        self.batch_group = group if batch_group is None else batch_group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.n_experts, self.n_local = n_experts, n_experts // self.world
        self.stats = ExchangeStats()

    def __repr__(self) -> str:
        first = self.rank * self.n_local
        return f"AllToAllPath(experts {first}..{first + self.n_local - 1} of {self.n_experts}, rank {self.rank})"

    def reduce(self, t: Tensor) -> None:
        """Sum t in place over the batch group (the layer's statistics)."""
        dist.all_reduce(t, group=self.batch_group)

    def __call__(self, layer, x_TD, routing, dtype):
        cfg, T = layer.cfg, x_TD.shape[0]  # T may be 0 on some ranks: every rank joins the collectives
        if cfg.capacity_factor is not None:
            disp, _ = global_capacity_permute(routing, cfg.n_experts, cfg.top_k, cfg.capacity_factor,
                                              self.batch_group)
        else:
            disp = permute(routing, cfg.n_experts, None)
        out_AD = self._exchange(layer.experts, x_TD[disp.token_idx], disp.counts, cfg.backend, dtype)
        return combine(out_AD, disp, T), disp.n_dropped

    def _exchange(self, store: Experts, x_AD: Tensor, counts_E: Tensor, backend: str,
                  dtype: torch.dtype | None) -> Tensor:
        """This rank's rows in global expert order → their unweighted expert outputs [A, D]."""
        N, El = self.world, self.n_local
        send_NL = counts_E.to(torch.long).view(N, El)
        recv_NL = torch.empty_like(send_NL)
        _timed_all_to_all(recv_NL, send_NL.contiguous(), None, None, self.group, self.stats)  # counts [rank, expert]
        send_splits = send_NL.sum(1).tolist()  # host sizes for the row exchange (one small read on the CPU)
        recv_splits = recv_NL.sum(1).tolist()
        self.stats.rows_sent += sum(send_splits) - send_splits[self.rank]  # rows that leave this rank
        self.stats.rows_received += sum(recv_splits) - recv_splits[self.rank]
        x_RD = all_to_all_rows(x_AD, recv_splits, send_splits, self.group, self.stats)  # [R, D], rank-major
        order = _expert_major_order(recv_NL)
        out_RD = self._local_ffn(store, x_RD[order], recv_NL.sum(0), backend, dtype)  # expert-major
        back_RD = torch.empty_like(out_RD).index_copy(0, order, out_RD) if order.numel() else out_RD
        return all_to_all_rows(back_RD, send_splits, recv_splits, self.group, self.stats)  # [A, D], original order

    @staticmethod
    def _local_ffn(store: Experts, x_RD: Tensor, counts_L: Tensor, backend: str, dtype) -> Tensor:
        # a store sharded by FSDP2 (moelab.parallel.mesh) carries it as a registered forward method,
        # so that FSDP gathers its weights before and reduce-scatters their gradients after
        run = getattr(store, "ep_ffn", None)
        return run(x_RD, counts_L, backend, dtype) if run is not None else local_ffn(store, x_RD, counts_L, backend,
                                                                                    dtype)


def local_ffn(store: Experts, x_RD: Tensor, counts_L: Tensor, backend: str, dtype) -> Tensor:
    """The received rows [R, D] (expert-major, counts_L [El] rows per local expert) → their outputs [R, D]."""
    if x_RD.shape[0] == 0:
        # keep the graph connected (the first all-to-all's backward must run on every rank) and
        # give the local weights a (zero) gradient, as the single-process stacked gradient has
        return store.ffn(x_RD, 0, dtype)
    return store.forward(x_RD, counts_L, grouped_backend(backend, x_RD, store.stacked(dtype)), dtype)


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
    token_idx, expert_idx, weight = routing.assignments()
    T = token_idx.numel() // K
    level = torch.arange(K, device=expert_idx.device).repeat_interleave(T)  # choice rank of each assignment
    local_KE = torch.bincount(level * E + expert_idx, minlength=K * E).view(K, E)
    mine = torch.cat([local_KE.flatten(), local_KE.new_tensor([T])])  # one all-gather: counts [K·E] and T
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    all_NKE = torch.stack([g[:-1] for g in gathered]).view(-1, K, E)
    T_global = int(sum(int(g[-1]) for g in gathered))
    C = token_choice_capacity(capacity_factor, T_global, K, E)
    r = dist.get_rank(group)
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
    disp = Dispatch(token_idx=token_idx[order], weight=weight[order], counts=kept_counts,
                    n_dropped=(counts - kept_counts).sum())
    return disp, T_global


def expert_parallel_layers(model: nn.Module) -> dict[str, AllToAllPath]:
    """Every MoE layer of `model` (or `model` itself) with an all-to-all path installed, by module name."""
    return {name: m.path for name, m in model.named_modules() if isinstance(m, MoE)
            and isinstance(m.path, AllToAllPath)}


def apply_expert_parallel(model: nn.Module, group=None, expert_parallel: int | None = None,
                          batch_group=None) -> nn.Module:
    """Make every `MoE` layer of a built model (an `MoETransformer` or a bare `MoE`) expert-parallel over
    `group`, in place: its expert store keeps this rank's slice of the experts and the all-to-all path is
    installed in it. Returns the model. Call on every rank after building the same model with the same
    seed (or after loading the same full state), before creating the optimizer: the parameters keep their
    single-process order and names. Layers already expert-parallel are left as they are.
    `expert_parallel`, when given, is the rank count the run was configured for and must equal the
    group's size. `batch_group` (default `group`): the ranks whose batches form the global batch, over
    which the layer statistics and capacity decisions are taken (`AllToAllPath`).

    Raises ValueError when n_experts is not divisible by the group size, when `expert_parallel` differs
    from it, or for the expert-choice router.
    """
    if not dist.is_initialized():
        raise RuntimeError("apply_expert_parallel needs torch.distributed initialised (see setup_from_env)")
    N = dist.get_world_size(group)
    if expert_parallel is not None and expert_parallel != N:
        raise ValueError(f"expert_parallel={expert_parallel} does not match the process group's world size {N}")
    layers = [m for m in model.modules() if isinstance(m, MoE) and not isinstance(m.path, AllToAllPath)]
    for moe in layers:  # check them all before changing any
        _check_layer(moe, N)
    r = dist.get_rank(group)
    for moe in layers:
        El = moe.cfg.n_experts // N
        moe.experts.keep(r * El, (r + 1) * El)
        moe.path = AllToAllPath(moe.cfg.n_experts, group, batch_group)
    return model


def _check_layer(moe: MoE, N: int) -> None:
    if moe.cfg.router == "expert_choice":
        raise ValueError("router='expert_choice' is not supported with expert parallelism: each expert "
                         "picks its tokens from the whole global batch; allowed: 'topk_softmax', 'switch', "
                         "'sigmoid'")
    if moe.cfg.n_experts % N:
        raise ValueError(f"n_experts={moe.cfg.n_experts} is not divisible by the expert-parallel world size "
                         f"{N}: choose a world size that divides n_experts")
    if not isinstance(moe.experts, Experts):
        raise ValueError(f"expert parallelism needs the stacked dense expert store (moelab.layer.experts.Experts); "
                         f"this layer holds {type(moe.experts).__name__}")


def exchange_stats(model: nn.Module, reset: bool = False) -> ExchangeStats:
    """The all-to-all statistics of this process, summed over the model's expert-parallel layers, since
    the last reset (zero for a model without them); `reset=True` zeroes the counters after reading."""
    total = ExchangeStats()
    for path in expert_parallel_layers(model).values():
        total = total + path.stats
        if reset:
            path.stats = ExchangeStats()
    return total
