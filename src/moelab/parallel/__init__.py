"""Training on many processes with torch.distributed. See docs/PARALLEL.md.

The (dp_shard, ep) mesh (`moelab.parallel.mesh`: experts over "ep", every parameter sharded by FSDP2):

    ctx = setup_from_env(expert_parallel=N, data_parallel_shard=D, n_experts=E)   # D × N processes
    model = apply_fsdp(MoETransformer(cfg), ctx.mesh)  # then: forward, backward, mesh.clip_grad_norm_, step

Expert parallelism alone: the routed experts of every MoE layer split evenly over the ranks, tokens
exchanged with all-to-all, everything else replicated and data-parallel:

    ctx = setup_from_env(expert_parallel=N)          # torchrun sets RANK / WORLD_SIZE / MASTER_*
    model = apply_expert_parallel(MoETransformer(cfg))   # same seed on every rank; installs the all-to-all path
    out = model(shard_batch(x, ctx.rank, ctx.world), targets=shard_batch(y, ctx.rank, ctx.world))
    (out.loss + out.aux_loss).backward()
    sync_gradients(model); clip_grad_norm_(model, 1.0); optimizer.step()
    stats = exchange_stats(model, reset=True)        # all-to-all seconds and rows since the last reset
    full = gather_expert_state(model)                # single-process layout, for checkpoints
    model.load_state_dict(shard_expert_state(full, ctx.rank, ctx.world))
"""

from moelab.parallel.expert import (
    AllToAllPath,
    ExchangeStats,
    all_to_all_rows,
    apply_expert_parallel,
    exchange_stats,
    expert_parallel_layers,
    global_capacity_permute,
)
from moelab.parallel.mesh import Mesh, apply_fsdp, check_mesh, local_bytes, make_mesh
from moelab.parallel.runtime import (
    ParallelContext,
    clip_grad_norm_,
    gather_expert_state,
    is_expert_param,
    setup_from_env,
    shard_batch,
    shard_expert_state,
    sync_gradients,
)

__all__ = [
    "AllToAllPath", "ExchangeStats", "Mesh", "ParallelContext", "all_to_all_rows", "apply_expert_parallel",
    "apply_fsdp", "check_mesh", "local_bytes", "make_mesh",
    "clip_grad_norm_", "exchange_stats", "expert_parallel_layers", "gather_expert_state",
    "global_capacity_permute", "is_expert_param", "setup_from_env", "shard_batch", "shard_expert_state",
    "sync_gradients",
]
