"""The optimizer and the learning-rate schedule of the training loop (`moelab.training.train`).

AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only; the learning rate rises linearly over
`warmup_steps`, then follows a cosine from `lr` down to `lr · min_lr_ratio` at the last step.
"""

from __future__ import annotations

import math

import torch

from moelab.config.train import TrainConfig
from moelab.model.transformer import MoETransformer


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then cosine from lr to lr·min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: MoETransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (embeddings, projections, experts, routers); the fused
    implementation (one kernel over all parameters) where torch has it for the parameters' device."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype in this torch build
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
