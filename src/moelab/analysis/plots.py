"""Routing analytics and plots, made from a run's metrics.jsonl so that any run can be re-plotted.

- `read_metrics(run)`: the list of JSON records.
- `plot_run(run)`: loss.png (train and validation loss vs step) and, for MoE runs, expert_load.png
  (per MoE layer, a heatmap of each expert's share of the routed assignments over time: a uniform
  router shows a flat colour at 1/E; collapse shows one bright row).
  Expert-parallel runs also get expert_parallel.png (all-to-all share of the step per rank over time;
  each rank's share of the routed work — the straggler view).
- `plot_comparison(runs, labels, path)`: validation loss of several runs against training tokens and
  against training seconds (the demo's MoE-vs-dense picture).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not a moelab run directory")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png (and expert_load.png for MoE runs) into the run directory; return the paths."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"loss — {run_dir.name}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=110)
    plt.close(fig)
    written.append(run_dir / "loss.png")

    loads = [(r["step"], r["expert_load"]) for r in records if "expert_load" in r]
    if loads:
        n_layers = len(loads[0][1])
        fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.8 + 1.6 * n_layers), squeeze=False)
        steps = [s for s, _ in loads]
        for i in range(n_layers):
            grid = [[row[e] for _, ld in loads for row in [ld[i]]] for e in range(len(loads[0][1][i]))]
            ax = axes[i][0]
            im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                           extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(grid) - 0.5))  # one step: a column
            ax.set_ylabel(f"MoE layer {i}\nexpert")
            fig.colorbar(im, ax=ax, label="load share")
        axes[-1][0].set_xlabel("step")
        fig.suptitle(f"expert load over training — {run_dir.name} (uniform = 1/E)")
        fig.tight_layout()
        fig.savefig(run_dir / "expert_load.png", dpi=110)
        plt.close(fig)
        written.append(run_dir / "expert_load.png")
    ep = [r for r in records if "ep_step_s" in r]
    if ep:
        written.append(_plot_expert_parallel(plt, ep, run_dir))
    return written


def _plot_expert_parallel(plt, records: list[dict[str, Any]], run_dir: Path) -> Path:
    """expert_parallel.png: per rank, the all-to-all share of the step over time, and per rank the
    share of the routed assignments its experts computed (mean over logged steps, per MoE layer)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for q in range(max(len(r["ep_step_s"]) for r in records)):  # a resumed run may have changed N
        mine = [(r["step"], 100 * r["ep_a2a_share"][q]) for r in records if q < len(r["ep_a2a_share"])]
        ax1.plot(*zip(*mine), ".-", label=f"rank {q}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("all-to-all share of the step (%)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    n_layers = len(records[-1]["ep_load_per_rank"])
    # the load view of the latest expert split (on a mesh: the ep ranks, fewer than the processes)
    n_ranks = len(records[-1]["ep_load_per_rank"][0]) if n_layers else len(records[-1]["ep_step_s"])
    records = [r for r in records if r["ep_load_per_rank"] and len(r["ep_load_per_rank"][0]) == n_ranks]
    width = 0.8 / max(n_layers, 1)
    for i in range(n_layers):
        mean = [sum(r["ep_load_per_rank"][i][q] for r in records) / len(records) for q in range(n_ranks)]
        ax2.bar([q + i * width for q in range(n_ranks)], mean, width, label=f"MoE layer {i}")
    ax2.axhline(1 / n_ranks, color="k", lw=0.8, ls="--", label="uniform")
    ax2.set_xticks([q + 0.4 - width / 2 for q in range(n_ranks)], [f"ep rank {q}" for q in range(n_ranks)])
    ax2.set_ylabel("share of routed assignments")
    ax2.legend(fontsize=7)
    fig.suptitle(f"expert parallelism — {run_dir.name}")
    fig.tight_layout()
    path = run_dir / "expert_parallel.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_comparison(run_dirs: list[str | Path], labels: list[str], path: str | Path) -> Path:
    """Validation loss vs training tokens and vs training seconds for several runs, side by side."""
    plt = _pyplot()
    fig, (ax_tok, ax_sec) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir, label in zip(run_dirs, labels):
        records = read_metrics(run_dir)
        seconds, points = 0.0, []
        last_tokens = 0
        for r in records:
            if "tokens_per_s" in r:
                seconds += (r["tokens"] - last_tokens) / r["tokens_per_s"]
                last_tokens = r["tokens"]
            if "val_loss" in r:
                points.append((r["tokens"], seconds, r["val_loss"]))
        if points:
            ax_tok.plot([p[0] for p in points], [p[2] for p in points], "o-", label=label)
            ax_sec.plot([p[1] for p in points], [p[2] for p in points], "o-", label=label)
    ax_tok.set_xlabel("training tokens")
    ax_sec.set_xlabel("training seconds")
    for ax in (ax_tok, ax_sec):
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("MoE vs dense twin (same active parameters per token)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
