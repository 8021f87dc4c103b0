"""Bad inputs to moelab.accounting give a ValueError that names the problem; nothing silently defaults."""

from __future__ import annotations

import json

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
