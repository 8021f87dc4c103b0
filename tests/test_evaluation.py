"""Evaluation: the windowed loss against a per-token loop that feeds each token's context by hand; bits per
byte by hand; the CLI's JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import moelab
from moelab import ModelConfig, MoEConfig
from moelab.data.tokenizer import train_tokenizer
from moelab.model.transformer import MoETransformer
from moelab.training.evaluation import evaluate_text, evaluate_tokens, token_stream

CFG = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                  moe=MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2))
DOCS = ["def f(x):\n    return x + 1\n", "The router sends each token to two experts. ", "print('héllo wörld')\n"]


@pytest.fixture(scope="module")
def model_and_tok():
    torch.manual_seed(0)
    return MoETransformer(CFG).double().eval(), train_tokenizer(DOCS * 20, 300)


@pytest.mark.parametrize("seq_len,batch_size", [(5, 1), (5, 3), (16, 2), (7, 8)])
def test_windowed_loss_equals_a_per_token_loop(model_and_tok, seq_len, batch_size):
    model, tok = model_and_tok
    ids, _, _ = token_stream(tok, DOCS, separator=0)
    nats, n = evaluate_tokens(model, ids, seq_len, batch_size)
    expected = 0.0
    with torch.no_grad():
        for j in range(1, len(ids)):  # token j is predicted from its window's tokens before it
            start = (j - 1) // seq_len * seq_len
            logits = model(torch.tensor([ids[start:j]])).logits[0, -1]
            expected -= F.log_softmax(logits, dim=-1)[ids[j]].item()
    assert n == len(ids) - 1
    assert nats == pytest.approx(expected, rel=1e-9)


def test_perplexity_and_bits_per_byte_by_hand(model_and_tok):
    model, tok = model_and_tok
    r = evaluate_text(model, tok, DOCS, separator=0, seq_len=8)
    n_bytes = sum(len(d.encode()) for d in DOCS)
    assert r.bytes == n_bytes and r.documents == 3 and r.seq_len == 8
    assert r.perplexity == pytest.approx(math.exp(r.loss))
    assert r.bits_per_byte == pytest.approx(r.loss * r.tokens / math.log(2) / n_bytes)
    capped = evaluate_text(model, tok, DOCS, separator=0, max_tokens=5)
    assert capped.documents == 1 and capped.bytes == len(DOCS[0].encode())
    with pytest.raises(ValueError, match="seq_len=99"):
        evaluate_text(model, tok, DOCS, separator=0, seq_len=99)


def test_cli_on_a_trained_run(tiny_run, tmp_path):
    run = tiny_run
    text = tmp_path / "held_out.txt"
    text.write_text("import os\nprint(os.getcwd())\n" * 20)
    res = moelab("eval", run, "--data", text, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["tokens"] > 20 and out["bytes"] == len(text.read_bytes()) and 0 < out["loss"] < 10
    assert out["bits_per_byte"] == pytest.approx(out["loss"] * out["tokens"] / math.log(2) / out["bytes"])
