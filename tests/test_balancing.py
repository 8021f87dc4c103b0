"""The balancing experiment: four runs on the same tokens differing only in balancing; curves from metrics."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from moelab.cli.balancing import METHODS, method_overrides, run_balancing

SMALL = {"d_model": 32, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2, "d_ff": 64, "moe.d_expert": 32,
         "moe.n_experts": 8, "vocab_size": 300, "batch_size": 4, "seq_len": 32, "max_corpus_bytes": 100_000,
         "eval_batches": 1, "threads": 1}


def test_balancing_beats_none_and_the_runs_differ_only_in_balancing(tmp_path, capsys):
    """60 steps of a 2-layer MoE with E = 16, top-2, lr 1e-2 (the cheapest setting found that shows it for each
    of seeds 0-4): without balancing the router collapses onto k experts (worst layer's largest share 1/2, 14
    of 16 dead in every step); with the Switch loss (α = 0.1) and with the bias (γ = 0.05) the last 15 steps'
    mean largest share is lower by > 0.05 and > 4 fewer experts are dead. Measured, last-15-step means over
    seeds 0-4: none 0.50 / 13.5-14.0 dead, switch 0.19-0.31 / 0.8-5.0, bias 0.16-0.40 / 0.3-8.3."""
    steps, E = 60, 16
    res = run_balancing(tmp_path / "bal", steps=steps, progress=False,
                        overrides={**SMALL, "moe.n_experts": E, "lr": 1e-2, "warmup_steps": 1, "seed": 0,
                                   "moe.aux_loss_coef": 0.1, "moe.bias_update_rate": 0.05, "eval_every": 30,
                                   "log_every": 1})
    configs = {m: json.loads((tmp_path / "bal" / m / "config.json").read_text()) for m in METHODS}
    moe = {m: c["model"]["moe"] for m, c in configs.items()}
    assert (moe["none"]["aux_loss_coef"], moe["none"]["expert_bias"]) == (0.0, False)
    assert (moe["switch"]["aux_loss_coef"], moe["switch"]["expert_bias"]) == (0.1, False)
    assert (moe["bias"]["aux_loss_coef"], moe["bias"]["expert_bias"], moe["bias"]["bias_update_rate"]) == (0.0, True,
                                                                                                   0.05)
    noisy = moe["noisy"]
    assert (noisy["router"], noisy["aux_loss_coef"], noisy["expert_bias"], noisy["importance_loss_coef"],
            noisy["load_loss_coef"]) == ("noisy_topk", 0.0, False, 0.1, 0.1)
    assert all(moe[m]["router"] == "topk_softmax" and "load_loss_coef" not in moe[m]
               for m in ("none", "switch", "bias"))
    varied = ("aux_loss_coef", "expert_bias", "bias_update_rate", "router", "importance_loss_coef", "load_loss_coef")
    strip = lambda c: {**c["model"], "moe": {k: v for k, v in c["model"]["moe"].items()  # noqa: E731
                                             if k not in varied}}
    assert strip(configs["none"]) == strip(configs["switch"]) == strip(configs["bias"]) == strip(configs["noisy"])
    assert len({c["data"]["corpus_sha256"] for c in configs.values()}) == 1  # the same tokens
    end = {}
    for m in METHODS:
        c = res["runs"][m]
        assert c["step"] == list(range(1, steps + 1)) and c["val_step"] == [30, 60]
        metrics = [json.loads(x) for x in (tmp_path / "bal" / m / "metrics.jsonl").read_text().splitlines()]
        assert c["max_share"] == [max(r["max_share"]) for r in metrics]
        assert c["dead_experts"] == pytest.approx([max(r["dead_frac"]) * E for r in metrics])
        assert all(1 / E <= s <= 1 for s in c["max_share"]) and all(0 <= d <= E for d in c["dead_experts"])
        n = steps // 4  # the last 15 steps
        end[m] = (sum(c["max_share"][-n:]) / n, sum(c["dead_experts"][-n:]) / n)
    assert end["none"][0] >= 0.45 and end["none"][1] >= E - 4, end  # collapsed onto (about) k = 2 experts
    for m in ("switch", "bias"):
        assert end[m][0] < end["none"][0] - 0.05 and end[m][1] < end["none"][1] - 4, (m, end)
    out = capsys.readouterr().out
    assert all(m in out for m in METHODS) and "collapse onto k=2" in out
    assert (tmp_path / "bal" / "balancing.png").stat().st_size > 0
    assert json.loads((tmp_path / "bal" / "balancing.json").read_text())["runs"]["bias"]["val_loss"]
    with pytest.raises(ValueError, match="method='hash'"):
        method_overrides("hash", 0.01, 1e-3)


def test_cli_set_is_parsed_by_field_type():
    res = run_cli("demo", "--experiment", "balancing", "--set", "moe.top_k=x")  # the command, in this process
    assert res.returncode == 2 and "'x' is not an integer" in res.stderr
    res = run_cli("demo", "--set", "nope=1")
    assert res.returncode == 2 and "FIELD=VALUE" in res.stderr


def test_set_moves_each_methods_own_setting_only(tmp_path):
    run_balancing(tmp_path / "bal", steps=2, progress=False, methods=("switch", "bias"),
                  overrides={**SMALL, "moe.aux_loss_coef": 0.05, "moe.bias_update_rate": 0.02})
    moe = {m: json.loads((tmp_path / "bal" / m / "config.json").read_text())["model"]["moe"]
           for m in ("switch", "bias")}
    assert (moe["switch"]["aux_loss_coef"], moe["switch"]["expert_bias"]) == (0.05, False)
    assert (moe["bias"]["aux_loss_coef"], moe["bias"]["bias_update_rate"]) == (0.0, 0.02)
    assert not (tmp_path / "bal" / "none").exists()
    run_balancing(tmp_path / "b3", steps=1, progress=False, methods=("noisy",),
                  overrides={**SMALL, "moe.load_loss_coef": 0.3, "moe.router": "sigmoid"})
    noisy = json.loads((tmp_path / "b3" / "noisy" / "config.json").read_text())["model"]["moe"]
    assert (noisy["router"], noisy["importance_loss_coef"], noisy["load_loss_coef"]) == ("noisy_topk", 0.1, 0.3)
    with pytest.raises(ValueError, match="moe.expert_bias is what the balancing experiment varies"):
        run_balancing(tmp_path / "b2", steps=2, progress=False, overrides={**SMALL, "moe.expert_bias": True})
