"""Quantized runs (moelab.runs.quantized, `moelab convert --quant`): written once, loaded back without re-quantizing to
the very model `prepare_inference` makes; the on-disk layout; `moelab generate` / `moelab eval` on such a run;
the named errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import peak_rss_child, word_tokenizer
from moelab import ModelConfig, MoEConfig, hf
from moelab.cli.main import main
from moelab.inference.engine import InferenceEngine
from moelab.inference.formats import Int4Weight, Int8Weight
from moelab.inference.prepare import prepare_inference
from moelab.model.transformer import MoETransformer
from moelab.runs.checkpoint import CheckpointError
from moelab.runs.convert import convert_from_hf
from moelab.runs.load import load_run
from moelab.runs.quantized import LAYOUT, load_quantized, quantized_state
from moelab.runs.rundir import RunDir

V = 96


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_dir(request, tmp_path_factory):
    """A tiny Qwen3-MoE-shaped Hugging Face directory (moelab's export) with a word-level tokenizer."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm="head", max_seq_len=64,
                      tie_embeddings=request.param, moe=MoEConfig(d_model=64, d_expert=32, n_experts=4, top_k=2))
    model = MoETransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    root = tmp_path_factory.mktemp("hf")
    word_tokenizer(root / "tok.json", V)
    return hf.save(model.to(torch.bfloat16), root / "model", tokenizer_json=root / "tok.json")


@pytest.mark.parametrize(("quant", "group_size"), [("int8", 32), ("int4", 32), ("int4", 64)])
def test_a_quantized_run_loads_back_without_requantizing(hf_dir, tmp_path, quant, group_size, monkeypatch):
    run = convert_from_hf(hf_dir, tmp_path / "run", quant=quant, group_size=group_size)
    config = json.loads((run / "config.json").read_text())
    assert config["quant"] == {"format": quant, "group_size": group_size, "layout": LAYOUT}
    want = prepare_inference(hf.load(hf_dir), quant, group_size)
    for cls in (Int8Weight, Int4Weight):
        monkeypatch.setattr(cls, "quantize", classmethod(lambda *a: pytest.fail("re-quantized at load")))
    model, _ = load_run(run)
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want(ids).logits)
    assert model.blocks[0].attn.wqkv.w.quant == quant and model.head.w.quant == quant
    # its decode steps run on the engine, as the model it was converted from (it used to load without one)
    assert isinstance(model.decoder, InferenceEngine) and model.decoder.describe() == want.decoder.describe()


def test_the_layout_on_disk(hf_dir, tmp_path):
    run = convert_from_hf(hf_dir, tmp_path / "run", quant="int4")
    with safe_open(str(RunDir(run).latest_checkpoint() / "model.safetensors"), framework="pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118
        dtypes = {n: f.get_slice(n).get_dtype() for n in f.keys()}  # noqa: SIM118
    # q, k, v stored as the float model's parts; codes two per byte; scale and zero per group of 32
    assert shapes["blocks.0.attn.wq.qweight"] == (64, 32) and shapes["blocks.0.attn.wk.qweight"] == (32, 32)
    assert shapes["blocks.0.attn.wv.scale_zero"] == (2, 32, 2) and dtypes["blocks.0.attn.wq.qweight"] == "U8"
    assert shapes["blocks.1.ffn.experts.gate_up.qweight"] == (4, 64, 32)  # [E, 2I, D/2]
    assert shapes["blocks.1.ffn.experts.down.scale_zero"] == (4, 1, 64, 2)  # [E, I/32, D, 2]
    assert shapes["head.qweight"] == (V, 32) and shapes["embed.weight"] == (V, 64)
    assert shapes["blocks.1.ffn.router.weight"] == (4, 64) and dtypes["blocks.1.ffn.router.weight"] == "BF16"
    assert not [n for n in shapes if "wqkv" in n or "w_in" in n or n.endswith("attn.wq.weight")]


def test_cli_convert_generate_and_eval_a_quantized_run(hf_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["convert", "--from-hf", str(hf_dir), str(run), "--quant", "int4", "--group-size", "32"]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "t1 t2 t3", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("t1 t2 t3")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{i % 90}" for i in range(300)))
    assert main(["eval", str(run), "--data", str(text), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
    assert main(["convert", "--to-hf", str(run), str(tmp_path / "back")]) == 2
    assert "quantized model: a Hugging Face export needs float weights" in capsys.readouterr().err
    assert main(["convert", "--from-hf", str(hf_dir), str(tmp_path / "r2"), "--quant", "int4",
                 "--group-size", "48"]) == 2
    assert "group_size=48 is not supported" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()  # refused before anything is written


def test_damaged_or_newer_runs_are_named_errors(hf_dir, tmp_path):
    run = convert_from_hf(hf_dir, tmp_path / "run", quant="int8")
    ckpt = RunDir(run).latest_checkpoint()
    config = json.loads((ckpt / "config.json").read_text())
    with pytest.raises(CheckpointError, match="quantized layout 99 is not readable"):
        load_quantized(ckpt, {**config, "quant": {**config["quant"], "layout": 99}})
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["blocks.1.attn.wk.scale"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks.1.attn.wk: tensors \['qweight'\] are no weight format"):
        load_quantized(bad, config)
    tensors = load_file(str(ckpt / "model.safetensors"))
    save_file({**tensors, "extra.weight": torch.zeros(2)}, str(bad / "model.safetensors"))
    for budget in (None, 1.0):  # the experts left on disk or not, the rest of the file must fit the model
        with pytest.raises(CheckpointError, match=r"does not fit the quantized model: unexpected \['extra.weight'\]"):
            load_quantized(bad, config, max_memory_gb=budget)
    del tensors["blocks.0.ffn.experts.down.scale"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks.0.ffn.experts: tensors \['qweight'\] are no weight format"):
        load_quantized(bad, config, max_memory_gb=1.0)
    with pytest.raises(ValueError, match="is not converted: run moelab.inference.prepare_inference"):
        quantized_state(hf.load(hf_dir, for_training=True))


@pytest.mark.parametrize(("quant", "policy", "prefetch"), [("int8", "lru", False), ("int4", "lfu", True)])
def test_a_quantized_run_within_a_budget_computes_what_it_does_in_memory(hf_dir, tmp_path, quant, policy, prefetch,
                                                                         monkeypatch):
    """The routed experts stay in model.safetensors and are read row by row on demand, already quantized:
    the logits and tokens equal the run loaded whole, bit for bit, and the cache reads exactly the misses'
    bytes as stored."""
    from moelab.inference.generate import generate
    from moelab.inference.offload import OffloadedExperts, expert_cache, resident_bytes

    run = convert_from_hf(hf_dir, tmp_path / "run", quant=quant)
    whole, _ = load_run(run)
    for cls in (Int8Weight, Int4Weight):
        monkeypatch.setattr(cls, "quantize", classmethod(lambda *a: pytest.fail("re-quantized at load")))
    probe, _ = load_run(run, max_memory_gb=1.0)
    one = expert_cache(probe).get((0, 0)).nbytes
    expert_cache(probe).close()
    budget = (resident_bytes(probe) + 3 * one) / 1e9  # 3 of the 8 experts of the two layers
    small, _ = load_run(run, max_memory_gb=budget, policy=policy, prefetch=prefetch)
    cache = expert_cache(small)
    assert isinstance(small.blocks[1].ffn.experts, OffloadedExperts) and 3 * one <= cache.capacity < 4 * one
    assert resident_bytes(whole) - resident_bytes(small) == 8 * one
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(small(ids).logits, whole(ids).logits)
    assert generate(small, [1, 2, 3], 12) == generate(whole, [1, 2, 3], 12)
    s = cache.stats
    assert s.misses > 0 and s.evictions > 0 and s.hits > 0 and cache.used <= cache.capacity
    with safe_open(str(RunDir(run).latest_checkpoint() / "model.safetensors"), framework="pt") as f:
        stored = sum(f.get_slice(n)[0].numel() * f.get_slice(n)[0].element_size()
                     for n in f.keys() if n.startswith("blocks.0.ffn.experts."))  # noqa: SIM118
    assert s.bytes_read == stored * (s.misses + s.prefetched)
    with pytest.raises(ValueError, match=r"max_memory_gb=1e-06 is below what this model needs in memory"):
        load_run(run, max_memory_gb=1e-6)
    with pytest.raises(ValueError, match=r"policy='mru' is invalid: allowed 'lru', 'lfu'"):
        load_run(run, max_memory_gb=1.0, policy="mru")
    cache.close()


# -- peak memory of loading a quantized run, in a fresh process (conftest.peak_rss_child) -----------------------

# Warm-up before the baseline: a one-layer model of the same widths in int4 generates two tokens (the kernels'
# code, thread pools, first-use buffers), so what is measured is what this run's loading and decoding add.
_RUN_CHILD = """
from moelab.config import MoEConfig
from moelab.inference.generate import generate
from moelab.inference.offload import expert_cache, resident_bytes
from moelab.inference.prepare import prepare_inference
from moelab.runs.load import load_run

torch.manual_seed(0)
tiny = MoETransformer(ModelConfig(vocab_size=1024, d_model=256, n_layers=1, n_heads=4, n_kv_heads=4,
                                  max_seq_len=64, moe=MoEConfig(d_model=256, d_expert=512, n_experts=2, top_k=1)))
generate(prepare_inference(tiny.bfloat16(), "int4"), list(range(1, 17)), 2)
del tiny
budget = None if sys.argv[2] == "whole" else float(sys.argv[2])
base = reset_peak()
model = load_run(sys.argv[1], max_memory_gb=budget, policy="lfu")[0]
loading = peak() - base
generate(model, list(range(1, 17)), 32, temperature=1.0, seed=0)
cache = expert_cache(model)
print(loading, peak() - base, resident_bytes(model), cache.stats.bytes_read if cache else 0)
"""


def test_loading_a_quantized_run_peak_memory(tmp_path):
    """A 4-layer model with 24 experts per layer, converted to an int4 run (25.0 MB resident). Loaded whole, peak
    RSS rises by < 1.1x the loaded model + 25 MB: docs/BENCHMARKS.md measured 1.11x for a 3.31 GB run, where fixed
    costs vanish; at this size they are ~20 MB (measured 44.7-47.4 MB in three runs, a busy machine); a whole
    extra copy of the experts (2.6x when it read through a memory map) fails. With a 20 MB budget (policy lfu),
    loading stays under the budget and loading + 32 sampled tokens under the budget + 20 MB (the bound of
    test_offload's budgeted hf.load), while the experts read exceed half the budget (measured: loading 0.9-1.7
    MB, with decoding 23.3-24.4 MB, 14 MB read)."""
    cfg = ModelConfig(vocab_size=1024, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=64,
                      moe=MoEConfig(d_model=256, d_expert=512, n_experts=24, top_k=2))
    torch.manual_seed(0)
    hf.save(MoETransformer(cfg).bfloat16(), tmp_path / "hf")
    run = convert_from_hf(tmp_path / "hf", tmp_path / "run", quant="int4")
    budget = 20e6
    whole, _, size, _ = map(int, peak_rss_child(_RUN_CHILD, run, "whole"))  # each in its own process
    loading, decoding, _, read = map(int, peak_rss_child(_RUN_CHILD, run, budget / 1e9))
    print(f"whole: peak RSS rise {whole / 1e6:.1f} MB for {size / 1e6:.1f} MB ({whole / size:.2f}x); budget "
          f"{budget / 1e6:.0f} MB: loading {loading / 1e6:.1f} MB, with decoding {decoding / 1e6:.1f} MB, "
          f"{read / 1e6:.0f} MB read")
    assert size > 20e6 and whole < 1.1 * size + 25e6
    assert loading < budget and decoding < budget + 20e6 and read > 0.5 * budget
