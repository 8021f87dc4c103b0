"""The initialisation rule: weights from N(0, INIT_STD), projections into the residual stream from
N(0, INIT_STD / sqrt(2·n_layers)) (GPT-2, Radford et al. 2019), biases zero, norms one."""

from __future__ import annotations

import math

from torch import nn

from moelab.config.model import ModelConfig
from moelab.layer.experts import INIT_STD


def residual_std(cfg: ModelConfig) -> float:
    """The initial std of projections into the residual stream: INIT_STD / sqrt(2·n_layers) (GPT-2,
    Radford et al. 2019); every other weight is drawn from N(0, INIT_STD), biases zero, norms one."""
    return INIT_STD / math.sqrt(2 * cfg.n_layers)


def init_linear(linear: nn.Linear, std: float = INIT_STD) -> nn.Linear:
    """linear with its weight drawn from N(0, std²) and its bias zero (the rule `residual_std` states)."""
    nn.init.normal_(linear.weight, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear
