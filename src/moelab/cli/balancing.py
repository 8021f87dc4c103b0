"""`moelab demo --experiment balancing`: what load balancing does — the same tiny MoE trained four times on
the same tokens, without balancing, with the Switch auxiliary loss, with the auxiliary-loss-free bias, and with
noisy top-k gating and its importance and load losses.

    none     aux_loss_coef = 0, no expert bias: the router is free to concentrate the load
    switch   the Switch load-balancing loss α·E·Σ fᵢ·Pᵢ (Fedus et al. 2021), α = aux_coef
    bias     no auxiliary loss; a per-expert selection bias moved by γ·sign(mean load − loadᵢ) after every
             step (Wang et al. 2024, DeepSeek-V3), γ = bias_rate
    noisy    router="noisy_topk" (Gaussian noise of learned scale on the logits in training) with the importance
             and load losses w_imp·CV(Σ G(x))² + w_load·CV(Σ P(x, i))² (Shazeer et al. 2017), w_imp = w_load = 0.1
             by default; no Switch loss, no bias

The bias rate defaults to 1e-2, ten times DeepSeek-V3's 1e-3: that value serves a training of ~10⁵ steps;
in a few hundred steps a bias moving 1e-3 per step cannot catch up with the logit gaps a collapsing softmax
router builds (measured: docs/BENCHMARKS.md, "Load balancing").

Every other setting (and the z-loss) is the preset's, so the runs differ only in balancing (the noisy run in
its router too: its noise is itself part of the balancing). For each, the
experiment reads the run's metrics.jsonl and reports over the steps the largest expert share of the load
(1/E when uniform, 1/k when collapsed onto k experts), the experts that received no token in a step
(dead), and the validation loss; it prints a table and writes balancing.png and balancing.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moelab.cli.demo import DEMO_HINT
from moelab.config.train import preset
from moelab.data.tokens import prepare_data
from moelab.runs.rundir import RunDir
from moelab.training.train import train

METHODS = ("none", "switch", "bias", "noisy")
LABELS = {"none": "none", "switch": "Switch loss", "bias": "bias", "noisy": "noisy top-k + importance/load"}


def method_overrides(method: str, aux_coef: float, bias_rate: float, importance_coef: float = 0.1,
                     load_coef: float = 0.1) -> dict[str, Any]:
    """The MoE settings of one balancing method (see the module docstring)."""
    if method == "noisy":
        return {"moe.router": "noisy_topk", "moe.aux_loss_coef": 0.0, "moe.seq_aux_loss_coef": 0.0,
                "moe.expert_bias": False, "moe.importance_loss_coef": importance_coef, "moe.load_loss_coef": load_coef}
    if method == "none":
        return {"moe.aux_loss_coef": 0.0, "moe.seq_aux_loss_coef": 0.0, "moe.expert_bias": False}
    if method == "switch":
        return {"moe.aux_loss_coef": aux_coef, "moe.seq_aux_loss_coef": 0.0, "moe.expert_bias": False}
    if method == "bias":
        return {"moe.aux_loss_coef": 0.0, "moe.seq_aux_loss_coef": 0.0, "moe.expert_bias": True,
                "moe.bias_update_rate": bias_rate}
    raise ValueError(f"method={method!r} is invalid: allowed {', '.join(METHODS)}")


def curves(run_dir: Path, n_experts: int) -> dict[str, list]:
    """Per logged step: the largest expert share and the dead experts (worst MoE layer, mean over layers),
    and the validation loss where it was measured."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in recs if "max_share" in r]
    return {"step": [r["step"] for r in logged],
            "max_share": [max(r["max_share"]) for r in logged],
            "max_share_mean": [sum(r["max_share"]) / len(r["max_share"]) for r in logged],
            "dead_experts": [max(r["dead_frac"]) * n_experts for r in logged],
            "dead_experts_mean": [sum(r["dead_frac"]) / len(r["dead_frac"]) * n_experts for r in logged],
            "val_step": [r["step"] for r in recs if "val_loss" in r],
            "val_loss": [r["val_loss"] for r in recs if "val_loss" in r]}


def run_balancing(out: str | Path = "runs/balancing", preset_name: str = "tiny", steps: int | None = None,
                  data_path: str | Path | None = None, progress: bool = True, aux_coef: float = 0.01,
                  bias_rate: float = 1e-2, overrides: dict[str, Any] | None = None,
                  methods: tuple[str, ...] = METHODS, importance_coef: float = 0.1,
                  load_coef: float = 0.1) -> dict[str, Any]:
    """Train the preset's MoE once per balancing method on the same tokens; print, plot and return the
    comparison. `overrides`: further settings for all runs (e.g. {"moe.n_experts": 64, "lr": 1e-2}); in them
    "moe.aux_loss_coef" sets the switch run's α, "moe.bias_update_rate" the bias run's γ and
    "moe.importance_loss_coef" / "moe.load_loss_coef" the noisy run's two coefficients."""
    out = Path(out)
    base = dict(overrides or {})
    aux_coef = base.pop("moe.aux_loss_coef", aux_coef)
    bias_rate = base.pop("moe.bias_update_rate", bias_rate)
    importance_coef = base.pop("moe.importance_loss_coef", importance_coef)
    load_coef = base.pop("moe.load_loss_coef", load_coef)
    for field in ("moe.expert_bias", "moe.seq_aux_loss_coef"):
        if field in base:
            raise ValueError(f"{field} is what the balancing experiment varies; it cannot be set (use "
                             "moe.aux_loss_coef for the switch run's coefficient, moe.bias_update_rate for the bias "
                             "run's rate, moe.importance_loss_coef / moe.load_loss_coef for the noisy run's)")
    # each method's own settings (a named error for an unknown method); they win over `base` (the noisy run's
    # router over a --set moe.router)
    own = {m: method_overrides(m, aux_coef, bias_rate, importance_coef, load_coef) for m in methods}
    if steps is not None:
        base["steps"] = steps
    base.setdefault("eval_every", max(1, (steps or preset(preset_name)[1].steps) // 8))
    base.setdefault("log_every", max(1, base["eval_every"] // 5))
    configs = {m: preset(preset_name, **{**base, **own[m]}) for m in methods}
    for m in methods:
        RunDir(out / m).require_new(DEMO_HINT)
    model_cfg, train_cfg = configs[methods[0]]
    E, k = model_cfg.moe.n_experts, model_cfg.moe.top_k
    out.mkdir(parents=True, exist_ok=True)
    print(f"moelab demo --experiment balancing: preset {preset_name!r}, E={E}, k={k}, {train_cfg.steps} steps x "
          f"{train_cfg.batch_size * train_cfg.seq_len * train_cfg.grad_accum:,} tokens per run", flush=True)
    _, data = prepare_data(data_path, out, vocab_size=model_cfg.vocab_size, max_bytes=train_cfg.max_corpus_bytes,
                           val_fraction=train_cfg.val_fraction, quiet=not progress)
    results: dict[str, Any] = {"preset": preset_name, "n_experts": E, "top_k": k, "steps": train_cfg.steps,
                               "aux_coef": aux_coef, "bias_rate": bias_rate,
                               "importance_coef": importance_coef, "load_coef": load_coef,
                               "overrides": {key: v for key, v in base.items()}, "runs": {}}
    for m in methods:
        mc, tc = configs[m]
        train(mc, tc, out / m, data=data, progress=progress, desc=f"{m:>6}")
        results["runs"][m] = curves(out / m, E)
    print(_table(results))
    plot = plot_balancing(results, out / "balancing.png")
    (out / "balancing.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"plot: {plot}; numbers: {out / 'balancing.json'}")
    return results


def _table(results: dict[str, Any]) -> str:
    E, k = results["n_experts"], results["top_k"]
    lines = [f"\n{'balancing':<9}{'max share (worst layer)':>25}{'dead experts (worst)':>22}{'val loss':>10}",
             f"{'':<9}{'final / peak after warm-up':>25}{'final / peak':>22}{'final':>10}", "-" * 66]
    for m, c in results["runs"].items():
        half = len(c["max_share"]) // 4  # "after warm-up": skip the first quarter of the logged steps
        lines.append(f"{m:<9}{c['max_share'][-1]:>16.3f} / {max(c['max_share'][half:]):.3f}"
                     f"{c['dead_experts'][-1]:>15.0f} / {max(c['dead_experts'][half:]):.0f}{c['val_loss'][-1]:>12.4f}")
    lines.append(f"(uniform: max share {1 / E:.3f}, no dead experts; collapse onto k={k} experts: {1 / k:.3f}, "
                 f"{E - k} dead)")
    return "\n".join(lines)


def plot_balancing(results: dict[str, Any], path: str | Path) -> Path:
    """balancing.png: max expert share, dead experts and validation loss against steps, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    E, k = results["n_experts"], results["top_k"]
    fig = Figure(figsize=(13, 3.8))
    FigureCanvasAgg(fig)
    a1, a2, a3 = fig.subplots(1, 3)
    for m, c in results["runs"].items():
        label = LABELS.get(m, m)
        (line,) = a1.plot(c["step"], c["max_share"], label=label)
        a2.plot(c["step"], c["dead_experts"], color=line.get_color(), label=label)
        a3.plot(c["val_step"], c["val_loss"], "o-", ms=3, color=line.get_color(), label=label)
    a1.axhline(1 / E, color="k", ls="--", lw=0.8, label="uniform 1/E")
    a1.axhline(1 / k, color="r", ls=":", lw=0.8, label="collapse 1/k")
    a1.set(xlabel="step", ylabel="largest expert's share (worst layer)", ylim=(0, None))
    a2.set(xlabel="step", ylabel="experts with no token in the step (worst layer)", ylim=(-0.2, E))
    a3.set(xlabel="step", ylabel="validation loss (nats/token)")
    for ax in (a1, a2, a3):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"load balancing: E={E}, top-{k}, {results['steps']} steps, same tokens")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
