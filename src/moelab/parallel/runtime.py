"""Running expert parallelism: process-group setup from the launcher's environment, batch sharding,
gradient synchronisation and clipping, and checkpoint state in the single-process layout.

Data-parallel semantics (see `moelab.parallel.expert`): the training objective is the mean of the
ranks' losses (each the mean over its own tokens), which equals the single-process loss on the
concatenated batch when every rank has the same number of tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.parallel.expert import ExpertParallelExperts

DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ParallelContext:
    """rank and world size of the expert-parallel group (here: the whole world), and the group."""

    rank: int
    world: int
    group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_from_env(expert_parallel: int | None = None, timeout_s: float | None = None,
                   backend: str = "gloo") -> ParallelContext:
    """Initialise torch.distributed from the variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) and return the context; a no-op returning (0, 1) for a plain single-process run when
    `expert_parallel` is None or 1 and WORLD_SIZE is unset.

    `timeout_s` (default: env MOELAB_DIST_TIMEOUT or 60 s) bounds every collective: when a rank dies,
    the others raise instead of hanging (gloo usually notices a closed connection at once; a rank that
    hangs without dying is caught by the timeout).

    Raises ValueError when `expert_parallel` does not equal WORLD_SIZE.
    """
    world_env = os.environ.get("WORLD_SIZE")
    if world_env is None:
        if expert_parallel not in (None, 1):
            raise ValueError(f"expert_parallel={expert_parallel} needs {expert_parallel} processes, but WORLD_SIZE "
                             "is not set: launch with `torchrun --nproc-per-node "
                             f"{expert_parallel} -m moelab ...`")
        return ParallelContext(0, 1, None)
    world = int(world_env)
    if expert_parallel is not None and expert_parallel != world:
        raise ValueError(f"expert_parallel={expert_parallel} does not match WORLD_SIZE={world}: expert "
                         "parallelism spans all processes; pass --expert-parallel equal to --nproc-per-node")
    if timeout_s is None:
        timeout_s = float(os.environ.get("MOELAB_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return ParallelContext(dist.get_rank(), dist.get_world_size(), None)


def shard_batch(x: Tensor, rank: int, world: int) -> Tensor:
    """Rank `rank`'s share of a global batch along dim 0: rows [rank·B/N, (rank+1)·B/N).

    Every rank draws the same global batch (same data seed) and keeps its slice, so the global batch
    is exactly what a single process would see. Raises ValueError when B is not divisible by N.
    """
    B = x.shape[0]
    if B % world:
        raise ValueError(f"batch_size={B} is not divisible by the expert-parallel world size {world}: each rank "
                         "must get the same number of sequences")
    n = B // world
    return x[rank * n:(rank + 1) * n]


def is_expert_param(p: Tensor) -> bool:
    return getattr(p, "expert_parallel", False)


@torch.no_grad()
def sync_gradients(model: nn.Module, group=None) -> None:
    """Make the gradients those of the mean of the ranks' losses: replicated parameters are
    all-reduce-averaged (one flat all-reduce); expert slices are divided by the world size (their
    all-to-all backward already summed every rank's contribution) and stay local.

    Call after backward (after all micro-batches) and before clipping / the optimizer step. A
    replicated parameter without a gradient is given a zero one (the ranks run the same graph, so
    this only happens for parameters unused everywhere).
    """
    N = dist.get_world_size(group)
    replicated = [p for p in model.parameters() if p.requires_grad and not is_expert_param(p)]
    for p in model.parameters():
        if p.requires_grad and is_expert_param(p) and p.grad is not None:
            p.grad.div_(N)
    if not replicated:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in replicated]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat.div_(N)
    offset = 0
    for p, g in zip(replicated, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, group=None) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` over the whole (virtual single-process) model: the global norm
    counts the replicated gradients once and every rank's expert slices; every rank applies the same
    scale. Call after `sync_gradients`. Returns the total norm (float32 scalar)."""
    rep_sq = torch.zeros((), dtype=torch.float64)
    exp_sq = torch.zeros((), dtype=torch.float64)
    grads = []
    for p in model.parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        sq = p.grad.double().square().sum()
        if is_expert_param(p):
            exp_sq += sq
        else:
            rep_sq += sq
    dist.all_reduce(exp_sq, group=group)
    total = (rep_sq + exp_sq).sqrt().float()
    if max_norm and max_norm != float("inf"):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return total


def _expert_layers(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


def _is_expert_key(key: str) -> bool:
    return key in ("experts.w_in", "experts.w_out") or key.endswith((".experts.w_in", ".experts.w_out"))


@torch.no_grad()
def gather_expert_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict in the single-process layout: every expert tensor all-gathered from the
    ranks into the full stacked [E, ...] tensor (collective: call on every rank; each gets the full
    dict). Other tensors are replicated and taken from this rank."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for prefix, layer in _expert_layers(model).items():
        for name in ("w_in", "w_out"):
            key = f"{prefix}.{name}" if prefix else name
            local = state[key].contiguous()
            parts = [torch.empty_like(local) for _ in range(layer.world)]
            dist.all_gather(parts, local, group=layer.group)
            state[key] = torch.cat(parts)
    return state


def shard_expert_state(state: dict[str, Tensor], rank: int, world: int) -> dict[str, Tensor]:
    """A single-process-layout state dict → rank `rank`'s state for `world` expert-parallel ranks: every
    stacked expert tensor (keys ending in "experts.w_in" / "experts.w_out") keeps its slice
    [rank·E/world, (rank+1)·E/world); everything else is unchanged. Pure (no communication), so a
    checkpoint written with any N loads with any other N that divides E.

    Raises ValueError when E is not divisible by `world` or `rank` is out of range.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} is invalid for world={world}: allowed 0 <= rank < world")
    out = dict(state)
    for key, t in state.items():
        if not _is_expert_key(key):
            continue
        E = t.shape[0]
        if E % world:
            raise ValueError(f"{key}: n_experts={E} is not divisible by the expert-parallel world size {world}")
        n = E // world
        out[key] = t[rank * n:(rank + 1) * n].clone()
    return out
