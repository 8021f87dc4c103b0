"""Configs, validated in one place (no torch: `moelab.accounting` reads them on machines without it).

    MoEConfig     one Mixture-of-Experts layer                       (config/model.py)
    ModelConfig   a decoder-only language model built from them      (config/model.py)
    RopeScaling   its optional YaRN context extension                (config/rope.py)
    TrainConfig   how to train one; PRESETS, preset, with_overrides  (config/train.py)
    HFConfig      the one reader of a Hugging Face config.json       (config/hf.py; per-architecture meaning
                  of its fields in config/hf_arch.py)

Every config is a frozen dataclass whose `validate()` runs on construction and raises ValueError naming the
field, the value and what is allowed (the validators and the JSON round trip: config/fields.py).
"""

from moelab.config.fields import field_help
from moelab.config.model import (
    ACTIVATIONS,
    ATTENTIONS,
    BACKENDS,
    EXPERT_ACTIVATIONS,
    QK_NORMS,
    ROUTERS,
    ModelConfig,
    MoEConfig,
)
from moelab.config.rope import ROPE_SCALINGS, RopeScaling
from moelab.config.train import DTYPES, PRESETS, TrainConfig, check_device_name, preset, with_overrides

__all__ = ["MoEConfig", "ModelConfig", "RopeScaling", "TrainConfig", "PRESETS", "preset", "with_overrides",
           "check_device_name", "field_help", "ROUTERS", "ACTIVATIONS", "EXPERT_ACTIVATIONS", "BACKENDS",
           "ATTENTIONS", "QK_NORMS", "ROPE_SCALINGS", "DTYPES"]
