"""moelab.inference.engine: the whole decode step in one kernel call is planned once and rebuilt exactly when the
model changes in a way its pointers would not see — a weight replaced, a tensor moved by `Module.to`, a router
updated in place — and then still computes what the modules compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moelab import ModelConfig, MoEConfig
from moelab.inference import engine as plan_module
from moelab.inference import native
from moelab.inference.prepare import prepare_inference
from moelab.model.cache import KVCache
from moelab.model.transformer import MoETransformer

pytestmark = pytest.mark.skipif(not native.available(), reason=f"moelab's CPU kernels: {native.why_unavailable()}")


def small_model(quant: str | None = "int8") -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, max_seq_len=64,
                      moe=MoEConfig(d_model=128, d_expert=64, n_experts=8, top_k=2))
    return prepare_inference(MoETransformer(cfg).to(torch.bfloat16), quant)


def decode(model: MoETransformer, steps: int = 6) -> torch.Tensor:
    ids = torch.arange(4)[None] * 5
    cache, out = KVCache(), []
    with torch.no_grad():
        logits = model(ids, cache=cache).logits
        for _ in range(steps):
            logits = model(logits[:, -1:].argmax(-1), cache=cache).logits
            out.append(logits)
    return torch.cat(out, 1)


def by_modules(model: MoETransformer, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(MoETransformer, "_native_layers", lambda *a: None)
        return decode(model)


@pytest.fixture
def builds(monkeypatch) -> list:
    """The plans built (each DecodePlan constructed)."""
    built, init = [], plan_module.DecodePlan.__init__

    def counted(self, *a):
        init(self, *a)
        built.append(self)
    monkeypatch.setattr(plan_module.DecodePlan, "__init__", counted)
    return built


def test_one_plan_serves_every_step(builds):
    model = small_model()
    decode(model, steps=10)
    decode(model, steps=10)
    assert len(builds) == 1 and builds[0].table is not None and builds[0].table.n == 2


@pytest.mark.parametrize("change", ["replace_norm", "data_swap", "router_in_place", "to_float32", "reconvert"])
def test_a_changed_model_is_replanned_and_computes_what_its_modules_do(change, builds, monkeypatch):
    model = small_model()
    before = decode(model)
    with torch.no_grad():
        if change == "replace_norm":
            norm = model.blocks[1].ffn_norm
            norm.weight = nn.Parameter(norm.weight.detach() * 1.5)
        elif change == "data_swap":  # new storage under the same Parameter, as Module.to gives
            norm = model.blocks[0].attn_norm
            norm.weight.data = norm.weight.data * 1.5
        elif change == "router_in_place":
            model.blocks[0].ffn.router.weight.mul_(-1.0)
        elif change == "to_float32":
            model.to(torch.float32)
        else:
            prepare_inference(model, "int4")  # converted weights are kept: a no-op here
            model.blocks[0].attn_norm.weight.mul_(2.0)  # in place: the plan's pointers see it
    after = decode(model)
    assert torch.equal(after, by_modules(model, monkeypatch))
    assert not torch.equal(after.float(), before.float())
    assert len(builds) == (1 if change == "reconvert" else 2)
    assert builds[-1].table is not None


def test_a_plan_does_not_apply_where_a_block_cannot_take_one_call(builds, monkeypatch):
    model = small_model()
    model.blocks[1].residual_scale = 0.5  # e.g. Granite's residual multiplier
    assert torch.equal(decode(model), by_modules(model, monkeypatch))
    assert len(builds) == 1 and builds[0].table is None  # built once, not applied, not rebuilt every step


@torch.no_grad()
def test_the_kernel_call_refuses_what_would_write_outside_the_cache():
    model = small_model()
    table = plan_module.decode_plan(model, torch.bfloat16).table
    buf = torch.zeros(1, 2, 8, 32, dtype=torch.bfloat16)
    for i in range(table.n):
        table.set_cache(i, buf.clone(), buf.clone())
    x, cos, sin = torch.zeros(1, 1, 128, dtype=torch.bfloat16), model.rope_cos[:1], model.rope_sin[:1]
    with pytest.raises(ValueError, match="position 8 is outside the cache buffers"):
        native.decode_layers(table, x, cos, sin, 8)
    with pytest.raises(ValueError, match="one contiguous token of torch.bfloat16"):
        native.decode_layers(table, x.float(), cos, sin, 0)
    with pytest.raises(ValueError, match=r"cache buffers must be \[1, 2, capacity"):
        wrong = torch.zeros(1, 3, 8, 32, dtype=torch.bfloat16)
        table.set_cache(0, wrong, wrong.clone())
    assert native.decode_layers(table, x, cos, sin, 7).shape == x.shape
