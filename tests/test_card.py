"""`moelab card`: the CLI (subprocess of `python -m moelab card`) and `moelab.accounting.card.run`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from moelab.accounting import card, count_params, decode_step, experts_touched, to_spec

REQUIRED = ("total_params", "active_params", "active_params_no_input_embedding", "active_params_no_embeddings",
            "activation_ratio")


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moelab", "card", *argv], capture_output=True, text=True, timeout=120)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    card.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_json_has_the_documented_keys_per_model():
    out = cli("mixtral-8x7b", "deepseek-v3", "--json")
    assert out.returncode == 0, out.stderr
    reports = json.loads(out.stdout)
    assert [r["name"] for r in reports] == ["mixtral-8x7b", "deepseek-v3"]
    for r in reports:
        c = count_params(r["name"])
        assert {k: r[k] for k in REQUIRED} == {
            "total_params": c.total, "active_params": c.active,
            "active_params_no_input_embedding": c.active_no_input_embedding,
            "active_params_no_embeddings": c.active_no_embeddings, "activation_ratio": c.activation_ratio}
    assert reports[1]["mtp_params"] > 0 and reports[1]["published"]["total"] == "671B"


def test_cli_table_side_by_side(tmp_path):
    out = cli("mixtral-8x7b", "qwen3-30b-a3b", "llama-3.1-8b")
    assert out.returncode == 0, out.stderr
    header = out.stdout.splitlines()[0].split()
    assert header == ["model", "mixtral-8x7b", "qwen3-30b-a3b", "llama-3.1-8b"]
    total_row = next(line for line in out.stdout.splitlines() if line.startswith("total params"))
    assert "46.70B" in total_row and "30.53B" in total_row and "8.03B" in total_row
    ratio_row = next(line for line in out.stdout.splitlines() if line.startswith("activation ratio"))
    assert "100.0%" in ratio_row  # the dense model


def test_cli_reads_config_json_and_model_directory(tmp_path):
    from moelab.accounting import load_preset

    cfg = {k: v for k, v in load_preset("olmoe-1b-7b").items() if k != "_moelab"}
    model_dir = tmp_path / "my-olmoe"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(cfg))
    for target in (model_dir, model_dir / "config.json"):
        out = cli(str(target), "--json")
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout)[0]
        assert r["name"] == "my-olmoe" and r["total_params"] == count_params("olmoe-1b-7b").total
        assert r["published"] is None


def test_cli_errors_are_clear(tmp_path):
    out = cli("no-such-model")
    assert out.returncode == 2
    assert "no-such-model" in out.stderr and "mixtral-8x7b" in out.stderr  # lists the presets
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "mixtral", "hidden_size": 64')
    out = cli(str(bad))
    assert out.returncode == 2 and "not valid JSON" in out.stderr
    bad.write_text('{"model_type": "bert", "hidden_size": 64}')
    out = cli(str(bad))
    assert out.returncode == 2 and "'bert' is not supported" in out.stderr and "qwen3_moe" in out.stderr
    out = cli("mixtral-8x7b", "--precision", "int3")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_training_presets_are_counted_too():
    """`moelab card tiny` counts the ModelConfig that `moelab train --preset tiny` builds."""
    from moelab.config.train import preset

    out = cli("tiny", "tiny-deepseek", "--json")
    assert out.returncode == 0, out.stderr
    for r, name in zip(json.loads(out.stdout), ["tiny", "tiny-deepseek"], strict=True):
        c = count_params(preset(name)[0])
        assert (r["name"], r["model_type"]) == (name, "moelab")
        assert (r["total_params"], r["active_params"]) == (c.total, c.active)
        assert r["published"] is None


def test_unknown_name_lists_both_kinds_of_preset():
    out = cli("no-such-model")
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert "'no-such-model' is neither" in out.stderr and "deepseek-v3" in out.stderr
    assert "training presets: small, tiny, tiny-deepseek" in out.stderr


def test_run_options_change_the_costs(capsys):
    assert card.run(parse("deepseek-v3", "--json", "--precision", "fp8", "--accelerator-memory", "141",
                          "--batch", "32", "--context", "8192", "--bandwidth", "4.8")) == 0
    r = json.loads(capsys.readouterr().out)[0]
    c = r["costs"]
    assert c["weight_bytes"] == r["total_params"]  # 1 byte per parameter
    assert c["weight_bytes_by_precision"] == pytest.approx(
        {"fp32": 4 * r["total_params"], "bf16": 2 * r["total_params"], "fp8": r["total_params"],
         "int4": (0.5 + 2 / 128) * r["total_params"]})
    assert c["kv_cache_bytes"] == 32 * 8192 * 61 * 576 * 2
    assert c["accelerators_needed"] == -(-(c["weight_bytes"] + c["kv_cache_bytes"]) // 141e9)
    assert c["bandwidth_bytes_per_s"] == pytest.approx(c["accelerators_needed"] * 4.8e12)
    step32 = next(s for s in c["decode"] if s["batch"] == 32)
    assert step32["experts_touched_per_layer"] == pytest.approx(experts_touched(256, 8, 32))
    expected = decode_step(to_spec("deepseek-v3"), 32, 8192, "fp8", c["bandwidth_bytes_per_s"])
    assert step32["tokens_per_s_bound"] == pytest.approx(expected.tokens_per_s)


def test_run_rejects_bad_values():
    with pytest.raises(ValueError, match="batch=0 is invalid"):
        card.run(parse("mixtral-8x7b", "--batch", "0"))
    with pytest.raises(ValueError, match="--plot"):
        card.run(parse("mixtral-8x7b", "--plot", "out.jpg"))
    with pytest.raises(ValueError, match="int4"):
        card.CardSettings(kv_precision="int4").validate()


def test_plot_is_a_png(tmp_path, capsys):
    path = tmp_path / "decode.png"
    assert card.run(parse("mixtral-8x7b", "deepseek-v3", "llama-3.1-8b", "--plot", str(path))) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert "plot written" in capsys.readouterr().out


def test_expert_parallel_json_by_hand(capsys):
    assert card.run(parse("mixtral-8x7b", "--json", "--expert-parallel", "8", "--batch", "2", "--context", "1024",
                          "--link-bandwidth", "25")) == 0
    ep = json.loads(capsys.readouterr().out)[0]["expert_parallel"]
    per_layer = 2 * 2 * (7 / 8) * 4096 * 2  # dispatch + combine of k = 2 bf16 vectors of 4096, 7/8 remote
    pa = ep["per_assignment"]
    assert pa["bytes_per_token_layer_forward"] == per_layer
    assert pa["bytes_per_token_forward"] == 32 * per_layer
    assert pa["bytes_per_token_training"] == 2 * 32 * per_layer
    assert ep["tokens_per_step"] == 2048 and pa["bytes_per_step_forward"] == 2048 * 32 * per_layer
    assert pa["seconds_per_step_forward"] == pytest.approx(2048 / 8 * 32 * per_layer / 25e9)
    assert ep["deduplicated_per_rank"]["bytes_per_token_forward"] == pytest.approx(32 * per_layer)
    assert (ep["ranks"], ep["experts_per_rank"], ep["allowed_ranks"]) == (8, 1, [1, 2, 4, 8])
    experts = 32 * 8 * 3 * 4096 * 14336
    total = count_params("mixtral-8x7b").total
    assert ep["weight_bytes_per_rank"] == pytest.approx(2 * (total - experts) + 2 * experts / 8)
    assert ep["weights_fit_accelerator"] is True


def test_expert_parallel_activation_precision_and_default_link(capsys):
    card.run(parse("deepseek-v3", "--json", "--expert-parallel", "64", "--activation-precision", "fp8"))
    ep = json.loads(capsys.readouterr().out)[0]["expert_parallel"]
    assert ep["link_bandwidth_bytes_per_s"] == 50e9 and ep["activation_bytes"] == 1
    assert ep["per_assignment"]["bytes_per_token_layer_forward"] == 2 * 8 * (63 / 64) * 7168 * 1
    assert ep["group_limit"] == {"n_groups": 8, "topk_groups": 4, "max_remote_ranks_per_token_layer": 8}
    card.run(parse("deepseek-v3", "--json"))
    assert json.loads(capsys.readouterr().out)[0]["expert_parallel"] is None


def test_expert_parallel_cli_end_to_end(capsys):
    from moelab.cli.main import main

    assert main(["card", "mixtral-8x7b", "llama-3.1-8b", "--expert-parallel", "4"]) == 0
    out = capsys.readouterr().out
    assert "expert parallel over 4 ranks" in out and "2/8 experts per rank, 32 MoE layers" in out
    # per expert: 2·k·(N−1)/N·d·b = 2·2·3/4·4096·2; per rank: 2·R·d·b, R = 3·(1 − C(6,2)/C(8,2)) = 3·13/28
    per_expert, per_rank = 2 * 2 * 3 / 4 * 4096 * 2, 2 * (3 * 13 / 28) * 4096 * 2
    row = next(line for line in out.splitlines() if line.strip().startswith("bytes/token/layer, fwd @ bf16"))
    assert f"  {per_expert / 1000:.2f} kB / {per_rank / 1000:.2f} kB  " in row and row.split()[-1] == "dense"
    assert "24.58 kB / 22.82 kB" in row
    assert main(["card", "mixtral-8x7b"]) == 0
    assert "expert parallel" not in capsys.readouterr().out


def test_expert_parallel_cli_errors():
    out = cli("mixtral-8x7b", "--expert-parallel", "3")
    assert out.returncode == 2
    assert "expert_parallel=3 does not divide num_local_experts=8" in out.stderr
    assert "allowed: 1, 2, 4, 8" in out.stderr
    out = cli("mixtral-8x7b", "--expert-parallel", "8", "--link-bandwidth", "0")
    assert out.returncode == 2 and "link_bandwidth_gb_s=0.0 is invalid" in out.stderr
