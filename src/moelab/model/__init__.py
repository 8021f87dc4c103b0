"""The language model: RMSNorm (norm.py), rotary embeddings and YaRN (rope.py), the initialisation rule (init.py),
attention and MLA (attention.py, attend.py), the KV cache (cache.py), blocks and the transformer (transformer.py).
Torch code only: an inference engine is installed from outside (`moelab.inference.engine`)."""

from moelab.model.cache import KVCache
from moelab.model.transformer import Block, ModelOutput, MoETransformer

__all__ = ["Block", "KVCache", "ModelOutput", "MoETransformer"]
