"""The `moelab` command as a user runs it (`main()` in this process, which is all `python -m moelab` runs; a real
process where the test is about one: the run lock's holder killed with SIGKILL, a closed pipe): runs that never
lose work — resume with the run's own data and settings, refused changes, non-finite losses, the run lock,
overwrites — and one-line errors instead of tracebacks. Each test names the case it pins."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from moelab.runs.checkpoint import list_checkpoints

TINY = ["--preset", "tiny", "--d-model", "32", "--n-heads", "2", "--n-kv-heads", "2", "--n-layers", "2",
        "--d-ff", "64", "--moe-d-expert", "32", "--moe-n-experts", "4", "--vocab-size", "384", "--batch-size", "4",
        "--seq-len", "32", "--max-seq-len", "64", "--max-corpus-bytes", "150000", "--log-every", "1",
        "--eval-every", "100", "--eval-batches", "1", "--warmup-steps", "2", "--threads", "1", "--quiet"]


def moelab(*args: str, wait: bool = True):
    """The command's exit status and output (conftest.run_cli); `wait=False` starts it as a process instead."""
    if not wait:
        cmd = [sys.executable, "-m", "moelab", *map(str, args)]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return run_cli(*args)


def one_line_error(res, *needles: str) -> None:
    """Exit status 2, no traceback, and the last line of stderr is the one `moelab <cmd>: error: ...` line,
    naming each needle (notes such as "resuming ..." may come before it)."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr and lines and lines[-1].startswith("moelab "), res.stderr
    assert [line for line in lines if ": error: " in line] == lines[-1:], res.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, res.stderr)


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (on the default corpus)."""
    run = tmp_path_factory.mktemp("base") / "run"
    res = moelab("train", *TINY, "--steps", "4", "--save-every", "2", "--out", run)
    assert res.returncode == 0, res.stderr
    return run


@pytest.fixture
def run(base, tmp_path) -> Path:
    shutil.copytree(base, tmp_path / "run")
    return tmp_path / "run"


# 1. resume keeps the run's tokenizer and data; other text only with --new-data, which keeps the tokenizer
def test_resume_uses_the_runs_own_tokenizer_data_and_settings(run, tmp_path):
    tokenizer, tokens = (run / "tokenizer.json").read_bytes(), (run / "data" / "tokens.bin").read_bytes()
    res = moelab("train", "--out", run, "--resume", "--steps", "6", "--quiet")  # no --data, no --preset
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr and "steps 4 -> 6" in res.stderr
    assert (run / "tokenizer.json").read_bytes() == tokenizer and (run / "data" / "tokens.bin").read_bytes() == tokens
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["steps"] == 6 and saved["train"]["save_every"] == 2  # a flag not given keeps its value
    assert saved["train"]["seq_len"] == 32 and saved["model"]["d_model"] == 32
    resumed = [r for r in records(run) if "resumed" in r]
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4, 5, 6]
    assert len(resumed) == 1 and resumed[0]["step"] == 5
    assert resumed[0]["resumed"] == {"from_step": 4, "changed": {"steps": [4, 6]}}

    other = tmp_path / "other.txt"
    other.write_text("def other():\n    return 'completely different text'\n" * 300)
    before = snapshot(run)
    res = moelab("train", "--out", run, "--resume", "--steps", "8", "--data", other, "--quiet")
    one_line_error(res, "other.txt", "not the text this run was trained on", "--new-data")
    assert snapshot(run) == before  # nothing changed

    res = moelab("train", "--out", run, "--resume", "--steps", "8", "--data", other, "--new-data", "--quiet")
    assert res.returncode == 0, res.stderr
    assert (run / "tokenizer.json").read_bytes() == tokenizer  # the run's tokenizer, not a new one
    data = json.loads((run / "config.json").read_text())["data"]
    assert data["source"]["path"] == str(other.resolve())
    assert data["previous"][0]["source"]["kind"] == "default"
    assert records(run)[-2]["resumed"]["new_data"] == str(other.resolve())

    # the token cache gone: rebuilt from the recorded corpus with the run's tokenizer
    shutil.rmtree(run / "data")
    res = moelab("train", "--out", run, "--resume", "--steps", "9", "--quiet")
    assert res.returncode == 0, res.stderr
    assert (run / "tokenizer.json").read_bytes() == tokenizer and (run / "data" / "tokens.bin").exists()

    (run / "tokenizer.json").write_text((run / "tokenizer.json").read_text().replace('"<|endoftext|>"', '"<|eot|>"'))
    one_line_error(moelab("train", "--out", run, "--resume", "--steps", "10", "--quiet"), "tokenizer.json")


# 2. non-finite losses stop the run; no non-finite checkpoint; retention is a flag
def test_non_finite_training_stops_and_keeps_the_good_checkpoints(run, tmp_path):
    one_line_error(moelab("train", *TINY, "--lr", "inf", "--out", tmp_path / "inf"), "lr=inf")
    assert not (tmp_path / "inf").exists()

    res = moelab("train", "--out", run, "--resume", "--lr", "1e4", "--grad-clip", "0", "--steps", "60",
                 "--save-every", "1", "--keep-checkpoints", "60", "--quiet")
    one_line_error(res, "not finite", "training stopped", "resume with a lower --lr")
    ckpts = list_checkpoints(run)
    assert ckpts[-1].name in res.stderr  # the error names the newest checkpoint, which is intact
    for ckpt in ckpts:  # every checkpoint on disk holds finite weights only
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values()), ckpt

    kept = tmp_path / "kept"
    res = moelab("train", *TINY, "--steps", "8", "--save-every", "2", "--keep-checkpoints", "3", "--out", kept)
    assert res.returncode == 0, res.stderr
    assert [p.name for p in list_checkpoints(kept)] == ["step_00000004", "step_00000006", "step_00000008"]


def test_generate_on_non_finite_weights_is_a_named_error(run):
    ckpt = list_checkpoints(run)[-1]
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["norm.weight"] = torch.full_like(weights["norm.weight"], float("nan"))
    save_file(weights, str(ckpt / "model.safetensors"))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / "model.safetensors").read_bytes()
    manifest["model.safetensors"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(moelab("generate", run, "--prompt", "x"), "non-finite logits")


# 3. settings that may not change on resume are refused, naming the field; nothing changes on disk
def test_resume_refuses_fixed_settings(run):
    before = snapshot(run)
    one_line_error(moelab("train", "--out", run, "--resume", "--batch-size", "8", "--seq-len", "16"),
                   "batch_size: 4 -> 8", "seq_len: 32 -> 16", "on resume")
    one_line_error(moelab("train", "--out", run, "--resume", "--steps", "3"), "steps=3", "step 4")
    one_line_error(moelab("train", "--out", run, "--resume", "--moe-top-k", "1"), "moe.top_k: 2 -> 1")
    assert snapshot(run) == before


# 4. --resume with nothing to resume is an error, and creates nothing
def test_resume_with_nothing_to_resume(tmp_path):
    one_line_error(moelab("train", *TINY, "--out", tmp_path / "typo", "--resume"), "does not exist",
                   "nothing to resume")
    assert not (tmp_path / "typo").exists()
    half = tmp_path / "half"
    half.mkdir()
    (half / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    one_line_error(moelab("train", *TINY, "--out", half, "--resume"), "never reached its first checkpoint")
    one_line_error(moelab("train", *TINY, "--out", half), "already holds a run", "--resume")


# 5. one writer per run: a second one is refused at once, naming the holder; a dead holder's lock is stale
def test_run_lock(run):
    first = moelab("train", "--out", run, "--resume", "--steps", "100000", "--save-every", "0", "--quiet", wait=False)
    try:
        deadline = time.time() + 120
        while not ((run / "run.lock").exists() and (run / "run.lock").read_text().strip()):
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "timeout"
            time.sleep(0.05)
        holder = json.loads((run / "run.lock").read_text())
        assert holder["pid"] == first.pid and {"host", "started", "command"} <= set(holder)
        started = time.time()
        one_line_error(moelab("train", "--out", run, "--resume", "--steps", "100000"),
                       "in use by another training", f"pid {first.pid}")
        assert time.time() - started < 60  # refused at once, not after waiting
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run / "run.lock").exists()  # left behind by the killed process
    res = moelab("train", "--out", run, "--resume", "--steps", "6", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "stale lock" in res.stderr and str(first.pid) in res.stderr
    assert not (run / "run.lock").exists()  # released on exit


# 6. converters refuse a non-empty output unless --overwrite, and keep files that are not theirs
def test_convert_refuses_to_overwrite(run, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "config.json").write_text("{}")
    before = snapshot(out)
    one_line_error(moelab("convert", "--to-hf", run, out), "not empty", "--overwrite")
    assert snapshot(out) == before
    res = moelab("convert", "--to-hf", run, out, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert (out / "README.md").read_text() == "my notes" and json.loads((out / "config.json").read_text())
    one_line_error(moelab("convert", "--from-hf", out, run), "not empty", "--overwrite")
    res = moelab("convert", "--from-hf", out, run, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert [p.name for p in list_checkpoints(run)] == ["step_00000000"]  # the old run's checkpoints are gone
    assert not (run / "metrics.jsonl").exists()


# 7. generate's bounds and arguments; a directory that is not a run
def test_generate_bounds_and_errors(run, tmp_path):
    res = moelab("generate", run, "--prompt", "def f", "--max-new-tokens", "5", "--temperature", "0")
    assert res.returncode == 0 and res.stdout.startswith("def f"), res.stderr
    one_line_error(moelab("generate", run, "--prompt", "x " * 200), "max_seq_len=64", "shorter prompt")
    one_line_error(moelab("generate", run, "--max-new-tokens", "100000"), "max_new_tokens=100000", "max_seq_len=64")
    one_line_error(moelab("generate", run, "--max-new-tokens", "-1"), "max_new_tokens=-1")
    one_line_error(moelab("generate", run, "--temperature", "nan"), "temperature=nan")
    one_line_error(moelab("generate", tmp_path), "not a moelab run")
    (tmp_path / "config.json").write_text('{"model_type": "mixtral"}')  # read as a Hugging Face directory
    one_line_error(moelab("generate", tmp_path), "config.json", "hidden_size", "missing")


# 8. operating-system errors and a closed pipe are one line (or silence), never a traceback
def test_os_errors_and_a_closed_pipe(tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(moelab("train", *TINY, "--out", tmp_path / "file" / "run"), "file")
    proc = subprocess.Popen([sys.executable, "-m", "moelab", "card", "mixtral-8x7b", "deepseek-v3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before the card is printed, as `moelab card ... | head -1` can
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


# 9. text that is not UTF-8 is refused, naming the file, unless --data-errors replace
def test_invalid_utf8_data(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("def f(x):\n    return x + 1\n" * 400)
    (corpus / "latin1.txt").write_bytes("caf\xe9 na\xefve\n".encode("latin-1") * 200)
    one_line_error(moelab("train", *TINY, "--data", corpus, "--out", tmp_path / "a"), "latin1.txt", "UTF-8",
                   "--data-errors replace")
    res = moelab("train", *TINY, "--steps", "2", "--data", corpus, "--data-errors", "replace", "--out", tmp_path / "b")
    assert res.returncode == 0, res.stderr


# 10. every flag documented (help, default, allowed values); --version; bad values named
def test_help_version_and_bad_flag_values():
    from moelab.cli.main import build_parser

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    for action in train_parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings
            if action.dest.startswith("cfg:"):
                assert "default with --preset tiny:" in action.help, action.option_strings
            if action.choices:
                assert all(c in action.help or c in str(action.choices) for c in action.choices)
    helped = moelab("train", "--help").stdout
    assert "--moe-router {topk_softmax,switch,sigmoid,expert_choice,noisy_topk}" in helped
    assert "--moe-load-loss-coef FLOAT" in helped and "--keep-checkpoints" in helped
    from moelab import __version__

    assert moelab("--version").stdout.strip() == f"moelab {__version__}"
    one_line_error(moelab("train", "--out", "x", "--d-model", "abc"), "--d-model", "'abc' is not an integer")
    one_line_error(moelab("train", "--out", "x", "--moe-router", "hash"), "invalid choice: 'hash'")
    one_line_error(moelab("train", "--out", "x", "--moe-load-loss-coef", "0.1"), "load_loss_coef=0.1 is invalid",
                   "unless router is 'noisy_topk'")
    one_line_error(moelab("train", "--out", "x", "--preset", "mixtral-8x7b"), "not a training preset",
                   "moelab card mixtral-8x7b")
    res = moelab("train", "--out", "x", "--rope-scaling", '{"factor": 2, "original_max_seq_len": 128}', "--steps",
                 "0")
    one_line_error(res, "steps=0")  # the JSON flag parsed; the run is refused on steps, before writing anything
    assert not Path("x").exists()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # commands given a relative --out write here
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# -- New-user paths (issue 29) ------------------------------------------------------------------------------

# 11. the README's first command typed twice in the same directory: the second demo writes to runs/demo-2
def test_demo_twice_in_the_same_directory(tmp_path):
    import argparse

    text = Path(argparse.__file__).read_text()[:40000]  # a small corpus: the demo's cost is its tokenizer
    Path("small.txt").write_text(text)
    first = moelab("demo", "--steps", "1", "--data", "small.txt", "--quiet")
    assert first.returncode == 0, first.stderr
    assert "writing to runs/demo " in first.stdout
    before = snapshot(tmp_path / "runs" / "demo")
    second = moelab("demo", "--steps", "1", "--data", "small.txt", "--quiet")
    assert second.returncode == 0, second.stderr
    assert "writing to runs/demo-2 " in second.stdout
    assert snapshot(tmp_path / "runs" / "demo") == before  # the first demo is untouched
    for name in ("moe", "dense"):
        assert list_checkpoints(tmp_path / "runs" / "demo-2" / name)
    assert json.loads((tmp_path / "runs" / "demo-2" / "summary.json").read_text())["steps"] == 1
    one_line_error(moelab("demo", "--steps", "1", "--data", "small.txt", "--out", "runs/demo", "--quiet"),
                   "runs/demo/moe already holds a run", "choose another --out")


# 12. options that did nothing or were clamped are refused, naming the allowed range
def test_ignored_or_clamped_options_are_refused(run, tmp_path):
    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    data = tmp_path / "a.txt"
    one_line_error(moelab("eval", run, "--data", data, "--seq-len", "0"), "--seq-len 0", "allowed 1..64")
    one_line_error(moelab("eval", run, "--data", data, "--seq-len", "65"), "--seq-len 65", "allowed 1..64")
    one_line_error(moelab("eval", run, "--data", data, "--batch-size", "0"), "--batch-size 0", "integer >= 1")
    one_line_error(moelab("eval", run, "--data", data, "--max-tokens", "1"), "--max-tokens 1", ">= 2")
    one_line_error(moelab("routing", run, "--data", data, "--out", "r", "--seq-len", "100000"), "--seq-len 100000",
                   "allowed 1..64")
    one_line_error(moelab("routing", run, "--data", data, "--out", "r", "--tokens", "0"), "--tokens 0", ">= 1")
    one_line_error(moelab("routing", run, "--data", data, "--out", "r", "--tokens", "32"), "--tokens 32",
                   ">= 64 (--seq-len 64")  # the default --seq-len is min(256, max_seq_len)
    for extra in ([], ["--quant", "int8"]):
        one_line_error(moelab("generate", run, "--group-size", "7", *extra), "--group-size 7 applies with --quant int4")
    one_line_error(moelab("convert", "--to-hf", run, "x", "--group-size", "64"), "--group-size apply to --from-hf")
    one_line_error(moelab("generate", run, "--max-memory-gb", "1e9"), "--max-memory-gb 1e+09 is more than this "
                   "machine's memory", "at most")
    assert not Path("r").exists() and not Path("x").exists()
    res = moelab("routing", run, "--data", data, "--out", "r", "--tokens", "128")  # the default seq_len fits
    assert res.returncode == 0, res.stderr
    assert json.loads(Path("r/routing.json").read_text())["tokens"] == 128


# 13. --help says what --max-memory-gb applies to: a Hugging Face directory or a quantized run
def test_generate_help_on_the_memory_budget():
    helped = " ".join(moelab("generate", "--help").stdout.split())
    assert "Hugging Face directories only" not in helped
    assert "for a Hugging Face directory or a quantized run" in helped
    assert "with --quant int4: the int4 group size" in helped
