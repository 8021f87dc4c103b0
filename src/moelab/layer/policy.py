"""Which path runs an MoE layer's routed experts (`moelab.layer.paths`): the one place where it is decided.

`choose_path(layer, x_TD, routing)`, in order:
1. A path installed on the layer (`layer.path`, e.g. expert parallelism's all-to-all) runs.
2. A configured backend other than "auto" runs the grouped path with that backend ("grouped_mm" must
   be usable: `grouped_backend`).
3. Backend "auto":
   - a decode step — one token, under no_grad, token-choice router, on the CPU — takes the decode path;
   - off the CPU, or with a store that has no stacked dense weights: the grouped path with grouped_mm
     where usable, else the loop (on a GPU the fused path's host-side segment sizes would cost a
     device sync per layer);
   - experts smaller than d·f = FUSED_MIN_EXPERT_SIZE take the grouped loop (its per-expert ops stay
     in autograd's C++ engine, where the fused path pays Python per expert);
   - an inference batch of at most INFERENCE_GROUPED_MAX_ROWS assignments takes one grouped_mm over
     all segments where usable (the fused path's ~10 small ops per expert cost more there);
   - everything else takes the fused path.
The thresholds are measured crossovers on a 2-core AMD EPYC; the measurements are in
docs/BENCHMARKS.md ("Path policy").
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.layer.expert_ops import GROUPED_BACKENDS, grouped_mm_usable
from moelab.layer.paths import DecodePath, FusedPath, GroupedPath, Path, RoutedLayer
from moelab.layer.routing import Routing

FUSED_MIN_EXPERT_SIZE = 512 * 256
INFERENCE_GROUPED_MAX_ROWS = 4096

DECODE, FUSED = DecodePath(), FusedPath()
GROUPED = {backend: GroupedPath(backend) for backend in GROUPED_BACKENDS}


def grouped_backend(requested: str, x: Tensor, stacked: tuple[Tensor, Tensor] | None) -> str:
    """The grouped backend that runs for `requested` ("auto", "loop", "padded", "grouped_mm") on x's
    device and dtype with the store's stacked weights (None: a per-expert store, which runs the loop).
    Raises ValueError for "grouped_mm" where it cannot run."""
    if stacked is None:
        return "loop"
    usable = grouped_mm_usable(x, *stacked)
    if requested == "auto":
        return "grouped_mm" if usable and x.device.type != "cpu" else "loop"
    if requested == "grouped_mm" and not usable:
        w_in, w_out = stacked
        raise ValueError(
            f"backend='grouped_mm' is not usable for dtype {x.dtype} on {x.device.type} with widths "
            f"{tuple(w_in.shape[1:])}/{tuple(w_out.shape[1:])} (needs torch.nn.functional.grouped_mm, "
            "float32/bfloat16/float16 and 16-byte-aligned widths); allowed: 'auto', 'loop', 'padded'"
        )
    return requested


def choose_path(layer: RoutedLayer, x_TD: Tensor, routing: Routing) -> Path:
    """The path for this forward (module docstring); x_TD in the dtype the experts compute in."""
    if layer.path is not None:
        return layer.path
    stacked = layer.experts.stacked()
    if layer.cfg.backend != "auto":
        return GROUPED[grouped_backend(layer.cfg.backend, x_TD, stacked)]
    cpu, grad = x_TD.device.type == "cpu", torch.is_grad_enabled()
    if cpu and x_TD.shape[0] == 1 and routing.topk_idx is not None and not grad:
        return DECODE
    if not cpu or stacked is None:
        return GROUPED[grouped_backend("auto", x_TD, stacked)]
    w_in, w_out = stacked
    if w_in.shape[1] * w_out.shape[1] < FUSED_MIN_EXPERT_SIZE:
        return GROUPED["loop"]
    if not grad and routing.n_assignments <= INFERENCE_GROUPED_MAX_ROWS and grouped_mm_usable(x_TD, w_in, w_out):
        return GROUPED["grouped_mm"]
    return FUSED
