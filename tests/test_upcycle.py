"""moelab.training.upcycle and `moelab upcycle` on tiny dense models transformers builds (Llama, Qwen2, Qwen3,
Mistral): the dense families load with transformers' logits; the upcycled MoE computes the dense model's logits at
step 0 (renormalised top-k softmax, identical experts); fine-grained experts sum to the FFN; the run directory is
whole or absent; bad values are named errors; `moelab train --init-from OUT` continues the upcycled run."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moelab import hf  # noqa: E402
from moelab.cli.main import main  # noqa: E402
from moelab.data.tokenizer import train_tokenizer  # noqa: E402
from moelab.runs.load import load_run  # noqa: E402
from moelab.training.upcycle import upcycle, upcycle_config, upcycle_model  # noqa: E402

V = 300
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=64, initializer_range=0.1, eos_token_id=None,
              bos_token_id=None, pad_token_id=None)
ARCHS = {"llama": lambda: transformers.LlamaConfig(**COMMON),
         "qwen2": lambda: transformers.Qwen2Config(**COMMON),
         "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
         "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None)}
TEXT = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i} of a tiny corpus" for i in range(300))


def _dense_dir(arch: str, path, seed: int = 0, tokenizer: bool = False):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(ARCHS[arch]()).eval()
    with torch.no_grad():  # norms that matter
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith("norm.weight"):
                t.data.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    if tokenizer:
        train_tokenizer([TEXT], V, path / "tokenizer.json")
    return model, path


def _ids(seq: int = 17) -> torch.Tensor:
    return torch.randint(0, V, (2, seq), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_dense_families_load_and_upcycle_to_the_same_logits(arch, tmp_path):
    """hf.load of a dense checkpoint = transformers' logits; the upcycled MoE (E=8, top-2) = the same logits."""
    ref, path = _dense_dir(arch, tmp_path)
    dense = hf.load(path, for_training=True)
    assert dense.cfg.moe is None
    ids = _ids()
    with torch.no_grad():
        expected = ref(ids).logits
        torch.testing.assert_close(dense(ids).logits, expected, atol=1e-5, rtol=1e-5)
        moe = upcycle_model(dense, n_experts=8, top_k=2, seed=1)
        assert moe.cfg.moe.n_experts == 8 and all(b.is_moe for b in moe.blocks)
        torch.testing.assert_close(moe(ids).logits, expected, atol=1e-5, rtol=1e-5)
        # the routing is not trivial: the random router picks different experts for different tokens
        chosen = moe.blocks[0].ffn.router(moe.embed(ids).view(-1, 32)).topk_idx
        assert len(set(chosen[:, 0].tolist())) > 1


def test_upcycled_experts_are_the_ffn_and_differ_once_perturbed(tmp_path):
    """Each expert is the dense FFN (checked on its own, not through the model); perturbing one expert moves the
    logits: the invariant holds because the copies are identical."""
    ref, path = _dense_dir("llama", tmp_path)
    dense = hf.load(path, for_training=True)
    moe = upcycle_model(dense, n_experts=4, top_k=2)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dense.blocks[1].ffn(x)
        for e in range(4):
            torch.testing.assert_close(moe.blocks[1].ffn.experts.ffn(x, e), want, atol=1e-6, rtol=1e-6)
        ids = _ids()
        before = moe(ids).logits.clone()
        moe.blocks[0].ffn.experts.w_out[3].mul_(1.5)
        assert (moe(ids).logits - before).abs().max() > 1e-3


def test_fine_grained_slices_sum_to_the_ffn(tmp_path):
    """granularity G: expert e is hidden slice e mod G; the G slices' outputs add up to the dense FFN (SwiGLU is a
    sum over hidden units), and route_scale = G."""
    _, path = _dense_dir("qwen2", tmp_path)
    dense = hf.load(path, for_training=True)
    moe = upcycle_model(dense, n_experts=8, top_k=4, granularity=4)
    assert moe.cfg.moe.d_expert == 12 and moe.cfg.moe.route_scale == 4.0
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ffn = moe.blocks[0].ffn.experts
        total = sum(ffn.ffn(x, e) for e in range(4))
        torch.testing.assert_close(total, dense.blocks[0].ffn(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ffn.ffn(x, 5), ffn.ffn(x, 1))  # expert 5 copies slice 1


@pytest.mark.parametrize("kw, match", [
    (dict(n_experts=2, top_k=4), r"top_k=4 is invalid with experts=2: allowed 1 <= top_k <= experts"),
    (dict(n_experts=0, top_k=1), r"experts=0 is invalid: allowed an integer >= 1"),
    (dict(n_experts=8, top_k=2, granularity=5), r"granularity=5 is invalid: allowed a divisor"),
])
def test_bad_values_are_named(kw, match):
    from moelab.config.model import ModelConfig

    with pytest.raises(ValueError, match=match):
        upcycle_config(ModelConfig(moe=None, d_ff=48, d_model=32, n_heads=4), **kw)


def test_cli_upcycle_then_train_init_from(tmp_path, capsys):
    """`moelab upcycle` writes a run whose model is the upcycled dense one (same logits as transformers' dense
    model); `moelab train --init-from` continues it on text, tokenized with the checkpoint's tokenizer, from a
    step-0 metrics line whose loss is the upcycled (= dense) model's; the result exports as Mixtral."""
    ref, path = _dense_dir("llama", tmp_path / "dense", tokenizer=True)
    out = tmp_path / "moe"
    assert main(["upcycle", str(path), str(out), "--experts", "4", "--top-k", "2"]) == 0
    model, config = load_run(out, for_training=True)
    assert config["init"]["upcycled"]["experts"] == 4 and config["init"]["prompt"] == "hf"
    assert (out / "tokenizer.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, ref(_ids()).logits, atol=1e-5, rtol=1e-5)
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    run = tmp_path / "run"
    assert main(["train", "--init-from", str(out), "--data", str(data), "--out", str(run), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--log-every", "1", "--threads", "1",
                 "--lr", "1e-3", "--warmup-steps", "0", "--quiet"]) == 0
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    assert len(lines[0]["expert_load"]) == 2 and len(lines[0]["expert_load"][0]) == 4
    # the step-0 validation loss is the dense transformers model's on the same validation windows
    from moelab.data.tokens import TokenData

    val = TokenData(run / "data", 0.05)
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in val.iter_eval_batches(2, 16, max_batches=1):
            logits = ref(x).logits
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="sum").item()
            n += y.numel()
    assert lines[0]["val_loss"] == pytest.approx(total / n, rel=1e-5)
    trained, _ = load_run(run, for_training=True)
    assert not torch.equal(trained.blocks[0].ffn.experts.w_in, model.blocks[0].ffn.experts.w_in)
    # the upcycled Llama exports as Mixtral (renormalised top-k softmax, every layer MoE) with the same logits
    assert main(["convert", "--to-hf", str(run), str(tmp_path / "hf")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(back).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, trained(_ids()).logits, atol=1e-5, rtol=1e-5)


def test_moelab_dense_run_upcycles(tmp_path):
    from moelab.config.model import ModelConfig
    from moelab.config.train import TrainConfig
    from moelab.training.train import train

    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=48, max_seq_len=32,
                      moe=None)
    res = train(cfg, TrainConfig(steps=1, batch_size=2, seq_len=16, eval_batches=1, warmup_steps=0, threads=1),
                tmp_path / "dense", data_path=data, progress=False)
    out = upcycle(tmp_path / "dense", tmp_path / "moe", n_experts=4, top_k=1)
    moe, config = load_run(out, for_training=True)
    assert config["init"]["prompt"] == "run"
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, res.model.eval()(ids).logits, atol=1e-5, rtol=1e-5)


def test_errors_and_atomic_output(tmp_path, capsys, monkeypatch):
    _, path = _dense_dir("llama", tmp_path / "dense")
    capsys.readouterr()
    assert main(["upcycle", str(path), str(tmp_path / "a"), "--experts", "2", "--top-k", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moelab upcycle: error: top_k=3") and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    assert main(["upcycle", str(path), str(busy), "--experts", "2", "--top-k", "1"]) == 2
    assert "not an empty directory" in capsys.readouterr().err and [p.name for p in busy.iterdir()] == ["x"]
    # an MoE checkpoint is refused
    moe_dir = tmp_path / "moe"
    transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(
        **{**COMMON, "intermediate_size": 16}, num_local_experts=4, num_experts_per_tok=2)).save_pretrained(moe_dir)
    assert main(["upcycle", str(moe_dir), str(tmp_path / "b"), "--experts", "2", "--top-k", "1"]) == 2
    assert "already a Mixture-of-Experts" in capsys.readouterr().err
    # a failure while writing leaves nothing behind: OUT absent, no temporary directory
    from moelab.runs import checkpoint

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "save_checkpoint", broken)
    assert main(["upcycle", str(path), str(tmp_path / "c"), "--experts", "2", "--top-k", "1"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "dense", "moe"]
