"""`moelab demo`: an MoE model and its dense twin, trained on the same tokens with the same budget.

The dense twin has every MoE block replaced by one FFN of the MoE layer's *active* width (k·f plus
shared), so both models spend about the same compute per token; the MoE model holds several times the
parameters. The Switch Transformer result (Fedus et al. 2021) is that, at equal compute per token, the
MoE model reaches a lower loss. The demo prints total and active parameters, the activation ratio,
training tokens/s and validation loss of each, writes comparison.png (validation loss against
training tokens and against training seconds) and shows a short sample from each model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moelab.accounting import count_params
from moelab.config.train import preset
from moelab.data.tokens import prepare_data
from moelab.runs.rundir import RunDir
from moelab.training.train import train

DEMO_HINT = "choose another --out, or leave --out out: the demo then writes to a free runs/demo-N"


def fresh_out(base: str | Path, runs: tuple[str, ...]) -> Path:
    """`base` when none of its `runs` subdirectories holds a run yet, else the first of `base-2`, `base-3`, ...
    that holds none: a demo typed again writes beside the earlier one and never overwrites it."""
    base = Path(base)
    candidate, n = base, 1
    while any(RunDir(candidate / name).holds_run() for name in runs):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def run_demo(out: str | Path = "runs/demo", preset_name: str = "tiny", steps: int | None = None,
             data_path: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the preset's MoE model and its dense twin; print the comparison; return it as a dict."""
    from moelab.analysis.plots import plot_comparison
    from moelab.cli.generate import generate_text

    out = Path(out)
    overrides = {"steps": steps} if steps is not None else {}
    moe_cfg, train_cfg = preset(preset_name, **overrides)
    runs = {"moe": (out / "moe", moe_cfg), "dense": (out / "dense", moe_cfg.dense_twin())}
    for run_dir, _ in runs.values():
        RunDir(run_dir).require_new(DEMO_HINT)
    out.mkdir(parents=True, exist_ok=True)
    print(f"moelab demo: preset {preset_name!r}, {train_cfg.steps} steps x "
          f"{train_cfg.batch_size * train_cfg.seq_len * train_cfg.grad_accum:,} tokens per model", flush=True)
    _, data = prepare_data(data_path, out, vocab_size=moe_cfg.vocab_size, max_bytes=train_cfg.max_corpus_bytes,
                           val_fraction=train_cfg.val_fraction, quiet=not progress)

    rows: dict[str, dict[str, Any]] = {}
    for name, (run_dir, model_cfg) in runs.items():
        result = train(model_cfg, train_cfg, run_dir, data=data, progress=progress, desc=f"{name:>5}")
        counts = count_params(model_cfg)
        rows[name] = {"total_params": counts.total, "active_params": counts.active,
                      "activation_ratio": counts.activation_ratio,
                      "tokens_per_s": result.tokens_per_s, "train_seconds": result.train_seconds,
                      "train_tokens": result.train_tokens, "val_loss": result.final_val_loss}

    print()
    header = f"{'model':<7}{'total params':>14}{'active params':>15}{'active %':>10}{'train tok/s':>13}" \
             f"{'train s':>9}{'val loss':>10}"
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        print(f"{name:<7}{r['total_params']:>14,}{r['active_params']:>15,}{100 * r['activation_ratio']:>9.1f}%"
              f"{r['tokens_per_s']:>13,.0f}{r['train_seconds']:>9.1f}{r['val_loss']:>10.4f}")
    diff = rows["dense"]["val_loss"] - rows["moe"]["val_loss"]
    verdict = "lower" if diff > 0 else "higher"
    print(f"\nAt the same {rows['moe']['train_tokens']:,} training tokens the MoE model's validation loss is "
          f"{abs(diff):.4f} nats/token {verdict} than its dense twin's, with "
          f"{rows['moe']['total_params'] / rows['dense']['total_params']:.2f}x the parameters and "
          f"{rows['moe']['tokens_per_s'] / rows['dense']['tokens_per_s']:.2f}x its training speed.")
    plot = plot_comparison([runs["moe"][0], runs["dense"][0]], ["MoE", "dense twin"], out / "comparison.png")
    print(f"plots: {plot}, {runs['moe'][0] / 'loss.png'}, {runs['moe'][0] / 'expert_load.png'}")
    prompt = "def "
    for name, (run_dir, _) in runs.items():
        sample = generate_text(run_dir, prompt, max_new_tokens=60, temperature=0.8, top_p=0.95, seed=0)
        print(f"\n--- sample from {name} (prompt {prompt!r}) ---\n{prompt}{sample}")
    (out / "summary.json").write_text(json.dumps({"preset": preset_name, "steps": train_cfg.steps, **rows}, indent=2))
    return rows
