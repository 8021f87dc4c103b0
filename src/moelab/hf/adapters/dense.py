"""Dense families moelab reads (Llama, Mistral, Qwen2, Qwen3): the checkpoints `moelab upcycle` turns into MoEs.

A dense checkpoint maps to a moelab `ModelConfig` with `moe=None`: every block's FFN is the SwiGLU
`FeedForward` of width `intermediate_size` (the base adapter's `ffn_entries` table). The attention parts are the
base adapter's: Llama's optional `attention_bias` (refused on the output projection), Qwen2's q/k/v biases,
Qwen3's per-head q/k norm, Mistral's sliding window (max_seq_len capped at it, where attention is exact).
They are read (`moelab.hf.load`), never written: `moelab.hf.save` exports MoE architectures only.
"""

from __future__ import annotations

from typing import Any

from moelab.config.hf import HFConfig
from moelab.config.model import ModelConfig
from moelab.hf.adapters.base import Adapter, Check


class _Dense(Adapter):
    """A decoder whose every FFN is dense: n_dense_layers = n_layers, moe = None."""

    norm_eps = 1e-6

    def layout_fields(self, c: HFConfig, D: int, n_layers: int) -> dict[str, Any]:
        return {"n_dense_layers": n_layers, "moe_every": 1, "moe": None}

    def mismatch(self, cfg: ModelConfig) -> str | None:
        return f"{self.model_type} is read (moelab upcycle), not written: moelab exports Mixture-of-Experts models"

    def requirements(self, cfg: ModelConfig) -> list[Check]:
        return [(False, "a dense architecture")]


class Llama(_Dense):
    model_type, architecture = "llama", "LlamaForCausalLM"


class Mistral(_Dense):
    model_type, architecture = "mistral", "MistralForCausalLM"


class Qwen2(_Dense):
    model_type, architecture = "qwen2", "Qwen2ForCausalLM"


class Qwen3(_Dense):
    model_type, architecture = "qwen3", "Qwen3ForCausalLM"
