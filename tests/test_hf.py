"""moelab.hf against transformers itself: tiny random models of each architecture, saved with
`save_pretrained` and loaded into moelab (and moelab models exported and loaded by transformers), must give
the same float32 logits and the same greedy continuation. Plus clear errors and lazy-loading memory."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from conftest import peak_rss_child, random_moelab, save_with, saved_checkpoints, tiny_hf, word_tokenizer  # noqa: E402,I001
from moelab import hf  # noqa: E402
from moelab.config.model import ModelConfig, MoEConfig  # noqa: E402
from moelab.config.rope import RopeScaling  # noqa: E402
from moelab.config.train import preset  # noqa: E402
from moelab.inference.generate import generate  # noqa: E402
from moelab.model.rope import rope_inv_freq, yarn_attention_factor  # noqa: E402
from moelab.model.transformer import MoETransformer  # noqa: E402

V = 97
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, initializer_range=0.1, eos_token_id=None, bos_token_id=None,
              pad_token_id=None)


def _hf_config(arch: str):
    T = transformers
    if arch == "mixtral":
        return T.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":  # layer 0 dense (mlp_only_layers), shared expert with its sigmoid gate
        return T.Qwen2MoeConfig(**{**COMMON, "num_hidden_layers": 3}, intermediate_size=40, moe_intermediate_size=16,
                                shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                mlp_only_layers=[0], norm_topk_prob=False)
    if arch == "qwen3_moe":
        return T.Qwen3MoeConfig(**COMMON, intermediate_size=40, moe_intermediate_size=16, num_experts=4,
                                num_experts_per_tok=2, head_dim=16, norm_topk_prob=True)
    if arch == "olmoe":
        return T.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    if arch == "deepseek_v3":
        return T.DeepseekV3Config(**{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4}, intermediate_size=48,
                                  moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                                  num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                                  q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                  v_head_dim=8, routed_scaling_factor=2.5)
    raise AssertionError(arch)


ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


def _tiny_hf(arch: str, seed: int = 0):
    return tiny_hf(_hf_config(arch), seed)


def _ids(seed: int = 0, batch: int = 3, seq: int = 19) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hf_greedy(model, prompt: list[int], n: int = 20) -> list[int]:
    x = torch.tensor([prompt])  # an explicit mask: generate would otherwise mask prompt tokens equal to pad_token_id
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def assert_same(hf_model, ours: MoETransformer, what: str = "") -> float:
    """Same logits (elementwise within 1e-5 absolute + 1e-5 relative, and at most 1e-5 of the logit scale
    apart) and the same 20-token greedy continuation; returns the largest |difference|."""
    ids = _ids()
    with torch.no_grad():
        expected, got = hf_model(ids).logits, ours(ids).logits
    assert expected.shape == got.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    diff, scale = (expected - got).abs().max().item(), expected.abs().max().item()
    print(f"{what}: max |logit diff| {diff:.2e}, logit scale {scale:.2e}")
    assert diff <= 1e-5 * scale, (diff, scale)
    prompt = _ids(1, 1, 5)[0].tolist()
    assert generate(ours, prompt, 20, temperature=0.0) == _hf_greedy(hf_model, prompt)
    return diff


saved = saved_checkpoints(ARCHS, _tiny_hf)


def test_load_matches_transformers(saved):
    """The model hf.load gives is converted for inference with its engine installed (the README's path decodes on the
    fast path) and computes transformers' logits; for_training=True gives the plain trainable model, which does too;
    int8 as read computes what int8 after a whole float load computes."""
    from moelab.inference.engine import InferenceEngine
    from moelab.inference.prepare import InferenceLinear, prepare_inference

    arch, hf_model, path = saved
    ours = hf.load(path)
    assert isinstance(ours, MoETransformer) and isinstance(ours.decoder, InferenceEngine)
    assert isinstance(ours.head, InferenceLinear) and not any(p.requires_grad for p in ours.parameters())
    assert_same(hf_model, ours)
    trainable = hf.load(path, for_training=True)
    assert trainable.decoder is None and all(p.requires_grad for n, p in trainable.named_parameters()
                                             if "router" not in n or not trainable.cfg.moe.freeze_router)
    assert_same(hf_model, trainable)
    with pytest.raises(ValueError, match="for_training=True loads the float trainable model"):
        hf.load(path, quant="int8", for_training=True)
    ids = _ids()
    with torch.no_grad():  # int8 as read = int8 after a whole float load (every tensor of a slot read: gate and up)
        want = prepare_inference(trainable, "int8")(ids).logits
        assert torch.equal(hf.load(path, quant="int8")(ids).logits, want)


def test_loads_stacked_expert_layout(saved, tmp_path):
    """transformers 5 holds experts stacked (experts.gate_up_proj [E, 2F, D]); such files load too."""
    arch, hf_model, path = saved
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(state, str(tmp_path / "model.safetensors"))
    assert_same(hf_model, hf.load(tmp_path))


def test_sharded_checkpoint(tmp_path):
    model = _tiny_hf("qwen2_moe", seed=3)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert_same(model, hf.load(tmp_path))


def _moelab_configs() -> dict[str, ModelConfig]:
    mix = preset("tiny", vocab_size=V, d_model=32, n_layers=2, max_seq_len=64, **{"moe.d_expert": 16})[0]
    return {
        "mixtral": mix,
        "qwen2_moe": ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64, d_ff=40,
                                 qkv_bias=True, n_dense_layers=1, tie_embeddings=False,
                                 moe=MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2, n_shared=2, d_shared=12,
                                               shared_gate=True, norm_topk_prob=False)),
        "qwen3_moe": ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                                 qk_norm="head", max_seq_len=64,
                                 moe=MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2)),
        "olmoe": ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm="full",
                             max_seq_len=64, moe=MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2,
                                                           norm_topk_prob=False)),
        "deepseek_v3": ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, n_kv_heads=4, attention="mla",
                                   q_lora_rank=None, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                   v_head_dim=8, max_seq_len=64, d_ff=48, n_dense_layers=1,
                                   moe=MoEConfig(d_model=32, d_expert=16, n_experts=8, top_k=3, n_shared=2,
                                                 router="sigmoid", n_groups=4, topk_groups=2, expert_bias=True,
                                                 route_scale=2.5)),
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_in_transformers(arch, tmp_path):
    ours = random_moelab(_moelab_configs()[arch])
    hf.save(ours, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == arch
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same(hf_model, ours)
    back = hf.load(tmp_path)  # and round trip into moelab
    torch.testing.assert_close(back(_ids()).logits, ours(_ids()).logits, atol=1e-6, rtol=0)


def test_export_head_dim_other_than_width_over_heads(tmp_path):
    """config.json carries head_dim, which transformers' Qwen2-MoE reads when present (OLMoE's export refuses
    it: transformers sizes OLMoE's q/k norms by hidden_size whatever head_dim is)."""
    cfg = _moelab_configs()["qwen2_moe"]
    ours = random_moelab(cfg.replace(head_dim=16))  # d_model // n_heads = 8
    hf.save(ours, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf_model.model.layers[0].self_attn.q_proj.weight.shape == (4 * 16, 32)
    assert_same(hf_model, ours)
    with pytest.raises(ValueError, match="olmoe: head_dim must be d_model // n_heads"):
        hf.save(MoETransformer(_moelab_configs()["olmoe"].replace(head_dim=16)), tmp_path / "olmoe")


def test_export_refuses_unmatched_config():
    cfg = preset("tiny-deepseek", vocab_size=V, d_model=32, max_seq_len=64)[0]  # GQA with a sigmoid router: GLM-4.5's
    assert hf.adapter_matching(cfg).model_type == "glm4_moe"
    cfg = cfg.replace(moe_every=2)  # MoE every other layer after the dense ones: no sigmoid-router class has it
    with pytest.raises(ValueError, match="no Hugging Face architecture matches.*deepseek_v3: attention must be 'mla'"
                                         ".*glm4_moe: moe_every must be 1"):
        hf.save(MoETransformer(cfg), "/nonexistent/never-written")
    dense = ModelConfig(vocab_size=V, d_model=32, moe=None)
    with pytest.raises(ValueError, match="moe is None"):
        hf.save(MoETransformer(dense), "/nonexistent/never-written")


# -- errors --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral-src")
    _tiny_hf("mixtral").save_pretrained(path)
    return path


def _copy_with(src, dst, drop=(), change=None, config=None):
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}  # noqa: SIM118 (safe_open is not iterable)
    tensors.update(change or {})
    save_file(tensors, str(dst / "model.safetensors"))
    data = json.loads((src / "config.json").read_text())
    data.update(config or {})
    (dst / "config.json").write_text(json.dumps(data))
    return dst


def test_missing_tensor_is_named(mixtral_dir, tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    _copy_with(mixtral_dir, tmp_path, drop=[name])
    with pytest.raises(ValueError, match="missing from the checkpoint: " + name.replace(".", r"\.")):
        hf.load(tmp_path)


def test_wrong_shape_is_named(mixtral_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    _copy_with(mixtral_dir, tmp_path, change={name: torch.zeros(8, 32)})
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(8, 32\), but config.json implies \(16, 32\)"):
        hf.load(tmp_path)


def test_config_disagreeing_with_weights(mixtral_dir, tmp_path):
    _copy_with(mixtral_dir, tmp_path, config={"intermediate_size": 20})
    with pytest.raises(ValueError, match=r"experts\.0\.w1\.weight' has shape \(24, 32\), but config.json implies "
                                         r"\(20, 32\)"):
        hf.load(tmp_path)


def test_unexpected_tensor_is_named(mixtral_dir, tmp_path):
    _copy_with(mixtral_dir, tmp_path, change={"model.layers.0.self_attn.o_proj.bias": torch.zeros(32)})
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.self_attn.o_proj.bias'"):
        hf.load(tmp_path)


def test_unsupported_architecture_and_options(mixtral_dir, tmp_path):
    _copy_with(mixtral_dir, tmp_path, config={"model_type": "phimoe"})
    with pytest.raises(ValueError, match="model_type='phimoe' is not supported.*'mixtral'"):
        hf.load(tmp_path)
    _copy_with(mixtral_dir, tmp_path, config={"model_type": "mixtral", "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="field 'hidden_act'='gelu' is not supported"):
        hf.load(tmp_path)
    _copy_with(mixtral_dir, tmp_path, config={"hidden_act": "silu",
                                              "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="field 'rope_parameters.rope_type'='linear' is not supported by moelab: "
                                         "allowed 'default' .* or 'yarn'"):
        hf.load(tmp_path)
    data = json.loads((mixtral_dir / "config.json").read_text())
    del data["num_local_experts"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="field 'num_local_experts' is missing"):
        hf.load(tmp_path)


def test_no_weights_and_pickles_refused(mixtral_dir, tmp_path):
    (tmp_path / "config.json").write_text((mixtral_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        hf.load(tmp_path)


def test_truncated_or_corrupt_weights_name_the_file(mixtral_dir, tmp_path, capsys):
    """A truncated (or otherwise unreadable) safetensors file is a ValueError naming it; convert writes nothing."""
    from moelab.cli.main import main

    (tmp_path / "src").mkdir()
    src = _copy_with(mixtral_dir, tmp_path / "src")
    weights = src / "model.safetensors"
    whole = weights.read_bytes()
    for broken in (whole[: len(whole) // 2], whole[:6], b"\xff" * 64):
        weights.write_bytes(broken)
        with pytest.raises(ValueError, match=re.escape(f"{weights}: not a readable safetensors file")):
            hf.load(src)
    assert main(["convert", "--from-hf", str(src), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


# -- config.json fields: null, absent and zero as transformers reads them ---------------------------------


def test_null_kv_heads_means_multi_head_attention(tmp_path):
    """"num_key_value_heads": null is num_attention_heads (transformers' OLMoE/Llama/DeepSeek configs map it so)."""
    cfg = transformers.OlmoeConfig(**{**COMMON, "num_key_value_heads": None}, intermediate_size=16, num_experts=4,
                                   num_experts_per_tok=2)
    torch.manual_seed(2)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ours = hf.load(save_with(model, tmp_path, num_key_value_heads=None))
    assert ours.cfg.n_kv_heads == 4
    assert_same(model, ours)


def test_zero_shared_experts_and_explicit_head_dim(tmp_path):
    """n_shared_experts = 0 (transformers stores empty shared-expert tensors) and a Qwen2-MoE head_dim that is
    not hidden // heads load with transformers' logits."""
    cfg = _hf_config("deepseek_v3")
    cfg.n_shared_experts = 0
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ours = hf.load(save_with(model, tmp_path / "deepseek"))
    assert ours.cfg.moe.n_shared == 0
    assert_same(model, ours)
    cfg = _hf_config("qwen2_moe")
    cfg.head_dim = 16  # 2 x hidden_size // num_attention_heads
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ours = hf.load(save_with(model, tmp_path / "qwen"))
    assert ours.cfg.head_width == 16
    assert_same(model, ours)


@pytest.mark.parametrize(("arch", "config", "match"), [
    ("deepseek_v3", {"q_lora_rank": ...}, "required field 'q_lora_rank' is missing"),  # transformers: rank 1536
    ("deepseek_v3", {"routed_scaling_factor": ...}, "required field 'routed_scaling_factor' is missing"),
    ("deepseek_v3", {"n_group": ...}, "required field 'n_group' is missing"),
    ("deepseek_v3", {"n_shared_experts": None}, "field 'n_shared_experts'=None is invalid: allowed an integer >= 0"),
    ("deepseek_v3", {"topk_group": 5}, "field 'topk_group'=5 is invalid: allowed an integer <= n_group"),
    ("qwen2_moe", {"decoder_sparse_step": 0}, "field 'decoder_sparse_step'=0 is invalid: allowed an integer >= 1"),
    ("qwen2_moe", {"num_experts_per_tok": 5}, "'num_experts_per_tok'=5 is invalid: .* <= the number of experts"),
    ("mixtral", {"num_key_value_heads": 3}, "'num_key_value_heads'=3 is invalid: allowed a divisor of"),
    ("olmoe", {"head_dim": 16}, r"'head_dim'=16 is invalid: allowed hidden_size // num_attention_heads \(8\)"),
    ("mixtral", {"hidden_size": 10**400}, r"'hidden_size'=~1e400 is invalid: allowed an integer >= 1 and <= 2147"),
])
def test_fields_transformers_would_default_or_refuse(arch, config, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        hf.load(save_with(_tiny_hf(arch), tmp_path, **config))


# -- run directories, CLI, tokenizer ---------------------------------------------------------------------


def test_convert_round_trip_and_cli(mixtral_dir, tmp_path, capsys):
    from moelab.accounting.card import card_report
    from moelab.cli.generate import generate_text
    from moelab.cli.main import main
    from moelab.runs.load import load_run

    src = tmp_path / "src"
    src.mkdir()
    _copy_with(mixtral_dir, src)
    word_tokenizer(src / "tokenizer.json", V)
    run = tmp_path / "run"
    assert main(["convert", "--from-hf", str(src), str(run)]) == 0
    model, config = load_run(run)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir).eval()
    assert_same(hf_model, model)
    assert isinstance(generate_text(run, "t1 t2 t3", max_new_tokens=5, temperature=0.0), str)
    report = card_report(str(run))
    assert report["total_params"] == sum(p.numel() for p in hf_model.parameters())
    # routing statistics of the converted model: per-layer expert load = transformers' router top-k counts
    with torch.no_grad():
        aux = model(_ids(), stats=True).aux  # routing statistics under no_grad: asked for
        router_logits = hf_model(_ids(), output_router_logits=True).router_logits
    assert len(aux) == len(router_logits) == 2
    for a, logits in zip(aux, router_logits):
        expected = torch.bincount(logits.topk(2, dim=-1).indices.flatten(), minlength=4).float()
        torch.testing.assert_close(a.load, expected)
    assert main(["convert", "--from-hf", str(src), str(run)]) == 2  # refuses to overwrite
    out = tmp_path / "back"
    assert main(["convert", "--to-hf", str(run), str(out)]) == 0
    assert_same(transformers.AutoModelForCausalLM.from_pretrained(out).eval(), model)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert tok("t5 t7")["input_ids"] == [5, 7]
    exported = json.loads((out / "config.json").read_text())  # no <|endoftext|>: no eos, not Mixtral's default 2
    assert exported["eos_token_id"] is None and exported["bos_token_id"] is None
    assert not (out / "tokenizer_config.json").exists()


# -- lazy loading memory ---------------------------------------------------------------------------------

# The baseline is taken (conftest.peak_rss_child) after importing torch and moelab, building a tiny model on the
# meta device and the kernels' first use: what is measured is what loading this model adds.
_LOAD_CHILD = """
import moelab.hf as hf
from moelab.inference import native
from moelab.inference.offload import resident_bytes
from moelab.inference.backend import int4_kernel_available, int8_kernel_available, packed_float_available

int8_kernel_available(), int4_kernel_available(), packed_float_available(torch.float32), native.available()
base = reset_peak()
model = hf.load(sys.argv[1], quant=None if sys.argv[2] == "none" else sys.argv[2])
print(peak() - base, resident_bytes(model))
"""


def test_lazy_loading_peak_memory(tmp_path):
    """6 shards of a ~150 MB model: loading in a fresh process raises peak RSS by < 1.1x the loaded model's size
    (streamed: each tensor read straight into its place, no file mapped). Quantized as read, the loaded model is
    4-6x smaller and each linear's float weights are held until it is converted (one at a time): the bound adds
    ~20 MB for the conversion's temporaries and the heap the tensors below glibc's mmap threshold
    (`moelab.inference.offload`) leave behind (measured: int8 1.12x, int4 1.43x of these 40 and 26 MB models)."""
    cfg = ModelConfig(vocab_size=1024, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=64,
                      moe=MoEConfig(d_model=256, d_expert=512, n_experts=24, top_k=2))
    with torch.device("meta"):
        n_bytes = 4 * MoETransformer(cfg).num_params()
    model = MoETransformer(cfg)
    hf.save(model, tmp_path, max_shard_bytes=n_bytes // 6 + 1)
    del model
    assert len(list(tmp_path.glob("*.safetensors"))) >= 6
    tiny = random_moelab(_moelab_configs()["mixtral"])
    hf.save(tiny, tmp_path / "again")
    hf.save(tiny, tmp_path / "again", max_shard_bytes=1 << 14, overwrite=True)  # re-save: no stale shards
    hf.save(tiny, tmp_path / "again", overwrite=True)
    assert [p.name for p in (tmp_path / "again").glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "again" / "model.safetensors.index.json").exists()
    for quant in (None, "int8", "int4"):
        increase, size = map(int, peak_rss_child(_LOAD_CHILD, tmp_path, str(quant).lower()))
        print(f"{quant}: peak RSS increase {increase / 1e6:.1f} MB for a {size / 1e6:.1f} MB model: "
              f"{increase / size:.2f}x")
        if quant is None:
            assert size > 100e6 and increase < 1.1 * size
        else:
            assert size < n_bytes / 3 and increase < 1.1 * size + 20e6


def test_deepseek_full_rank_query_and_bfloat16(tmp_path):
    """DeepSeek-V3 with q_lora_rank=null (q_proj, interleaved rotary rows permuted) and a bfloat16 checkpoint."""
    cfg = _hf_config("deepseek_v3")
    cfg.q_lora_rank = None
    torch.manual_seed(5)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path / "f32")
    ids = _ids(2)
    with torch.no_grad():
        torch.testing.assert_close(hf.load(tmp_path / "f32")(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
        model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
        ours = hf.load(tmp_path / "bf16")
        assert ours.embed.weight.dtype == torch.bfloat16
        assert ours.blocks[1].ffn.router.bias.dtype == torch.float32
        assert hf.load(tmp_path / "bf16", dtype=torch.float32).embed.weight.dtype == torch.float32
        with pytest.raises(ValueError, match="dtype='fp16' is invalid: allowed 'float32', 'bfloat16', 'float16'"):
            hf.load(tmp_path / "bf16", dtype="fp16")


# -- YaRN rope scaling -------------------------------------------------------------------------------------

# DeepSeek-V3's published config.json (older `rope_scaling` spelling, with `type`)
DEEPSEEK_V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                    "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
# (architecture, rope_scaling, max_position_embeddings): every YaRN option transformers reads, at sizes where
# the sequences below run past original_max_position_embeddings and the ramp spans several rotary pairs
YARN_CASES = {
    "deepseek_v3-published": ("deepseek_v3", DEEPSEEK_V3_YARN, 163840),
    "deepseek_v3-long": ("deepseek_v3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                         "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.8}, 128),
    "qwen3_moe": ("qwen3_moe", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 128),
    "mixtral": ("mixtral", {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 40,
                            "attention_factor": 1.25, "beta_fast": 8.0, "truncate": False}, 120),
}


def _tiny_yarn_hf(case: str):
    arch, rope, max_pos = YARN_CASES[case]
    cfg = _hf_config(arch)
    data = cfg.to_dict()
    data.pop("rope_parameters", None)
    data.update(max_position_embeddings=max_pos, rope_scaling=dict(rope), rope_theta=10000.0)
    if arch == "deepseek_v3":
        data.update(qk_rope_head_dim=16, head_dim=16, qk_head_dim=24)  # 8 rotary pairs: the ramp shows
    elif arch == "mixtral":
        data.update(head_dim=8)  # transformers' YaRN needs it set (head_dim=None fails in _compute_yarn_parameters)
    cfg = type(cfg).from_dict(data)
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith("e_score_correction_bias"):
                t.data.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("case", YARN_CASES)
def test_yarn_matches_transformers(case, tmp_path):
    """Load (HF → moelab) and export (moelab → HF) of YaRN models: same logits over 120 positions (past the
    original window), same 20-token greedy continuation from a 60-token prompt, rope_parameters round-trip."""
    hf_model = _tiny_yarn_hf(case)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = hf.load(tmp_path / "hf", for_training=True)
    assert ours.cfg.rope_scaling is not None
    rot, s = hf_model.model.rotary_emb, ours.cfg.rope_scaling
    dim = 2 * rot.inv_freq.numel()
    torch.testing.assert_close(rope_inv_freq(dim, ours.cfg.rope_theta, s).float(), rot.inv_freq, atol=0, rtol=1e-6)
    assert yarn_attention_factor(s) == pytest.approx(rot.attention_scaling, rel=1e-12)
    S = min(ours.cfg.max_seq_len, 120)
    ids = _ids(7, 2, S)
    with torch.no_grad():
        expected, got = hf_model(ids).logits, ours(ids).logits
    diff = (expected - got).abs().max().item()
    print(f"YaRN {case}: max |logit diff| = {diff:.2e} over {tuple(ids.shape)}")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    plain = MoETransformer(ours.cfg.replace(rope_scaling=None)).eval()
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (plain(ids).logits - expected).abs().max() > 1e-2  # the scaling matters at these lengths
    prompt = _ids(8, 1, 60)[0].tolist()
    assert generate(ours, prompt, 20, temperature=0.0) == _hf_greedy(hf_model, prompt)

    hf.save(ours, tmp_path / "back")
    written = json.loads((tmp_path / "back" / "config.json").read_text())["rope_parameters"]
    original = {"beta_fast": 32.0, "beta_slow": 1.0,  # transformers' defaults, written explicitly
                **{k: v for k, v in hf_model.config.rope_parameters.items() if k != "type"}}
    assert written == pytest.approx(original)  # every field, same values (ints written as floats)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert again.model.layers[0].self_attn.scaling == pytest.approx(hf_model.model.layers[0].self_attn.scaling)


def test_deepseek_v3_published_rope_scaling_maps_to_yarn(mixtral_dir, tmp_path):
    """The rope_scaling of DeepSeek-V3's config.json: factor 40 over 4096 positions, and the MLA softmax scale
    multiplied by mscale(40, mscale_all_dim=1)² = (0.1·ln 40 + 1)² (transformers' yarn_get_mscale)."""
    hf_model = _tiny_yarn_hf("deepseek_v3-published")
    hf_model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data.pop("rope_parameters")
    data.update(rope_scaling=DEEPSEEK_V3_YARN, rope_theta=10000)  # exactly as published
    (tmp_path / "config.json").write_text(json.dumps(data))
    _, _, cfg = hf.read_hf_config(tmp_path)
    assert cfg.rope_scaling == RopeScaling(factor=40.0, original_max_seq_len=4096, beta_fast=32.0, beta_slow=1.0,
                                           mscale=1.0, mscale_all_dim=1.0)
    ours = hf.load(tmp_path)
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    assert ours.blocks[0].attn.scale == pytest.approx(qk ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    assert ours.blocks[0].attn.scale == pytest.approx(hf_model.model.layers[0].self_attn.scaling, rel=1e-12)
    torch.testing.assert_close(rope_inv_freq(16, 10000.0, cfg.rope_scaling).float(), hf_model.model.rotary_emb.inv_freq)
    ids = _ids(3, 2, 40)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf_model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("rope", "match"), [
    ({"rope_type": "dynamic", "factor": 2.0}, r"'rope_parameters.rope_type'='dynamic' .* allowed 'default'"),
    ({"type": "llama3", "factor": 8.0}, r"'rope_parameters.type'='llama3' .* allowed 'default' .* 'yarn'"),
    ({"rope_type": "yarn", "original_max_position_embeddings": 32}, r"'rope_parameters.factor' is missing"),
    ({"rope_type": "yarn", "factor": 2.0, "low_freq_factor": 1.0}, r"key\(s\) \['low_freq_factor'\]"),
    ({"rope_type": "yarn", "factor": 0.5}, r"rope_scaling.factor=0.5 is invalid: allowed a number >= 1"),
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": 1, "beta_slow": 4}, r"rope_scaling.beta_fast=1.0"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, r"'partial_rotary_factor'=0.5 is not supported"),
    ({"rope_type": "yarn", "factor": 10**400}, r"'rope_parameters' \(YaRN\) is invalid: int too large"),
    ({"rope_theta": 10**400}, r"'rope_theta'=~1e400 is invalid: allowed a finite number > 0"),
])
def test_unsupported_rope_scalings_are_refused(mixtral_dir, tmp_path, rope, match):
    _copy_with(mixtral_dir, tmp_path, config={"rope_parameters": {"rope_theta": 1e4, **rope}})
    with pytest.raises(ValueError, match=match):
        hf.load(tmp_path)


# -- a converted run continues a prompt as its source does (issue 29) ---------------------------------------


def _source_with_tokenizer(root, bos: bool):
    """A tiny Hugging Face directory whose vocabulary holds <|endoftext|> (as Qwen's does) and whose tokenizer
    adds no special token (bos=False, Qwen-like) or prepends <s> (bos=True, Llama/Mixtral-like); its
    config.json's eos_token_id is 5 (an ordinary word here: where generation stops)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from moelab.config.model import ModelConfig, MoEConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                      moe=MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2))
    model = MoETransformer(cfg)
    for w in model.parameters():  # large weights: the continuation depends on every prompt token
        w.data.normal_(0, 0.3)
    path = hf.save(model, root)
    vocab = {"<|endoftext|>": 0, "<s>": 1} | {f"t{i}": i for i in range(2, V - 1)} | {"[UNK]": V - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>", "<s>"])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": 5}))
    return path


@pytest.mark.parametrize("bos", [False, True], ids=["no-special-tokens", "bos"])
def test_a_converted_run_continues_a_prompt_as_its_source(bos, tmp_path):
    """`moelab generate` on a run converted by `moelab convert --from-hf` prepended <|endoftext|> (the trained-run
    rule) where the source's tokenizer adds nothing or a BOS, and stopped at <|endoftext|>, not at the source's
    eos: the same prompt gave other text. The rule is recorded at conversion; both give transformers' ids."""
    from conftest import run_cli as moelab  # the command in this process: its exit status and output
    from moelab.runs.load import load_model

    src = _source_with_tokenizer(tmp_path / "src", bos)
    run = tmp_path / "run"
    res = moelab("convert", "--from-hf", src, run)
    assert res.returncode == 0, res.stderr
    prompt = "t7 t12 t3 t30"
    expected = transformers.AutoTokenizer.from_pretrained(src)(prompt)["input_ids"]
    assert expected == ([1] if bos else []) + [7, 12, 3, 30]
    for path in (src, run, run / "checkpoints" / "step_00000000"):
        loaded = load_model(path)
        assert loaded.prompt_ids(prompt) == expected, path
        assert loaded.stop_id == 5, path
    texts = []
    for path in (src, run):
        res = moelab("generate", path, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12")
        assert res.returncode == 0, res.stderr
        texts.append(res.stdout)
    assert texts[0] == texts[1]
    source = load_model(src)
    ids = generate(source.model, expected, 12, stop_id=5)
    assert texts[0] == prompt + source.tokenizer.decode(ids, skip_special_tokens=False) + "\n"
