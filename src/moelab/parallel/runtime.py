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

from moelab.parallel.expert import apply_expert_parallel, expert_parallel_layers
from moelab.parallel.mesh import apply_fsdp, check_mesh, make_mesh
from moelab.parallel.mesh import clip_grad_norm_ as mesh_clip_grad_norm_

DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ParallelContext:
    """The expert-parallel group a training run spans (here: the whole world) and the few operations the
    training loop needs from it. `ParallelContext()` is the single-process run: every method is then the
    identity (or torch's own), so the loop has one code path for 1 and N processes.

    `owns_group`: `setup_from_env` created the process group, so `close()` destroys it.
    `mesh`: a (dp_shard, ep) `moelab.parallel.mesh.Mesh` — then `wrap` shards every parameter with FSDP2,
    `clip_grads_` leaves the reduction to FSDP, and checkpoints are sharded (moelab.runs.sharded).
    """

    rank: int = 0
    world: int = 1
    group: object = None
    owns_group: bool = False
    mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True for a torch.distributed run (even of one process launched by torchrun)."""
        return self.world > 1 or self.owns_group

    @property
    def comm_device(self) -> torch.device:
        """Where host numbers travel for collectives: the current CUDA device under NCCL, else the CPU."""
        if self.distributed and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def wrap(self, model: nn.Module, mixed_precision: bool = False) -> nn.Module:
        """The model with its MoE layers expert-parallel (identity for one process); on a mesh, every
        parameter sharded by FSDP2 (`mixed_precision`: bf16 compute, fp32 reduce)."""
        if self.mesh is not None:
            return apply_fsdp(model, self.mesh, mixed_precision)
        return apply_expert_parallel(model, self.group, self.world) if self.distributed else model

    def shard(self, x: Tensor) -> Tensor:
        """This rank's rows of a global batch (see `shard_batch`)."""
        return shard_batch(x, self.rank, self.world) if self.world > 1 else x

    def sum(self, value: float) -> float:
        """The sum of a Python number over the ranks (every rank gets it)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, group=self.group)
        return t.item()

    def mean(self, value: float) -> float:
        """The mean of a Python number over the ranks (every rank gets it)."""
        return self.sum(value) / self.world

    def gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's list of numbers (same length on every rank), indexed [rank][i]."""
        if not self.distributed:
            return [list(values)]
        mine = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine, group=self.group)
        return [p.tolist() for p in parts]

    def clip_grads_(self, model: nn.Module, max_norm: float) -> float:
        """Synchronise the gradients (`sync_gradients`) and clip their global norm; returns that norm."""
        if self.mesh is not None:  # FSDP reduced them; the expert gradients are rescaled
            return mesh_clip_grad_norm_(model, max_norm).item()
        if not self.distributed:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        sync_gradients(model, self.group)
        return clip_grad_norm_(model, max_norm, self.group).item()

    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The state dict in the single-process layout (collective under expert parallelism)."""
        return gather_expert_state(model) if self.distributed else model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state dict in the single-process layout (collective under expert parallelism)."""
        return gather_optimizer_state(optimizer, self.group) if self.distributed else optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a single-process-layout optimizer state dict, keeping this rank's expert slices."""
        if self.distributed:
            state = shard_optimizer_state(state, optimizer, self.rank, self.world)
        optimizer.load_state_dict(state)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_from_env(expert_parallel: int | None = None, timeout_s: float | None = None,
                   backend: str = "gloo", data_parallel_shard: int = 0,
                   n_experts: int | None = None) -> ParallelContext:
    """Initialise torch.distributed from the variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) and return the context; a no-op returning (0, 1) for a plain single-process run when
    `expert_parallel` is None or 1 and WORLD_SIZE is unset.

    `timeout_s` (default: env MOELAB_DIST_TIMEOUT or 60 s) bounds every collective: when a rank dies,
    the others raise instead of hanging (gloo usually notices a closed connection at once; a rank that
    hangs without dying is caught by the timeout).

    `data_parallel_shard` D >= 1: a (dp_shard D, ep expert_parallel) mesh (`moelab.parallel.mesh`) over
    WORLD_SIZE = D × expert_parallel processes; the mesh is checked against WORLD_SIZE and `n_experts`
    before any process-group work.

    Raises ValueError when `expert_parallel` (× `data_parallel_shard`) does not equal WORLD_SIZE.
    """
    if data_parallel_shard:
        return _setup_mesh(data_parallel_shard, expert_parallel or 1, timeout_s, backend, n_experts)
    world_env = os.environ.get("WORLD_SIZE")
    if world_env is None:
        if expert_parallel not in (None, 1):
            raise ValueError(f"expert_parallel={expert_parallel} needs {expert_parallel} processes, but WORLD_SIZE "
                             "is not set: launch with `torchrun --nproc-per-node "
                             f"{expert_parallel} -m moelab ...`")
        return ParallelContext()
    world = int(world_env)
    if expert_parallel is not None and expert_parallel != world:
        raise ValueError(f"expert_parallel={expert_parallel} does not match WORLD_SIZE={world}: expert "
                         "parallelism spans all processes; pass --expert-parallel equal to --nproc-per-node")
    if timeout_s is None:
        timeout_s = float(os.environ.get("MOELAB_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return ParallelContext(dist.get_rank(), dist.get_world_size(), None, owns)


def _setup_mesh(dp_shard: int, ep: int, timeout_s: float | None, backend: str,
                n_experts: int | None) -> ParallelContext:
    world_env = os.environ.get("WORLD_SIZE")
    world = int(world_env) if world_env is not None else 1
    if world_env is None and dp_shard * ep > 1:
        raise ValueError(f"data_parallel_shard={dp_shard} × expert_parallel={ep} needs {dp_shard * ep} processes, "
                         f"but WORLD_SIZE is not set: launch with `torchrun --nproc-per-node {dp_shard * ep} -m "
                         "moelab ...`")
    check_mesh(world, dp_shard, ep, n_experts)
    if world_env is None:
        return ParallelContext()  # a 1 × 1 mesh without torchrun: the plain one-process run
    if timeout_s is None:
        timeout_s = float(os.environ.get("MOELAB_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    mesh = make_mesh(dp_shard, ep, "cuda" if backend == "nccl" else "cpu")
    return ParallelContext(dist.get_rank(), dist.get_world_size(), None, owns, mesh)


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
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    dev = grads[0].device if grads else torch.device("cpu")
    rep_sq = torch.zeros((), dtype=torch.float64, device=dev)
    exp_sq = torch.zeros((), dtype=torch.float64, device=dev)
    for p in model.parameters():
        if p.grad is None:
            continue
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


def _is_expert_key(key: str) -> bool:
    return key in ("experts.w_in", "experts.w_out") or key.endswith((".experts.w_in", ".experts.w_out"))


@torch.no_grad()
def gather_expert_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict in the single-process layout: every expert tensor all-gathered from the
    ranks into the full stacked [E, ...] tensor (collective: call on every rank; each gets the full
    dict). Other tensors are replicated and taken from this rank."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for prefix, path in expert_parallel_layers(model).items():
        for name in ("experts.w_in", "experts.w_out"):
            key = f"{prefix}.{name}" if prefix else name
            local = state[key].contiguous()
            parts = [torch.empty_like(local) for _ in range(path.world)]
            dist.all_gather(parts, local, group=path.group)
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


def _params_in_state_order(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters in the numbering `optimizer.state_dict()` uses (groups in order, then params)."""
    return [p for g in optimizer.param_groups for p in g["params"]]


@torch.no_grad()
def gather_optimizer_state(optimizer: torch.optim.Optimizer, group=None) -> dict:
    """`optimizer.state_dict()` in the single-process layout: every per-parameter state tensor shaped like
    an expert slice (Adam's exp_avg, exp_avg_sq) all-gathered along dim 0 into the full stacked shape.
    Collective: call on every rank. Parameter numbering is unchanged (`apply_expert_parallel` keeps the
    single-process parameter order)."""
    state = optimizer.state_dict()
    out = {"state": {}, "param_groups": state["param_groups"]}
    world = dist.get_world_size(group)
    for idx, p in enumerate(_params_in_state_order(optimizer)):
        if idx not in state["state"]:
            continue
        pstate = dict(state["state"][idx])
        if is_expert_param(p):
            for name, v in pstate.items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    parts = [torch.empty_like(v) for _ in range(world)]
                    dist.all_gather(parts, v.contiguous(), group=group)
                    pstate[name] = torch.cat(parts)
        out["state"][idx] = pstate
    return out


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer, rank: int, world: int) -> dict:
    """A single-process-layout optimizer state dict → this rank's: per-parameter state tensors of expert
    parameters whose first dimension is the full expert count are sliced to the rank's experts. Pure."""
    out = {"state": {}, "param_groups": state["param_groups"]}
    for idx, p in enumerate(_params_in_state_order(optimizer)):
        if idx not in state["state"]:
            continue
        pstate = dict(state["state"][idx])
        if is_expert_param(p):
            El = p.shape[0]
            for name, v in pstate.items():
                if torch.is_tensor(v) and v.dim() == p.dim() and v.shape[0] == El * world:
                    pstate[name] = v[rank * El:(rank + 1) * El].clone()
        out["state"][idx] = pstate
    return out
