"""The MoE layer (moe.py) and its parts along the data's way: routers (routing.py), balancing losses and the
auxiliary-loss-free bias (balance.py), dispatch (dispatch.py), expert stores (experts.py, biased_experts.py), the
expert products (expert_ops.py, fused.py), the paths that run them and the one policy that picks a path (paths.py,
policy.py). Torch code only: no kernel is chosen here (docs/ARCHITECTURE.md)."""

from moelab.layer.moe import MoE, MoEAux

__all__ = ["MoE", "MoEAux"]
