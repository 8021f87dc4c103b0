"""`moelab routing`: models with planted routers report what was planted; the report is self-contained."""

from __future__ import annotations

import base64
import json
import math
import random
import re
import shutil
import subprocess

import pytest
import torch

from conftest import moelab
from moelab import ModelConfig, MoEConfig
from moelab.analysis.routing_report import collect_routing, routing_report, write_report
from moelab.data.tokenizer import train_tokenizer
from moelab.model.transformer import MoETransformer

_rng = random.Random(0)
A_TEXT = ["".join(_rng.choice("acegik") for _ in range(3000))]  # two labels with disjoint letters, so their
B_TEXT = ["".join(_rng.choice("bdfhjl") for _ in range(3000))]  # tokens (bytes and merges) are disjoint too


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(A_TEXT + B_TEXT, 300)


def planted_model(router: str = "topk_softmax", expert_bias: bool = False) -> MoETransformer:
    cfg = ModelConfig(vocab_size=300, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=64,
                      moe=MoEConfig(d_model=16, d_expert=8, n_experts=8, top_k=2, router=router,
                                    expert_bias=expert_bias))
    torch.manual_seed(0)
    return MoETransformer(cfg).eval()


def test_a_router_that_always_picks_the_same_k_experts(tok):
    """Selection bias +100 on experts 3 and 5 in layer 0: E - k dead experts there, entropy ln k / ln E."""
    model = planted_model(expert_bias=True)
    with torch.no_grad():
        model.moe_layers()[0].router.bias[[3, 5]] = 100.0
    rec = collect_routing(model, tok, [("a", A_TEXT), ("b", B_TEXT)], separator=None, tokens=256, seq_len=32)
    report = routing_report(rec)
    first, second = report["layers"]
    assert first["dead_experts"] == 8 - 2 and first["load"][3] == first["load"][5] == report["tokens"]
    assert first["entropy"] == pytest.approx(math.log(2) / math.log(8))
    assert second["dead_experts"] < 6  # the other layer routes as it likes
    for layer in report["layers"]:
        points = layer["batch_economics"]
        assert points[0]["batch"] == 1 and points[0]["experts_touched"] == 2  # B = 1 touches exactly k
        assert all(p["experts_touched"] <= 8 for p in points)
    assert [p["experts_touched"] for p in first["batch_economics"]] == [2] * len(first["batch_economics"])


def test_a_router_that_sends_each_label_to_its_own_experts(tok):
    """Attention silenced, every 'a' token embedded on axis 0 and every 'b' token on axis 1; the first
    router favours experts 0, 1 along axis 0 and 6, 7 along axis 1: full specialisation, NMI = 1."""
    model = planted_model()
    a_ids = set(tok.encode(A_TEXT[0]).ids)
    b_ids = set(tok.encode(B_TEXT[0]).ids)
    assert a_ids and b_ids and not a_ids & b_ids
    with torch.no_grad():
        model.blocks[0].attn.wo.weight.zero_()
        model.embed.weight.zero_()
        model.embed.weight[sorted(a_ids), 0] = 1.0
        model.embed.weight[sorted(b_ids), 1] = 1.0
        router = model.moe_layers()[0].router.weight
        router.zero_()
        router[[0, 1], 0] = 10.0
        router[[6, 7], 1] = 10.0
    rec = collect_routing(model, tok, [("a", A_TEXT), ("b", B_TEXT)], separator=None, tokens=256, seq_len=32)
    report = routing_report(rec, decode=tok.id_to_token)
    spec = report["layers"][0]["specialisation"]
    assert spec["normalised_mutual_information"] == pytest.approx(1.0)
    assert [spec["share_by_label"][e] for e in (0, 1, 6, 7)] == [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    tops = report["layers"][0]["top_tokens"]
    assert {t["id"] for t in tops[0]} <= a_ids and {t["id"] for t in tops[6]} <= b_ids
    assert report["layers"][0]["dead_experts"] == 4


def test_report_files_and_schema(tok, tmp_path):
    model = planted_model()
    rec = collect_routing(model, tok, [("a", A_TEXT), ("b", B_TEXT)], separator=0, tokens=128, seq_len=16)
    page = write_report(routing_report(rec, decode=tok.id_to_token), tmp_path)
    data = json.loads((tmp_path / "routing.json").read_text())
    assert data["labels"] == ["a", "b"] and data["n_experts"] == 8 and data["top_k"] == 2
    for layer in data["layers"]:
        assert {"load", "entropy", "router_entropy", "dead_experts", "max_violation", "batch_economics"} <= set(layer)
        assert len(layer["load"]) == 8 and sum(layer["load"]) == data["tokens"] * 2
        assert {"batch", "experts_touched", "experts_touched_uniform"} <= set(layer["batch_economics"][0])
    html = page.read_text()
    assert "src=\"http" not in html and "<script" not in html  # self-contained: opens offline
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == len(list(tmp_path.glob("*.png"))) >= 5
    for b64 in images:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_renders_in_headless_chromium(tok, tmp_path):
    """Every figure of report.html loads in a real browser (skipped where Chromium is not installed)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed")
    model = planted_model()
    rec = collect_routing(model, tok, [("a", A_TEXT)], separator=None, tokens=64, seq_len=16)
    page = write_report(routing_report(rec), tmp_path)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace(  # decode() rejects an image the browser cannot fully decode
        "</body>", "<script>window.onload=()=>{const im=[...document.images];"
        "document.title=im.length+':'+im.filter(i=>i.complete&&i.naturalWidth>0).length;"  # loaded, at once
        "Promise.all(im.map(i=>i.decode().then(()=>1,()=>0)))"  # and fully decoded, when the browser gets to it
        ".then(r=>{document.title+=':'+r.reduce((a,b)=>a+b,0);});};</script></body>"))
    for _ in range(3):  # a busy machine may dump the page before its load event (no title): try again
        out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                              "--disable-background-networking", "--disable-component-update", "--no-first-run",
                              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                              probe.as_uri()], capture_output=True, text=True, timeout=120)
        title = re.search(r"<title>(\d+):(\d+)(?::(\d+))?</title>", out.stdout)
        if title:
            break
    assert title and int(title.group(1)) >= 5 and title.group(1) == title.group(2), out.stdout[-500:]
    assert title.group(3) in (None, title.group(1)), title.group(0)  # decoded, where the dump came after it


def test_cli_on_a_run(tiny_run, tmp_path):
    run = tiny_run
    (tmp_path / "x.txt").write_text("for i in range(10):\n    print(i)\n" * 40)
    res = moelab("routing", run, "--data", f"{tmp_path / 'x.txt'}=loops", "--tokens", "256", "--seq-len", "32",
                 "--out", tmp_path / "rep", "--quiet")
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "rep" / "routing.json").read_text())
    assert data["labels"] == ["loops"] and len(data["layers"]) == 2 and (tmp_path / "rep" / "report.html").exists()


def test_router_entropy_and_dropped_fraction_by_hand(tok):
    """Layer 0 planted: attention silenced and every token embedded as (10, 0, …, 0), so the router sees
    RMSNorm(x) = (√16, 0, …) and its logits are 4·W[:, 0] = l, whatever the token: the mean per-token entropy
    is that of softmax(l), computed here by hand. A selection bias of +100 sends every token to experts 3 and 5,
    each capped at C = ceil(1.25 · T · 2 / 8) = 80 of the T = 8 · 32 = 256 tokens of a batch: dropped 1 − 80/256."""
    cfg = planted_model().cfg
    cfg = cfg.replace(moe=cfg.moe.replace(expert_bias=True, capacity_factor=1.25))
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    logits = [2.0, 1.0, 0.5, 0.0, 0.0, -1.0, -1.5, 3.0]
    with torch.no_grad():
        model.blocks[0].attn.wo.weight.zero_()
        model.embed.weight.zero_()
        model.embed.weight[:, 0] = 10.0
        moe = model.moe_layers()[0]
        moe.router.weight.zero_()
        moe.router.weight[:, 0] = torch.tensor(logits) / 4
        moe.router.bias[[3, 5]] = 100.0
    rec = collect_routing(model, tok, [("a", A_TEXT), ("b", B_TEXT)], separator=None, tokens=256, seq_len=32,
                          batch_size=8)
    report = routing_report(rec)
    z = sum(math.exp(v) for v in logits)
    entropy = -sum(math.exp(v) / z * (v - math.log(z)) for v in logits)
    first = report["layers"][0]
    assert report["tokens"] == 512 and first["load"][3] == first["load"][5] == 512
    assert first["router_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert first["router_entropy_normalised"] == pytest.approx(entropy / math.log(8), rel=1e-5)
    assert first["dropped_frac"] == pytest.approx(1 - 80 / 256, rel=1e-6)
