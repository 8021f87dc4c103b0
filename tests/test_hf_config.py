"""moelab.config.hf: the one rule for absent, null and zero fields, aliases, bounds and types (no torch)."""

from __future__ import annotations

import json

import pytest

from moelab.config.hf import MAX_EXPERTS, MAX_INT, MAX_LAYERS, HFConfig, load_json


def reader(**fields) -> HFConfig:
    return HFConfig({"model_type": "deepseek_v3", **fields}, "dir/config.json")


def test_absent_size_is_required_and_an_absent_flag_takes_its_default_recorded():
    c = reader()
    with pytest.raises(ValueError, match=r"^dir/config.json \(model_type 'deepseek_v3'\): required field "
                                         r"'hidden_size' is missing$"):
        c.int("hidden_size")
    assert c.bool("tie_word_embeddings", False) is False
    assert c.int("moe_layer_freq", 1) == 1
    assert c.defaults_used == ["tie_word_embeddings=False", "moe_layer_freq=1"]
    assert c.notes() == ("transformers defaults used for absent (or null) fields: tie_word_embeddings=False, "
                         "moe_layer_freq=1",)


def test_null_is_not_absent():
    """An explicit null is refused even where an absent field has a default, unless the read names its meaning."""
    c = reader(hidden_size=None, tie_word_embeddings=None, q_lora_rank=None, mlp_only_layers=None, eps=None)
    with pytest.raises(ValueError, match=r"field 'hidden_size'=None is invalid: allowed an integer >= 1"):
        c.int("hidden_size", 4096)
    with pytest.raises(ValueError, match=r"field 'tie_word_embeddings'=None is invalid: allowed true or false"):
        c.bool("tie_word_embeddings", False)
    with pytest.raises(ValueError, match=r"field 'eps'=None is invalid: allowed a finite number"):
        c.float("eps", 1e-6)
    assert c.opt_int("q_lora_rank") is None
    assert c.int_list("mlp_only_layers", [], null=[]) == []
    assert c.bool("tie_word_embeddings", False, null=False) is False
    assert c.defaults_used == []  # a null given a meaning is what the config says, not a default


def test_zero_is_an_integer_checked_against_the_minimum():
    c = reader(n_shared_experts=0, n_routed_experts=0, first_k_dense_replace=0)
    assert c.int("n_shared_experts", minimum=0) == 0
    assert c.int("first_k_dense_replace", 3, minimum=0) == 0  # zero is not absent: the default does not apply
    with pytest.raises(ValueError, match=rf"'n_routed_experts'=0 is invalid: allowed an integer >= 1 and <= "
                                         rf"{MAX_EXPERTS}"):
        c.int("n_routed_experts")


@pytest.mark.parametrize("field,limit", [("num_hidden_layers", MAX_LAYERS), ("num_nextn_predict_layers", MAX_LAYERS),
                                         ("n_routed_experts", MAX_EXPERTS), ("hidden_size", MAX_INT)])
def test_upper_bounds(field, limit):
    assert reader(**{field: limit}).int(field, minimum=0) == limit
    with pytest.raises(ValueError, match=rf"'{field}'={limit + 1} is invalid: allowed an integer >= 0 and <= {limit}"):
        reader(**{field: limit + 1}).int(field, minimum=0)
    with pytest.raises(ValueError, match=rf"'{field}'=~1e1000 is invalid"):  # a huge value, shown by magnitude
        reader(**{field: 10**1000}).int(field)


@pytest.mark.parametrize("read,value,allowed", [
    ("int", True, "an integer"), ("int", 2.0, "an integer"), ("int", "8", "an integer"),
    ("float", float("nan"), "a finite number"), ("float", float("inf"), "a finite number"),
    pytest.param("float", 10**400, "a finite number", id="float-1e400"),
    ("float", True, "a finite number"), ("bool", 1, "true or false"), ("int_list", [1, "2"], "a list of integers"),
])
def test_wrong_types_are_named(read, value, allowed):
    with pytest.raises(ValueError, match=f"field 'x'=.* is invalid: allowed {allowed}"):
        getattr(reader(x=value), read)("x")


def test_aliases_belong_to_a_model_type():
    assert HFConfig({"model_type": "mixtral", "num_experts": 8}).int("num_local_experts") == 8
    assert HFConfig({"model_type": "qwen3_moe", "num_local_experts": 8}).int("num_experts") == 8
    with pytest.raises(ValueError, match="required field 'num_local_experts' is missing"):
        HFConfig({"model_type": "llama", "num_experts": 8}).int("num_local_experts")


def test_sub_configuration_shares_the_record_of_defaults():
    c = HFConfig({"model_type": "dbrx", "ffn_config": {"moe_top_k": 4}}, "dbrx.json")
    ffn = c.sub("ffn_config")
    assert ffn.int("moe_top_k") == 4 and ffn.int("moe_num_experts", 16) == 16
    assert c.defaults_used == ["ffn_config.moe_num_experts=16"]
    with pytest.raises(ValueError, match=r"dbrx.json\[ffn_config\] \(model_type 'dbrx'\): required field 'x'"):
        ffn.int("x")
    with pytest.raises(ValueError, match="field 'attn_config' is missing"):
        c.sub("attn_config")


def test_require_refuses_what_moelab_does_not_implement():
    c = reader(scoring_func="softmax")
    c.require("topk_method", lambda v: v in (None, "noaux_tc"), "'noaux_tc'")  # absent: passes
    with pytest.raises(ValueError, match="'scoring_func'='softmax' is not supported by moelab: allowed 'sigmoid'"):
        c.require("scoring_func", lambda v: v in (None, "sigmoid"), "'sigmoid'")


def test_load_json_names_the_file(tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"a": 1}))
    assert load_json(f) == {"a": 1}
    for text, match in (("{", "not valid JSON"), ("[1]", "a config must be a JSON object"),
                        ('{"a": 1' + "0" * 5000 + "}", "not valid JSON")):
        f.write_text(text)
        with pytest.raises(ValueError, match=f"^{f}: {match}"):
            load_json(f)
    with pytest.raises(ValueError, match=f"^{tmp_path / 'missing.json'}: cannot be read"):
        load_json(tmp_path / "missing.json")
