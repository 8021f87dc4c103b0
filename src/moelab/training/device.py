"""Where and in what precision training runs: the device checked before anything is written, and bfloat16
autocast (except on a mesh, where FSDP's MixedPrecisionPolicy casts)."""

from __future__ import annotations

import torch

from moelab.config.train import TrainConfig, check_device_name
from moelab.parallel import ParallelContext


def autocast(cfg: TrainConfig, ctx: ParallelContext):
    """bfloat16 autocast for dtype="bfloat16" — except on a mesh, where FSDP's MixedPrecisionPolicy does it."""
    enabled = cfg.dtype == "bfloat16" and ctx.mesh is None
    return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=enabled)


def check_device(device: str) -> None:
    """Fail early, naming the field, when `device` is not a moelab device or not present on this machine."""
    check_device_name(device)
    if device == "cpu":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = torch.device(device).index or 0
    if index >= count:
        allowed = "'cpu'" + (f", 'cuda' or 'cuda:N' with N < {count}" if count else "")
        raise ValueError(f"device={device!r} is invalid here: this torch build ({torch.__version__}) sees "
                         f"{count} CUDA device(s); allowed: {allowed}")
