"""`moelab generate` on a Hugging Face directory and a run: a batch of prompts, --quant, --max-memory-gb with
its cache policy, the figures it prints, the loading progress bar, and one-line errors for bad values. Each
text is checked against the library driving the same model prompt by prompt."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import word_tokenizer
from moelab import hf
from moelab.cli.main import main
from moelab.config.model import ModelConfig, MoEConfig
from moelab.inference.generate import generate
from moelab.inference.offload import expert_cache, resident_bytes
from moelab.inference.prepare import prepare_inference
from moelab.model.transformer import MoETransformer

V = 64
CFG = ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48,
                  moe=MoEConfig(d_model=64, d_expert=32, n_experts=8, top_k=2))
PROMPTS = ["t1 t2 t3", "t9", "t4 t5 t6 t7 t8"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A float32 Qwen3-MoE-like checkpoint with a word-level tokenizer ("t0" … "t62", "[UNK]")."""
    root = tmp_path_factory.mktemp("gen")
    word_tokenizer(root / "tokenizer.json", V)
    torch.manual_seed(0)
    model = MoETransformer(CFG)
    for w in model.parameters():  # larger than the init's, so that greedy tokens depend on the whole prompt
        w.data.normal_(0, 0.3)
    return hf.save(model, root / "hf", tokenizer_json=root / "tokenizer.json")


def _expected(model, n: int = 6) -> list[list[str]]:
    """Each prompt continued alone, greedy, by the library: the words the CLI prints."""
    out = []
    for p in PROMPTS:
        ids = [int(t[1:]) for t in p.split()]
        out.append(p.split() + [f"t{i}" for i in generate(model, ids, n)])
    return out


def _texts(stdout: str) -> list[list[str]]:
    """The words of each prompt + continuation of a batch, after its '--- prompt i ---' header."""
    return [re.findall(r"t\d+", part) for part in re.split(r"--- prompt \d+ ---\n", stdout)[1:]]


def test_a_batch_of_prompts_from_flags_and_a_file(hf_dir, tmp_path, capsys):
    file = tmp_path / "prompts.txt"
    file.write_text(f"{PROMPTS[2]}\n\n")
    assert main(["generate", str(hf_dir), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--prompts-file",
                 str(file), "--temperature", "0", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert _texts(out.out) == _expected(hf.load(hf_dir))
    assert re.search(r"3 prompt\(s\), 18 new tokens: load .* decode [\d.]+ tokens/s .* peak RSS [\d.]+ GiB", out.err)
    assert "expert cache" not in out.err and "loading" not in out.err  # no budget; stderr is no terminal


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_quant_and_a_memory_budget(hf_dir, capsys, quant):
    """Within a budget of the non-expert weights + 12 of the 16 experts, each policy prints the tokens the
    model quantized in memory gives, and the cache's figures."""
    sized = hf.load(hf_dir, quant=quant, max_memory_gb=1.0)  # room for all: the sizes of the parts
    budget = (resident_bytes(sized) + 12 * expert_cache(sized).get((0, 0)).nbytes) / 1e9
    expected = _expected(hf.load(hf_dir, quant=quant))
    for policy in ("lru", "lfu"):
        args = ["generate", str(hf_dir), *sum([["--prompt", p] for p in PROMPTS], []), "--temperature", "0",
                "--max-new-tokens", "6", "--max-memory-gb", str(budget), "--cache-policy", policy, "--prefetch"]
        assert main(args + (["--quant", quant] if quant else [])) == 0
        out = capsys.readouterr()
        assert _texts(out.out) == expected
        m = re.search(r"expert cache \(([\d.]+) MB, (\w+)\): hit rate ([\d.]+) %, ([\d.]+) MB read from disk per "
                      r"decode token", out.err)
        assert m and m.group(2) == policy and 0 < float(m.group(3)) < 100 and float(m.group(4)) > 0, out.err


def test_a_run_quantized_and_what_does_not_apply_to_it(hf_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["convert", "--from-hf", str(hf_dir), str(run)]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "t1 t2", "--quant", "int4", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    model = prepare_inference(hf.load(hf_dir), "int4")
    assert re.findall(r"t\d+", capsys.readouterr().out) == ["t1", "t2"] + [f"t{i}" for i in generate(model, [1, 2], 3)]
    assert main(["generate", str(run), "--max-memory-gb", "1"]) == 2
    assert "max_memory_gb applies to a quantized run or a Hugging Face directory" in capsys.readouterr().err
    q4 = tmp_path / "q4"
    assert main(["convert", "--from-hf", str(hf_dir), str(q4), "--quant", "int4"]) == 0
    capsys.readouterr()
    outs = []
    for budget in ([], ["--max-memory-gb", "1"]):  # a quantized run's experts read on demand: the same tokens
        assert main(["generate", str(q4), "--prompt", "t1 t2", "--max-new-tokens", "5", "--temperature", "0",
                     *budget]) == 0
        printed = capsys.readouterr()
        outs.append((printed.out, printed.err))
    assert re.findall(r"t\d+", outs[0][0]) == re.findall(r"t\d+", outs[1][0])
    assert "hit rate" in outs[1][1] and "hit rate" not in outs[0][1]
    _error(capsys, [str(q4), "--quant", "int8"], "quant='int8'", "already quantized (int4)")


def test_zero_new_tokens_prints_the_prompts(hf_dir, capsys):
    assert main(["generate", str(hf_dir), "--prompt", "t1 t2", "--max-new-tokens", "0"]) == 0
    out = capsys.readouterr()
    assert re.findall(r"t\d+", out.out) == ["t1", "t2"] and "Traceback" not in out.err


def _error(capsys, args: list[str], *needles: str) -> None:
    """Exit status 2 and one line on stderr, `moelab generate: error: ...`, naming each needle."""
    try:
        code = main(["generate", *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("moelab generate: error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err)


def test_bad_values_are_one_line_errors(hf_dir, tmp_path, capsys):
    d = str(hf_dir)
    _error(capsys, [d, "--quant", "int3"], "--quant", "invalid choice: 'int3'", "'int8', 'int4'")
    _error(capsys, [d, "--max-memory-gb", "lots"], "--max-memory-gb", "'lots' is not a number")
    _error(capsys, [d, "--max-memory-gb", "0"], "max_memory_gb=0.0 is invalid", "> 0")
    _error(capsys, [d, "--max-memory-gb", "1e-6"], "below what this model needs", "allowed >= ")
    _error(capsys, [d, "--cache-policy", "mru", "--max-memory-gb", "1"], "--cache-policy", "invalid choice: 'mru'")
    _error(capsys, [d, "--cache-policy", "lfu"], "--cache-policy and --prefetch apply with --max-memory-gb")
    _error(capsys, [d, "--prefetch"], "apply with --max-memory-gb")
    _error(capsys, [d, "--quant", "int4", "--group-size", "48"], "group_size=48 is not supported", "32, 64, 128, 256")
    _error(capsys, [d, "--prompts-file", str(tmp_path / "missing.txt")], "No such file", "missing.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    _error(capsys, [d, "--prompts-file", str(tmp_path / "blank.txt")], "holds no prompt")


def test_loading_shows_a_progress_bar(hf_dir, capsys):
    hf.load(hf_dir, progress=True)
    err = capsys.readouterr().err
    assert "loading hf" in err and "100%" in err
    hf.load(hf_dir, quant="int8", max_memory_gb=1.0, progress=False)
    assert capsys.readouterr().err == ""
