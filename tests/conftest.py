"""Shared test helpers and fixtures: tiny Hugging Face models (built by transformers, no download), random
moelab models, word-level tokenizers, a tiny trained run, and peak-RSS measurement in a fresh process.

Test files import the helpers (`from conftest import random_moelab, ...`); pytest puts this directory on
sys.path (rootdir-relative "prepend" import mode), and the module is the one pytest loaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moelab.config.model import ModelConfig
from moelab.model.transformer import MoETransformer

# -- tiny models --------------------------------------------------------------------------------------------


def tiny_hf(config, seed: int = 0):
    """A transformers model built from `config` (no download), eval mode, with norms, biases, attention sinks and
    the selection bias moved off their initial values so that they matter in a comparison (norm weights
    U(0.5, 1.5), biases N(0, 0.05), sinks N(0, 0.5)); gpt-oss's gate/up weights ×15, pre-activations past its
    SwiGLU's clamps (±7)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gpt_oss = getattr(config, "model_type", "") == "gpt_oss"
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                t.data.uniform_(0.5, 1.5)
            elif name.endswith("e_score_correction_bias") or name.endswith("bias") or name.endswith("sinks"):
                t.data.normal_(0, 0.5 if name.endswith("sinks") else 0.05)
            elif name.endswith("experts.gate_up_proj") and gpt_oss:
                t.data.mul_(15.0)
    return model


def random_moelab(cfg: ModelConfig, seed: int = 0) -> MoETransformer:
    """A moelab model of `cfg` in eval mode, weights ×3 (logits and routing far from ties), norm weights
    U(0.5, 1.5), biases N(0, 0.05), sinks N(0, 0.5), the experts' input weights ×40 when they have biases
    (gpt-oss: past its clamps) and the selection bias N(0, 0.05)."""
    torch.manual_seed(seed)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("bias", "sinks", ".b_in", ".b_out")):
                p.normal_(0, 0.5 if name.endswith("sinks") else 0.05)
            else:
                p.mul_(40.0 if name.endswith("experts.w_in") and cfg.moe is not None and cfg.moe.biases else 3.0)
        for moe in model.moe_layers():
            if cfg.moe.expert_bias:
                moe.router.bias.normal_(0, 0.05)
    return model


def save_with(model, path: Path, **config) -> Path:
    """save_pretrained, then overwrite fields of config.json (None writes an explicit null, ... deletes one)."""
    model.save_pretrained(path)
    data = json.loads((path / "config.json").read_text())
    data.update(config)
    (path / "config.json").write_text(json.dumps({k: v for k, v in data.items() if v is not ...}))
    return path


def saved_checkpoints(names: list[str], build):
    """A module-scoped fixture, one parameter per name: (name, the transformers model `build(name)` gives,
    the directory it was saved to with save_pretrained)."""
    @pytest.fixture(scope="module", params=names)
    def saved(request, tmp_path_factory):
        model = build(request.param)
        path = tmp_path_factory.mktemp(request.param)
        model.save_pretrained(path)
        return request.param, model, path
    return saved


def word_tokenizer(path: Path, vocab_size: int) -> Path:
    """A word-level tokenizer.json at `path`: "t0" … f"t{vocab_size - 2}" are ids 0 …, "[UNK]" the last id."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size - 1)} | {"[UNK]": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return Path(path)


# -- a tiny trained run, through the `moelab` command as a user would make it ---------------------------------


def moelab(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m moelab ARGS` in a subprocess, output captured as text."""
    return subprocess.run([sys.executable, "-m", "moelab", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    """`moelab ARGS` in this process, output captured as text: `python -m moelab` is `raise SystemExit(main())`, so
    the exit status (argparse's SystemExit included) and the output are those of the command, without a fresh
    interpreter's start-up (seconds each on a busy machine). An exception main() lets through propagates (the
    test fails, as a traceback would). Help is wrapped at 80 columns, as in a pipe; torch runs one thread (as with
    OMP_NUM_THREADS=1: tiny models, a shared machine) unless `--threads` says otherwise, and its thread count is
    restored after. Use `moelab()` where the test is about the process (signals, a closed pipe)."""
    from moelab.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    threads, columns = torch.get_num_threads(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # what the interpreter does with it
                code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return subprocess.CompletedProcess(["moelab", *map(str, args)], code, out.getvalue(), err.getvalue())


def train_tiny_run(out: Path, n_layers: int = 2, steps: int = 3) -> Path:
    """`moelab train` of a d_model-32 MoE (4 experts of width 32, vocabulary 300) into `out`."""
    res = moelab("train", "--preset", "tiny", "--d-model", "32", "--n-heads", "2", "--n-kv-heads", "2",
                 "--n-layers", n_layers, "--d-ff", "64", "--moe-d-expert", "32", "--moe-n-experts", "4",
                 "--vocab-size", "300", "--batch-size", "4", "--seq-len", "32", "--max-corpus-bytes", "100000",
                 "--steps", steps, "--eval-batches", "1", "--threads", "1", "--quiet", "--out", out)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One 2-layer tiny run (3 steps) for the whole session; tests only read it."""
    return train_tiny_run(tmp_path_factory.mktemp("tiny") / "run")


# -- peak memory in a fresh process ----------------------------------------------------------------------------

# ru_maxrss survives execve (a child started from a big pytest process inherits its high-water mark), so the
# child resets its own peak (/proc/self/clear_refs "5") once torch's one-time machinery is up and reads VmHWM;
# where that is unavailable it falls back to ru_maxrss. The first use of the meta device loads ~75 MB of torch
# machinery (a fixed cost whatever the model's size): the prelude pays it before any measurement.
_PEAK_PRELUDE = textwrap.dedent("""
    import resource, sys, torch
    from moelab.config import ModelConfig
    from moelab.model.transformer import MoETransformer

    with torch.device("meta"):
        MoETransformer(ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, max_seq_len=8,
                                   d_ff=8, moe=None))

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    _RESET = [False]

    def reset_peak():
        '''Forget the peak so far; returns the baseline the rise is measured from.'''
        try:
            open("/proc/self/clear_refs", "w").write("5")
            _RESET[0] = True
            return status("VmRSS:")
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak():
        return status("VmHWM:") if _RESET[0] else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
""")


def peak_rss_child(body: str, *args: str | Path | float) -> list[str]:
    """Run `body` (after a prelude defining `reset_peak()`, `peak()` and `status(key)`, torch's meta device
    warmed up) in a fresh Python process with `args` as sys.argv[1:]; returns its stdout's words. Skips off
    Linux (/proc/self/status)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("peak RSS is read from /proc/self/status (Linux only)")
    out = subprocess.run([sys.executable, "-c", _PEAK_PRELUDE + textwrap.dedent(body), *map(str, args)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()
