"""Bad inputs to moelab.accounting give a ValueError that names the problem; nothing silently defaults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moelab import ModelConfig, MoEConfig
from moelab.accounting import SUPPORTED_MODEL_TYPES, count_params, load_preset


def mixtral() -> dict:
    return {k: v for k, v in load_preset("mixtral-8x7b").items() if k != "_moelab"}


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(ValueError) as e:
        count_params({"model_type": "bert", "hidden_size": 768})
    msg = str(e.value)
    assert "'bert' is not supported" in msg
    assert all(t in msg for t in SUPPORTED_MODEL_TYPES)


def test_model_type_of_the_wrong_type():
    with pytest.raises(ValueError, match=r"model_type \['mixtral'\] is not supported"):
        count_params({**mixtral(), "model_type": ["mixtral"]})


def test_missing_model_type():
    cfg = mixtral()
    del cfg["model_type"]
    with pytest.raises(ValueError, match="'model_type' is missing; supported model types: .*mixtral"):
        count_params(cfg)


@pytest.mark.parametrize("field", ["hidden_size", "num_local_experts", "num_experts_per_tok", "vocab_size",
                                   "num_key_value_heads", "intermediate_size"])
def test_missing_required_field_is_named(field):
    cfg = mixtral()
    del cfg[field]
    with pytest.raises(ValueError, match=rf"model_type 'mixtral'\): required field '{field}' is missing"):
        count_params(cfg)


@pytest.mark.parametrize("field,value,allowed", [
    ("hidden_size", "4096", "an integer >= 1"),
    ("num_hidden_layers", None, "an integer >= 1"),
    ("num_local_experts", 0, "an integer >= 1"),
    ("num_experts_per_tok", 2.0, "an integer >= 1"),
    ("tie_word_embeddings", "no", "true or false"),
])
def test_wrong_type_names_field_value_and_allowed(field, value, allowed):
    cfg = {**mixtral(), field: value}
    with pytest.raises(ValueError, match=rf"field '{field}'={value!r} is invalid: allowed {allowed}".replace(
            "(", r"\(").replace(")", r"\)")):
        count_params(cfg)


def test_nested_sub_config_missing_or_incomplete():
    dbrx = {k: v for k, v in load_preset("dbrx").items() if k != "_moelab"}
    with pytest.raises(ValueError, match="field 'ffn_config' is missing"):
        count_params({k: v for k, v in dbrx.items() if k != "ffn_config"})
    bad = {**dbrx, "ffn_config": {"ffn_hidden_size": 10752, "moe_num_experts": 16}}
    with pytest.raises(ValueError, match=r"\[ffn_config\].*required field 'moe_top_k' is missing"):
        count_params(bad)


def test_deepseek_requires_q_lora_rank_to_be_stated():
    """q_lora_rank = null means full-rank queries, so its absence is ambiguous and an error."""
    cfg = {k: v for k, v in load_preset("deepseek-v3").items() if k not in ("_moelab", "q_lora_rank")}
    with pytest.raises(ValueError, match="required field 'q_lora_rank' is missing"):
        count_params(cfg)


def test_documented_defaults_are_reported():
    cfg = mixtral()
    del cfg["tie_word_embeddings"]
    c = count_params(cfg)
    assert c.total == count_params("mixtral-8x7b").total  # transformers' default: untied
    assert any("tie_word_embeddings=False" in n for n in c.notes)


def test_files_and_directories(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        count_params(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        count_params(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json found"):
        count_params(empty)
    with pytest.raises(ValueError, match="neither an existing config.json.*presets: .*deepseek-v3"):
        count_params(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot count parameters of a int"):
        count_params(42)


def test_moelab_checkpoint_and_run_directories(tmp_path):
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      moe=MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2))
    step = tmp_path / "run" / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (step / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": {}}))
    assert count_params(step).total == count_params(cfg).total
    assert count_params(tmp_path / "run").total == count_params(cfg).total  # newest checkpoint of a run
    with pytest.raises(ValueError, match="unknown field"):
        count_params({**cfg.to_dict(), "d_modle": 3})


@pytest.mark.parametrize("field,value,allowed", [
    pytest.param("hidden_size", 10**400, "an integer >= 1 and <= 2147483648", id="hidden_size-1e400"),  # OverflowError
    ("num_hidden_layers", 10_001, "an integer >= 1 and <= 10000"),  # 10**7 took minutes and GBs
    ("num_hidden_layers", 10**7, "an integer >= 1 and <= 10000"),
    ("num_local_experts", 2**20 + 1, "an integer >= 1 and <= 1048576"),
    ("vocab_size", 2**31 + 1, "an integer >= 1 and <= 2147483648"),
])
def test_absurd_sizes_are_refused_by_name(field, value, allowed, tmp_path):
    cfg = {**mixtral(), field: value}
    shown = "~1e400" if value == 10**400 else str(value)
    with pytest.raises(ValueError, match=rf"field '{field}'={shown} is invalid: allowed {allowed}$"):
        count_params(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "-m", "moelab", "card", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and f"'{field}'={shown} is invalid" in out.stderr


def test_absurd_moelab_config_is_refused_by_name():
    with pytest.raises(ValueError, match="n_layers=10000000 is invalid: allowed an integer <= 10000"):
        count_params(ModelConfig(n_layers=10**7))
    with pytest.raises(ValueError, match="moe.n_experts=2097152 is invalid: allowed an integer <= 1048576"):
        count_params(ModelConfig(moe=MoEConfig(n_experts=2**21)))


def test_largest_allowed_config_is_costed_quickly():
    """At every bound at once (2^31 widths, 10 000 layers, 2^20 experts, top-2^19) the card still computes,
    with expert parallelism over 2 and over 2^20 ranks (remote_ranks must not build 2^20-choose-2^19)."""
    from moelab.accounting.card import CardSettings, card_report

    cfg = {**mixtral(), "hidden_size": 2**31, "vocab_size": 2**31, "num_hidden_layers": 10_000,
           "intermediate_size": 2**31, "num_local_experts": 2**20, "num_experts_per_tok": 2**19}
    # per rank: with 2 ranks the 2^19 experts of a token surely reach the other rank (C(E/2, E/2)/C(E, E/2) ~ 0);
    # with one expert per rank every remote assignment is its own rank, k·(N−1)/N
    for ranks, per_rank in ((2, 1.0), (2**20, 2**19 * (2**20 - 1) / 2**20)):
        report = card_report(cfg, CardSettings(expert_parallel=ranks))
        assert report["total_params"] > 2**31 * 2**31 * 2**20 * 10_000
        ep = report["expert_parallel"]
        assert ep["per_assignment"]["remote_copies_per_token_layer"] == pytest.approx(2**19 * (ranks - 1) / ranks)
        assert ep["deduplicated_per_rank"]["remote_copies_per_token_layer"] == pytest.approx(per_rank)


@pytest.mark.parametrize("change,match", [
    ({"n_shared_experts": None}, r"field 'n_shared_experts'=None is invalid: allowed an integer >= 0"),  # was 0
    ({"n_group": ...}, "required field 'n_group' is missing"),  # was "no limit"; transformers' default is 8
    ({"topk_group": 9}, r"field 'topk_group'=9 is invalid: allowed an integer <= n_group \(8\)"),
    ({"n_group": 7}, r"field 'n_group'=7 is invalid: allowed a divisor of the number of experts \(256\)"),
    ({"num_experts_per_tok": 257}, r"'num_experts_per_tok'=257 is invalid: .* <= the number of experts \(256\)"),
    ({"first_k_dense_replace": ...}, "required field 'first_k_dense_replace' is missing"),
])
def test_deepseek_v3_fields_transformers_would_default_or_refuse(change, match):
    cfg = {k: v for k, v in load_preset("deepseek-v3").items() if k != "_moelab"}
    cfg = {k: v for k, v in {**cfg, **change}.items() if v is not ...}
    with pytest.raises(ValueError, match=match):
        count_params(cfg)


def test_null_kv_heads_is_multi_head_and_kv_heads_must_divide_heads():
    cfg = mixtral()
    mha = count_params({**cfg, "num_key_value_heads": cfg["num_attention_heads"]})
    assert count_params({**cfg, "num_key_value_heads": None}).total == mha.total  # was an error
    with pytest.raises(ValueError, match=r"'num_key_value_heads'=5 is invalid: allowed a divisor of "
                                         r"num_attention_heads \(32\)"):
        count_params({**cfg, "num_key_value_heads": 5})
