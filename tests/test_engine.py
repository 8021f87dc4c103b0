"""moelab.inference.engine: the one object that owns the kernels' calls for a prepared model. Its decode step against
the model's own torch code (an independent implementation: model/ and layer/ hold no kernel), what it takes and
what it leaves to torch, when it rebuilds, and the cases a user meets: deepcopy, state_dict, inference_mode,
forward hooks."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from moelab import ModelConfig, MoEConfig
from moelab.inference import engine as engine_module
from moelab.inference import native
from moelab.inference.engine import InferenceEngine
from moelab.inference.prepare import prepare_inference
from moelab.model.cache import KVCache
from moelab.model.transformer import MoETransformer

needs_kernels = pytest.mark.skipif(not native.available(), reason=f"moelab's CPU kernels: {native.why_unavailable()}")


def small_model(quant: str | None = "int8", seed: int = 0, dtype=torch.bfloat16, **model) -> MoETransformer:
    torch.manual_seed(seed)
    moe = {k: model.pop(k) for k in ("norm_topk_prob", "route_scale", "n_shared") if k in model}
    cfg = ModelConfig(vocab_size=64, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, max_seq_len=96,
                      moe=MoEConfig(d_model=128, d_expert=64, n_experts=8, top_k=2, **moe), **model)
    m = MoETransformer(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:  # not the zeros and ones they start as
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.3)
    return prepare_inference(m.to(dtype), quant)


def decode(model: MoETransformer, steps: int = 70, prompt: int = 4) -> tuple[torch.Tensor, KVCache]:
    """Logits of `steps` greedy decode steps after a prompt (past the cache's first 64 positions), and the cache."""
    ids = (torch.arange(prompt)[None] * 5) % 64
    cache, out = KVCache(), []
    with torch.no_grad():
        logits = model(ids, cache=cache).logits
        for _ in range(steps):
            logits = model(logits[:, -1:].argmax(-1), cache=cache).logits
            out.append(logits)
    return torch.cat(out, 1), cache


def by_torch(model: MoETransformer, steps: int = 70) -> tuple[torch.Tensor, KVCache]:
    """The same steps with the engine removed: the model's torch code alone."""
    engine, model.decoder = model.decoder, None
    try:
        return decode(model, steps)
    finally:
        model.decoder = engine


def teacher_forced(model: MoETransformer, ids: torch.Tensor) -> torch.Tensor:
    """Decode-step logits when every step is fed the given next id (so the two paths see the same tokens)."""
    cache, out = KVCache(), []
    with torch.no_grad():
        model(ids[:, :4], cache=cache)
        for t in range(4, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], cache=cache).logits)
    return torch.cat(out, 1).float()


@pytest.fixture
def steps(monkeypatch) -> dict:
    """Counts of what ran each decode step: whole-step calls, per-block kernel calls, rebuilds."""
    calls = {"layers": 0, "attention": 0, "moe": 0, "refresh": 0}
    for name, attr in (("layers", "decode_layers"), ("attention", "attention_block"), ("moe", "moe_block")):
        real = getattr(native, attr)
        monkeypatch.setattr(native, attr, lambda *a, real=real, name=name: calls.__setitem__(name, calls[name] + 1)
                            or real(*a))
    refresh = InferenceEngine.refresh
    monkeypatch.setattr(InferenceEngine, "refresh",
                        lambda self: calls.__setitem__("refresh", calls["refresh"] + 1) or refresh(self))
    return calls


@needs_kernels
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
@pytest.mark.parametrize("variant", [dict(qk_norm="head"), dict(qk_norm="full", norm_topk_prob=False, route_scale=2.0),
                                     dict(qkv_bias=True, o_bias=True, rotary_dim=16)])
def test_the_engine_decodes_what_the_torch_code_computes(quant, variant, steps):
    """Every decode step is one kernel call for all layers, and its logits are the torch code's on the same weights
    to bfloat16 rounding (the kernels sum in float32 in another order), teacher-forced so both see the same tokens;
    the caches hold the same keys to bfloat16 rounding."""
    model = small_model(quant, **variant)
    assert model.decoder.describe() == [("kernel", "kernel")] * 2
    ids = torch.randint(0, 64, (1, 74), generator=torch.Generator().manual_seed(1))
    fast = teacher_forced(model, ids)
    assert steps["layers"] == 70 and steps["attention"] == steps["moe"] == 0 and steps["refresh"] == 1
    engine, model.decoder = model.decoder, None
    slow = teacher_forced(model, ids)
    model.decoder = engine
    scale = slow.abs().max()
    assert (fast - slow).abs().max() <= 0.03 * scale
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() >= 0.95  # near-ties may flip; most steps agree
    _, cache_fast = decode(model, 8)
    _, cache_slow = by_torch(model, 8)
    torch.testing.assert_close(cache_fast.k[1][:, :, :12].float(), cache_slow.k[1][:, :, :12].float(), atol=0.05,
                               rtol=0.02)


@needs_kernels
def test_blocks_the_kernels_cannot_take_run_their_torch_code_in_the_same_step(steps):
    """Shared experts keep the FFN half in torch (its attention half still on the kernel); a residual scale keeps both
    halves in torch; the step's logits are the torch code's."""
    model = small_model("int8", n_shared=1)
    assert model.decoder.describe() == [("kernel", "torch")] * 2
    fast, _ = decode(model, 6)
    assert steps["layers"] == 0 and steps["attention"] == 2 * 6 and steps["moe"] == 0
    slow, _ = by_torch(model, 6)
    assert (fast.float() - slow.float()).abs().max() <= 0.03 * slow.float().abs().max()
    scaled = small_model("int8", residual_scale=0.5)
    assert scaled.decoder.describe() == [("torch", "torch")] * 2
    fp32 = small_model(None, dtype=torch.float32)  # float32 weights stay on torch's kernels
    assert fp32.decoder.describe() == [("torch", "torch")] * 2


@needs_kernels
def test_what_the_engine_leaves_to_torch(steps):
    """Statistics asked for, autograd, a batch of two rows, or training mode: the torch code runs the step."""
    model = small_model()
    ids = torch.tensor([[1, 2, 3]])
    cache = KVCache()
    with torch.no_grad():
        model(ids, cache=cache)
        model(ids[:, :1], cache=cache, stats=True)
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=KVCache())
    model(ids[:, :1], cache=cache)  # grad enabled
    assert steps["layers"] == 0
    with torch.no_grad():
        model(ids[:, :1], cache=cache)
    assert steps["layers"] == 1


@needs_kernels
@pytest.mark.parametrize("change", ["replace a norm", "move with .to", "router in place", "replace the experts"])
def test_a_changed_model_is_rebuilt_and_still_computes_what_its_torch_code_does(change, steps):
    """One build serves every step; each change the engine cannot read in place makes it rebuild (identity of the
    objects it was built from, the model's `_apply`, a router's version) and the result still equals torch."""
    model = small_model()
    decode(model, 4)
    decode(model, 4)
    assert steps["refresh"] == 1
    block = model.blocks[1]
    with torch.no_grad():
        if change == "replace a norm":
            block.attn_norm = copy.deepcopy(block.attn_norm)
            block.attn_norm.weight.mul_(1.5)
        elif change == "move with .to":
            model.to(torch.float32).to(torch.bfloat16)
        elif change == "router in place":
            block.ffn.router.weight.mul_(-1)
        else:
            block.ffn.experts = copy.deepcopy(block.ffn.experts)
    fast, _ = decode(model, 6)
    assert steps["refresh"] == 2
    slow, _ = by_torch(model, 6)
    assert (fast.float() - slow.float()).abs().max() <= 0.03 * slow.float().abs().max()


@needs_kernels
def test_a_forward_hook_still_fires():
    """A hook on a module the kernels stand in for: the step runs the torch code, so the hook sees every step."""
    model = small_model()
    seen = []
    handle = model.blocks[0].ffn.router.register_forward_hook(lambda m, i, o: seen.append(1))
    decode(model, 5)
    assert len(seen) == 6  # the prompt and five steps
    handle.remove()
    seen.clear()
    decode(model, 5)
    assert seen == []


@needs_kernels
def test_deepcopy_state_dict_pickle_and_inference_mode():
    """A prepared model deep-copies (the copy gets its own engine and decodes the same tokens), its state_dict holds
    the portable tensors (what a quantized run stores), it round-trips through torch.save, and it decodes under
    torch.inference_mode as under no_grad."""
    model = small_model("int4")
    tokens, _ = decode(model, 10)
    twin = copy.deepcopy(model)
    assert isinstance(twin.decoder, InferenceEngine) and twin.decoder.model is twin
    assert torch.equal(decode(twin, 10)[0], tokens)
    state = model.state_dict()
    assert {"blocks.0.attn.wq.qweight", "blocks.0.attn.wk.scale_zero", "blocks.0.ffn.experts.gate_up.qweight",
            "head.qweight", "embed.weight"} <= set(state)
    assert not any(".wqkv." in k for k in state)
    import io

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # our own object, in memory: the pickle is not untrusted
    assert torch.equal(decode(loaded, 10)[0], tokens)
    ids = torch.tensor([[3, 1, 4]])
    cache_a, cache_b = KVCache(), KVCache()
    with torch.inference_mode():
        a = [model(ids, cache=cache_a).logits] + [model(ids[:, :1], cache=cache_a).logits for _ in range(3)]
    with torch.no_grad():
        b = [model(ids, cache=cache_b).logits] + [model(ids[:, :1], cache=cache_b).logits for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@needs_kernels
def test_the_whole_step_refuses_what_would_write_outside_the_cache():
    model = small_model()
    decode(model, 2)
    table = model.decoder.table
    x = torch.zeros(1, 1, 128, dtype=torch.bfloat16)
    cos = sin = torch.zeros(1, 32)
    with pytest.raises(ValueError, match="outside the cache"):
        native.decode_layers(table, x, cos, sin, 10_000)
    with pytest.raises(ValueError, match="one contiguous token"):
        native.decode_layers(table, x.float(), cos, sin, 1)


def test_model_and_layer_hold_no_kernel():
    """The decode step is installed on the model from outside: a model built alone has none, runs torch code, and
    prepare_inference installs exactly one engine (idempotent)."""
    torch.manual_seed(0)
    m = MoETransformer(ModelConfig(vocab_size=32, d_model=64, n_layers=1, n_heads=2, n_kv_heads=2, max_seq_len=16,
                                   moe=MoEConfig(d_model=64, d_expert=32, n_experts=4, top_k=2)))
    assert m.decoder is None
    prepare_inference(m)
    engine = m.decoder
    prepare_inference(m)
    assert m.decoder is engine and isinstance(engine, engine_module.InferenceEngine)


def _joined(model: MoETransformer, prompts: list[list[int]]) -> tuple[KVCache, torch.Tensor]:
    """A continuous batch as `moelab serve` builds it: each prompt prefilled alone, its cache joined right-aligned
    (left padding); the rows' first greedy tokens [B, 1]."""
    from moelab.serve import batch_cache

    batch, first = None, []
    with torch.no_grad():
        for p in prompts:
            cache = KVCache()
            first.append(model(torch.tensor([p]), cache=cache).logits[:, -1].argmax(-1))
            batch = batch_cache.join(batch, cache)
    return batch, torch.stack(first)


def _alone(model: MoETransformer, prompt: list[int], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after the blocks [steps, D] and the logits [steps, V] of `steps` greedy decode steps of
    one prompt alone."""
    cache, out, hidden = KVCache(), [], []
    handle = model.norm.register_forward_pre_hook(lambda m, args: hidden.append(args[0][:, -1]))
    with torch.no_grad():
        token = model(torch.tensor([prompt]), cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            logits = model(token, cache=cache).logits[:, -1]
            out.append(logits[0])
            token = logits.argmax(-1, keepdim=True)
    handle.remove()
    return torch.cat(hidden[1:]), torch.stack(out)


PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13], [11], [4, 4, 4, 4, 60], [7, 30]]


@needs_kernels
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_a_batch_of_rows_is_one_call_and_each_row_gets_its_logits_alone_bit_for_bit(quant, steps, monkeypatch):
    """Five rows of different lengths (left-padded, as `moelab serve` joins them) decoded together: one
    `native.decode_rows` call per step for all layers and rows; each row's residual stream after the blocks equals,
    bit for bit, that of the same prompt decoded alone (the kernels compute each row as alone; the weights are read
    once for all of them), its logits and greedy tokens too (up to the head's torch product), and the torch code's
    batched step to bfloat16 rounding; each MoE layer reports every row's k experts."""
    calls = []
    real = native.decode_rows
    monkeypatch.setattr(native, "decode_rows", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    model = small_model(quant)
    assert model.decoder.takes_rows()
    batch, token = _joined(model, PROMPTS)
    assert batch.pad is not None and batch.pad.tolist() == [6, 0, 8, 4, 7]
    assert calls == [3, 9, 5, 2]  # each prompt's prefill: one call (the one-token prompt: a one-row step)
    calls.clear()
    rows, by_rows, hidden, single = [], [], [], steps["layers"]
    handle = model.norm.register_forward_pre_hook(lambda m, args: hidden.append(args[0][:, -1]))
    with torch.no_grad():
        for _ in range(8):
            out = model(token, cache=batch)
            rows.append(out.logits[:, -1])
            assert [a.topk_idx.shape for a in out.aux] == [(5, 2)] * 2
            by_rows.append([a.topk_idx for a in out.aux])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    handle.remove()
    assert calls == [5] * 8 and steps["layers"] == single
    rows, hidden = torch.stack(rows, 1), torch.stack(hidden, 1)  # [B, steps, V], [B, steps, D]
    for b, p in enumerate(PROMPTS):
        h, logits = _alone(model, p, 8)
        assert torch.equal(hidden[b], h)  # the blocks: bit for bit
        # the head is torch's product, whose sums may run in another order for 5 rows than for 1
        torch.testing.assert_close(rows[b].float(), logits.float(), atol=1e-2, rtol=0)
        assert torch.equal(rows[b].argmax(-1), logits.argmax(-1))
    engine, model.decoder = model.decoder, None
    try:
        batch, token = _joined(model, PROMPTS)
        with torch.no_grad():
            slow = model(token, cache=batch, stats=True)
    finally:
        model.decoder = engine
    assert (rows[:, 0].float() - slow.logits[:, -1].float()).abs().max() <= 0.03 * slow.logits.float().abs().max()
    for a, b in zip(by_rows[0], slow.aux):  # the same experts, up to near-ties of the router's rounding
        assert (a.sort(-1).values == b.topk_idx.sort(-1).values).float().mean() >= 0.9


@needs_kernels
@pytest.mark.parametrize("quant", [None, "int4"])
def test_a_one_token_step_is_the_one_row_decode_with_its_experts(quant):
    """`step_tokens` with one token (a server's step with one request) equals the one-row decode of the same token
    (`decode_layers`): the residual stream bit for bit, and each MoE layer's k experts."""
    model = small_model(quant)
    with torch.no_grad():
        alone, stepped = KVCache(), KVCache()
        for c in (alone, stepped):
            model(torch.tensor([PROMPTS[1]]), cache=c)
        hidden = []
        handle = model.norm.register_forward_pre_hook(lambda m, args: hidden.append(args[0][:, -1]))
        out = model(torch.tensor([[5]]), cache=alone)
        handle.remove()
        L = stepped.length
        h, aux = model.decoder.step_tokens(torch.tensor([5]), torch.tensor([0]), torch.tensor([L]),
                                           torch.tensor([0]), stepped)
    assert torch.equal(h, hidden[0])
    assert [a.topk_idx.tolist() for a in aux] == [a.topk_idx.tolist() for a in out.aux]
    assert all(a.topk_idx.shape == (1, 2) for a in aux)


@needs_kernels
def test_rows_the_kernels_cannot_take_as_one_batch_run_the_torch_code(monkeypatch):
    """A capacity factor (a batch's tokens compete for an expert's slots: the torch code drops, the kernels would not)
    or a block off the kernels: the batch runs the torch code, whose logits it returns."""
    monkeypatch.setattr(native, "decode_rows", lambda *a: pytest.fail("decode_rows ran"))
    for model in (small_model("int8", n_shared=1), small_model("int8")):
        if not model.decoder.takes_rows():
            assert model.decoder.describe() == [("kernel", "torch")] * 2
            continue
        for block in model.blocks:  # frozen config: a capacity factor on a copy
            block.ffn.cfg = dataclasses.replace(block.ffn.cfg, capacity_factor=1.0)
        assert not model.decoder.takes_rows()
    batch, token = _joined(model, PROMPTS)
    with torch.no_grad():
        out = model(token, cache=batch)
    assert out.logits.shape == (5, 1, 64) and out.aux[0].topk_idx is None


@needs_kernels
def test_decode_rows_checks_its_arguments():
    """Each argument out of range is a ValueError naming it, before any C code runs."""
    model = small_model()
    batch, token = _joined(model, PROMPTS[:2])
    with torch.no_grad():
        model(token, cache=batch)
    table, x = model.decoder.table, torch.zeros(2, 1, 128, dtype=torch.bfloat16)
    cos = sin = torch.zeros(2, 32)
    at = torch.full((2,), batch.length)
    bad = [((x, cos, sin, at, torch.tensor([0, batch.length + 1])), "start"),
           ((x, cos, sin, at, torch.tensor([0.0, 1.0])), "start"),
           ((x, cos, sin, at, None, torch.tensor([0, 2])), "rows"),
           ((x, cos, sin, torch.tensor([0, 10_000])), "positions"),
           ((x, cos, sin, batch.length), "positions"),
           ((x, cos[:1], sin[:1], at), "cos, sin"),
           ((x.float(), cos, sin, at), "x must be"),
           ((x[:, 0], cos, sin, at), "x must be")]
    for args, name in bad:
        with pytest.raises(ValueError, match=name):
            native.decode_rows(table, *args)


@needs_kernels
@pytest.mark.parametrize("quant", [None, "int4"])
def test_a_prompt_is_one_call_whose_tokens_are_those_of_decoding_it_token_by_token(quant, monkeypatch):
    """A prompt of 70 tokens (split into calls of ROWS_PER_CALL = 32 here: the second call reads the keys the first
    wrote) and a left-padded batch of prompts (generate_batch's prefill): the residual stream after the blocks equals,
    bit for bit, feeding the same tokens one decode step at a time; the logits are the torch code's to bfloat16
    rounding; every layer reports each token's experts."""
    monkeypatch.setattr(engine_module, "ROWS_PER_CALL", 32)
    model = small_model(quant)
    ids = torch.randint(0, 64, (1, 70), generator=torch.Generator().manual_seed(3))
    hidden = []
    handle = model.norm.register_forward_pre_hook(lambda m, args: hidden.append(args[0]))
    with torch.no_grad():
        out = model(ids, cache=KVCache())
        cache = KVCache()
        for t in range(70):
            model(ids[:, t:t + 1], cache=cache)
    handle.remove()
    assert torch.equal(hidden[0], torch.cat(hidden[1:], 1))
    assert [a.topk_idx.shape for a in out.aux] == [(70, 2)] * 2
    engine, model.decoder = model.decoder, None
    with torch.no_grad():
        slow = model(ids, cache=KVCache()).logits.float()
    model.decoder = engine
    assert (out.logits.float() - slow).abs().max() <= 0.03 * slow.abs().max()
    prompts = [p for p in PROMPTS]
    longest = max(map(len, prompts))
    padded = torch.tensor([[p[0]] * (longest - len(p)) + p for p in prompts])
    with torch.no_grad():
        batch = KVCache(pad=torch.tensor([longest - len(p) for p in prompts]))
        last = model(padded, cache=batch).logits[:, -1]
        for b, p in enumerate(prompts):
            alone = model(torch.tensor([p]), cache=KVCache()).logits[0, -1]
            torch.testing.assert_close(last[b].float(), alone.float(), atol=1e-2, rtol=0)
