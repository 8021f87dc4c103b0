"""Training metrics: the per-step statistics of MoE layers and the run's metrics.jsonl.

metrics.jsonl holds one JSON object per logged step with at least "step" and "loss"; plots are made from
it (`moelab.analysis`), so any run can be re-plotted. A resumed run first drops the lines a killed process
logged after its last checkpoint (`truncate_after`), so the file reads as one uninterrupted run; the first
line it then logs carries a "resumed" entry (the step it resumed from and the settings it changed).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from moelab.parallel import exchange_stats


def layer_stats(auxes_per_micro: list[list], model) -> dict[str, Any]:
    """Per-MoE-layer statistics of one optimizer step, summed/averaged over its micro-batches (one list entry
    per MoE layer):
        expert_load     [E] load share of each expert (the expert-load heatmap is drawn from it)
        load_entropy    H(load share) / ln E: 1 uniform, ln k / ln E when k experts take everything
        max_share       the largest expert's share of the load (1/E when uniform, 1/k at collapse)
        dead_frac       share of experts that no token chose in the step
        dropped_frac    share of assignments dropped by capacity
        max_mean_load   max / mean load;  router_entropy  mean per-token router entropy (nats)
        expert_bias     the selection biases, when the model has them
    The four bounded figures (load_entropy, max_share, dead_frac, dropped_frac) lie in [0, 1] whatever E is."""
    if not auxes_per_micro or not auxes_per_micro[0]:
        return {}
    n_layers, n_micro = len(auxes_per_micro[0]), len(auxes_per_micro)
    loads = [sum(m[i].load for m in auxes_per_micro) for i in range(n_layers)]
    shares = [ld / ld.sum().clamp_min(1) for ld in loads]
    out: dict[str, Any] = {
        "expert_load": [s.tolist() for s in shares],
        "load_entropy": [float(-(s * s.clamp_min(1e-30).log()).sum() / math.log(len(s))) if len(s) > 1 else 1.0
                         for s in shares],
        "max_share": [float(s.max()) for s in shares],
        "dead_frac": [float((ld == 0).float().mean()) for ld in loads],
        "max_mean_load": [(ld.max() / ld.mean()).item() for ld in loads],
        "dropped_frac": [sum(float(m[i].dropped_frac) for m in auxes_per_micro) / n_micro for i in range(n_layers)],
        "router_entropy": [sum(float(m[i].router_entropy) for m in auxes_per_micro) / n_micro
                           for i in range(n_layers)],
    }
    moes = model.moe_layers()
    if any(moe.cfg.expert_bias for moe in moes):
        out["expert_bias"] = [moe.router.bias.tolist() for moe in moes]
    return out


def truncate_after(path: Path, last_step: int) -> None:
    """Keep only the lines of `path` up to `last_step` (lines a killed run logged after its last checkpoint)."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


def parallel_stats(ctx, step_seconds: float, auxes: list, model) -> dict[str, Any]:
    """The straggler view of one step, one entry per rank: step time, all-to-all time and its share,
    rows sent to / received from other ranks, and each MoE layer's share of the load on each ep rank."""
    a2a = exchange_stats(model)
    per_rank = ctx.gather([step_seconds, a2a.seconds, a2a.rows_sent, a2a.rows_received])
    loads = [sum(m[i].load for m in auxes) for i in range(len(auxes[0]))] if auxes and auxes[0] else []
    ep = ctx.mesh.ep if ctx.mesh is not None else ctx.world  # ranks the experts are split over
    return {"ep_step_s": [r[0] for r in per_rank], "ep_a2a_s": [r[1] for r in per_rank],
            "ep_a2a_share": [r[1] / max(r[0], 1e-12) for r in per_rank],
            "ep_rows_sent": [int(r[2]) for r in per_rank], "ep_rows_received": [int(r[3]) for r in per_rank],
            "ep_load_per_rank": [(ld.view(ep, -1).sum(1) / ld.sum()).tolist() for ld in loads]}


class TensorBoardLog:
    """The metrics records also written as TensorBoard scalars (`torch.utils.tensorboard`, an optional extra:
    pip install 'moelab[tensorboard]'): scalars under their key, per-MoE-layer lists as "moe/<key>/layer<i>"."""

    PER_LAYER = ("load_entropy", "max_share", "dead_frac", "dropped_frac", "router_entropy", "max_mean_load")

    def __init__(self, log_dir: Path) -> None:
        self.writer = self.summary_writer()(str(log_dir))

    @staticmethod
    def summary_writer():
        """torch's SummaryWriter class; ValueError naming the missing package when tensorboard is absent."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("tensorboard=True (--tensorboard) needs the tensorboard package: "
                             "pip install 'moelab[tensorboard]'") from None
        return SummaryWriter

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        for key in self.PER_LAYER:
            for i, value in enumerate(record.get(key, [])):
                self.writer.add_scalar(f"moe/{key}/layer{i}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
