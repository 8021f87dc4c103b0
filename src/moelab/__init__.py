"""moelab: Mixture-of-Experts transformers in PyTorch.

Public names (see docs/ARCHITECTURE.md):
    MoEConfig, ModelConfig   -- configs (no torch needed)
    MoE, MoEAux              -- the MoE layer and what it returns besides its output
    MoETransformer           -- the decoder-only language model

Torch-backed names are imported lazily so that `moelab.accounting` and `moelab.config` work on a
machine without torch.
"""

from moelab.config import ModelConfig, MoEConfig

__version__ = "0.1.0"
__all__ = ["MoEConfig", "ModelConfig", "MoE", "MoEAux", "MoETransformer", "__version__"]

_LAZY = {"MoE": "moelab.layer.moe", "MoEAux": "moelab.layer.moe", "MoETransformer": "moelab.model.transformer"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moelab' has no attribute {name!r}")
