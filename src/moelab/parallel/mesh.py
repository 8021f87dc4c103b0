"""A 2-D device mesh on PyTorch's own engines: expert parallelism over one dimension, FSDP2 over every
parameter (torchtitan's dp_shard × ep; Megatron's expert-data-parallel group; FSDP2 = per-parameter
sharding on DTensor, `torch.distributed.fsdp.fully_shard`). See docs/PARALLEL.md.

Legend: W = D · N ranks; D = dp_shard size, N = ep size; rank (d, e) = d · N + e; E = experts per MoE
layer, El = E / N experts per ep rank; B = global batch (sequences).

    mesh = make_mesh(dp_shard=D, expert_parallel=N)      # after init_process_group, every rank
    model = apply_fsdp(MoETransformer(cfg), mesh)        # same seed on every rank; before the optimizer
    out = model(shard_batch(x, rank, W), targets=shard_batch(y, rank, W))
    (out.loss + out.aux_loss).backward()                 # FSDP reduce-scatters the gradients
    clip_grad_norm_(model, 1.0); optimizer.step()        # scales the expert gradients, then clips

What each parameter is and who reduces its gradient (the objective is the mean of the W ranks' losses,
each the mean over its own B / W sequences, = the single-process loss on the concatenated batch):
- Routed experts of a MoE layer: rank (d, e) owns experts [e·El, (e+1)·El) (`apply_expert_parallel`
  over the "ep" group, tokens exchanged by all-to-all inside it), and FSDP shards that slice over the D
  ranks of "dp_shard" that own the same experts. The all-to-all backward already sums the N ep ranks'
  contributions, FSDP's reduce-scatter averages over D, so the gradient is N × that of the mean loss:
  `clip_grad_norm_` divides it by N (FSDP2's `set_gradient_divide_factor` would say the same, but it
  reduces with PREMUL_SUM, which gloo refuses: "Cannot use ReduceOp.PREMUL_SUM with Gloo").
- Everything else (embeddings, attention, norms, routers, shared experts, head): sharded by FSDP over
  all W ranks (the flattened mesh), gradients averaged over W by its reduce-scatter.
- The MoE statistics (expert load, dropped fraction, T_global) and capacity decisions are taken over
  all W ranks (the path's batch group), so the auxiliary-loss-free bias update is the same everywhere
  and equals the single-process one.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard

from moelab.layer.moe import MoE
from moelab.parallel.expert import AllToAllPath, apply_expert_parallel, local_ffn

MESH_DIMS = ("dp_shard", "ep")


def check_mesh(world: int, dp_shard: int, expert_parallel: int, n_experts: int | None = None) -> None:
    """Refuse, before any process-group work, a mesh that does not fit: dp_shard × expert_parallel must
    equal the world size and expert_parallel must divide n_experts. Raises ValueError naming the numbers."""
    for name, value in (("data_parallel_shard", dp_shard), ("expert_parallel", expert_parallel)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: allowed an integer >= 1")
    if dp_shard * expert_parallel != world:
        raise ValueError(f"data_parallel_shard={dp_shard} × expert_parallel={expert_parallel} = "
                         f"{dp_shard * expert_parallel} does not match the world size {world}: launch "
                         f"{dp_shard * expert_parallel} processes (torchrun --nproc-per-node) or change the mesh")
    if n_experts is not None and n_experts % expert_parallel:
        raise ValueError(f"n_experts={n_experts} is not divisible by expert_parallel={expert_parallel}: choose an "
                         "expert_parallel that divides n_experts")


class Mesh:
    """The (dp_shard, ep) `DeviceMesh` and the two views of it the model needs: `flat`, the whole world
    in rank order (non-expert parameters, the batch), and `expert_layout`, the same ranks as an
    ("ep", "dp_shard") mesh, which describes where an expert tensor's rows live globally (checkpoints:
    rows [e·El, (e+1)·El) on ep rank e, that slice split over dp_shard as FSDP splits it)."""

    def __init__(self, dp_shard: int, expert_parallel: int, device_type: str = "cpu") -> None:
        self.dp_shard, self.ep = dp_shard, expert_parallel
        self.device_mesh = init_device_mesh(device_type, (dp_shard, expert_parallel), mesh_dim_names=MESH_DIMS)
        self.flat = self.device_mesh._flatten("world")
        ranks = torch.arange(dp_shard * expert_parallel).view(dp_shard, expert_parallel).t().contiguous()
        self.expert_layout = DeviceMesh(device_type, ranks, mesh_dim_names=("ep", "dp_shard"))

    def __repr__(self) -> str:
        return f"Mesh(dp_shard={self.dp_shard}, ep={self.ep}, rank={dist.get_rank()})"

    @property
    def world(self) -> int:
        return self.dp_shard * self.ep


def make_mesh(dp_shard: int, expert_parallel: int, device_type: str = "cpu") -> Mesh:
    """The mesh for an initialised process group of dp_shard × expert_parallel ranks (checked first)."""
    if not dist.is_initialized():
        raise RuntimeError("make_mesh needs torch.distributed initialised (see moelab.parallel.setup_from_env)")
    check_mesh(dist.get_world_size(), dp_shard, expert_parallel)
    return Mesh(dp_shard, expert_parallel, device_type)


def expert_stores(model: nn.Module) -> list[nn.Module]:
    """The expert stores of the model's expert-parallel MoE layers."""
    return [m.experts for m in model.modules() if isinstance(m, MoE) and isinstance(m.path, AllToAllPath)]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for store in expert_stores(model) for p in store.parameters()]


def apply_fsdp(model: nn.Module, mesh: Mesh, mixed_precision: bool = False) -> nn.Module:
    """Shard a built model (an `MoETransformer` or a bare `MoE`) over `mesh`, in place: experts split over
    "ep" (`apply_expert_parallel`, statistics over the whole world), each expert store sharded by
    `fully_shard` over "dp_shard", each transformer block and then the root over the flattened mesh.
    `mixed_precision`: FSDP's MixedPrecisionPolicy (parameters gathered and computed in bfloat16,
    gradients reduced in float32; the sharded weights and the optimizer stay float32). Call on every
    rank after building the same model from the same seed, before creating the optimizer. Returns it."""
    n_experts = {m.cfg.n_experts for m in model.modules() if isinstance(m, MoE)}
    for E in sorted(n_experts):
        check_mesh(mesh.world, mesh.dp_shard, mesh.ep, E)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    apply_expert_parallel(model, mesh.device_mesh.get_group("ep"), mesh.ep, batch_group=mesh.flat.get_group())
    for store in expert_stores(model):
        fully_shard(store, mesh=mesh.device_mesh["dp_shard"], mp_policy=policy)
        store.ep_ffn = functools.partial(local_ffn, store)  # the path calls it; FSDP hooks around it
        register_fsdp_forward_method(store, "ep_ffn")
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh.flat, mp_policy=policy)
    fully_shard(model, mesh=mesh.flat, mp_policy=policy)
    return model


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> Tensor:
    """After backward on a model `apply_fsdp` sharded: divide the expert gradients by the ep size (see the
    module doc), then clip the global gradient norm as `torch.nn.utils.clip_grad_norm_` on the single-
    process model would. Every element of every parameter lives on exactly one rank, so
    ‖g‖² = all_reduce_sum over the world of Σ ‖local shard‖². Returns the norm (float32 scalar)."""
    N = max((m.path.world for m in model.modules() if isinstance(m, MoE) and isinstance(m.path, AllToAllPath)),
            default=1)
    for p in expert_parameters(model):
        if p.grad is not None:
            _local(p.grad).div_(N)
    grads = [_local(p.grad) for p in model.parameters() if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
    for g in grads:
        sq += g.double().square().sum()
    dist.all_reduce(sq)
    total = sq.sqrt().float()
    if max_norm and max_norm != float("inf"):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return total


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[int, int]:
    """(parameter bytes, optimizer-state bytes) this rank holds: the local shards of its tensors."""
    params = sum(_local(p).numel() * p.element_size() for p in model.parameters())
    state = 0
    if optimizer is not None:
        for pstate in optimizer.state.values():
            for v in pstate.values():
                if torch.is_tensor(v) and v.dim() > 0:
                    state += _local(v).numel() * v.element_size()
    return params, state


# -------------------------------------------------------------------------------- checkpoint layout
def _is_expert_fqn(key: str) -> bool:
    return key.endswith((".experts.w_in", ".experts.w_out")) or key in ("experts.w_in", "experts.w_out")


def _global_expert(t: Tensor, mesh: Mesh) -> Tensor:
    """This rank's FSDP shard of its ep slice → a DTensor over `mesh.expert_layout` with the global
    [E, ...] shape (no copy: it shares the shard's storage, so loading into it loads the parameter)."""
    local = _local(t)
    El = t.shape[0]  # the ep slice's rows (the FSDP DTensor's global shape)
    shape = (El * mesh.ep, *t.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh.expert_layout, [Shard(0), Shard(0)], run_check=False, shape=shape,
                              stride=stride)


def checkpoint_view(state: dict, mesh: Mesh | None) -> list[tuple[dict, str, Tensor]]:
    """Replace, in place, the expert tensors of {"model": model state dict, "optim": optimizer state dict}
    (as `torch.distributed.checkpoint.state_dict.get_state_dict` returns them, keyed by parameter name) by
    their global-layout views (`_global_expert`), so that a checkpoint holds every expert once, at its
    global rows, whatever the mesh. Returns (container, key, original) to put back after a load."""
    swaps: list[tuple[dict, str, Tensor]] = []
    if mesh is None:
        return swaps
    model_sd = state["model"]
    for key in [k for k in model_sd if _is_expert_fqn(k)]:
        swaps.append((model_sd, key, model_sd[key]))
        model_sd[key] = _global_expert(model_sd[key], mesh)
    optim_state = state["optim"].get("state", {}) if "optim" in state else {}
    for fqn in [k for k in optim_state if _is_expert_fqn(k)]:
        # a copy: get_optimizer_state_dict may hand out the optimizer's own per-parameter dicts
        optim_state[fqn] = pstate = dict(optim_state[fqn])
        for name, v in list(pstate.items()):
            if isinstance(v, DTensor) and v.dim() >= 1:
                swaps.append((pstate, name, v))
                pstate[name] = _global_expert(v, mesh)
    return swaps
