"""Experts streamed within a memory budget: the cache's eviction against a naive reference (LRU, LFU), its
bound and counters, prefetching; a budgeted model against the same checkpoint held in memory (logits and
generated tokens); peak RSS under the budget in a fresh process; and the named errors."""

from __future__ import annotations

import os
import random
import re
from collections import Counter

import pytest
import torch

from conftest import peak_rss_child
from moelab import hf
from moelab.config.model import ModelConfig, MoEConfig
from moelab.inference.generate import generate, generate_batch
from moelab.inference.offload import POLICIES, ExpertCache, OffloadedExperts, expert_cache, resident_bytes
from moelab.inference.prepare import prepare_inference
from moelab.model.transformer import MoETransformer

SIZE = 100  # bytes of one fake expert


def _fake_load(log=None):
    def load(key):
        if log is not None:
            log.append(key)
        return (lambda x, key=key: x + key[1]), SIZE, 3 * SIZE
    return load


def _reference(policy: str, slots: int, keys: list) -> tuple[list[bool], set]:
    """Hits of a cache of `slots` equal experts: evict the least recently used (lru), or the least used so far
    (lfu; uses counted over the whole sequence, ties to the least recently used)."""
    held, uses, hits = [], Counter(), []  # held: least recently used first
    for k in keys:
        uses[k] += 1
        if k in held:
            held.remove(k)
            held.append(k)
            hits.append(True)
            continue
        hits.append(False)
        if len(held) == slots:
            held.remove(held[0] if policy == "lru" else min(held, key=lambda h: uses[h]))
        held.append(k)
    return hits, set(held)


def _skewed_keys(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)  # a few popular experts and a long tail, over 3 layers
    return [(rng.randrange(3), min(int(rng.paretovariate(0.8)), 40)) for _ in range(n)]


@pytest.mark.parametrize("policy", POLICIES)
def test_eviction_matches_a_naive_reference(policy):
    keys, slots = _skewed_keys(600), 7
    cache = ExpertCache(slots * SIZE + SIZE // 2, _fake_load(), policy)
    hits = []
    for k in keys:
        before = cache.stats.hits
        assert cache.get(k)(torch.tensor(1.0)) == 1.0 + k[1]
        hits.append(cache.stats.hits > before)
        assert cache.used <= cache.capacity
    expected_hits, expected_held = _reference(policy, slots, keys)
    assert hits == expected_hits and {k for k in expected_held if k in cache} == expected_held
    other = _reference("lfu" if policy == "lru" else "lru", slots, keys)[0]
    assert other != expected_hits  # the sequence tells the policies apart
    s = cache.stats
    assert s.lookups == len(keys) and s.hits + s.misses == len(keys) and s.waits == 0
    assert s.bytes_read == 3 * SIZE * s.misses and s.evictions == s.misses - slots
    assert s.hit_rate == pytest.approx(sum(hits) / len(keys))


@pytest.mark.parametrize(("policy", "script", "evicted"), [
    ("lru", "aaabcbde", "ac"),  # a: last used 4th; then c: used before b's second use
    ("lfu", "aaabcbde", "cd"),  # c: 1 use against a's 3 and b's 2; then d, the only one with 1 use
    ("lfu", "abcdbe", "ac"),  # ties (1 use each) go to the least recently used: a, then c before d
])
def test_which_expert_each_policy_evicts(policy, script, evicted):
    """Three slots and a scripted sequence of experts: which expert each miss evicts, read off the cache's
    membership before and after (and the loads its `load` saw)."""
    log = []
    cache = ExpertCache(3 * SIZE, _fake_load(log), policy)
    key = {name: (0, i) for i, name in enumerate("abcde")}
    seen = []
    for name in script:
        before = {n for n in key if key[n] in cache}
        cache.get(key[name])
        after = {n for n in key if key[n] in cache}
        seen += sorted(before - after)
        assert name in after and len(after) <= 3
    assert "".join(seen) == evicted and cache.stats.evictions == len(evicted)
    assert log == [key[n] for n in dict.fromkeys(script)]  # each expert read once: no evicted one came back
    cache.get(key[evicted[0]])  # the evicted expert is read again
    assert log[-1] == key[evicted[0]] and cache.stats.misses == len(set(script)) + 1


def test_prefetch_reads_ahead_on_another_thread():
    log, closed = [], []
    cache = ExpertCache(10 * SIZE, _fake_load(log), "lru", on_close=lambda: closed.append(True))
    cache.prefetch([(1, 2), (1, 3), (1, 2)])
    cache.close()  # waits for the reads in progress, then calls on_close once
    cache.close()
    assert closed == [True]
    assert sorted(log) == [(1, 2), (1, 3)] and len(cache) == 2
    assert cache.get((1, 2))(torch.tensor(0.0)) == 2.0
    s = cache.stats
    assert (s.prefetched, s.prefetch_used, s.hits, s.misses, s.bytes_read) == (2, 1, 1, 0, 6 * SIZE)


def test_lfu_keeps_a_prefetched_expert_until_its_first_use():
    """Its use count is still 0, so LFU would evict it first: at the next miss, a used expert goes instead."""
    cache = ExpertCache(3 * SIZE, _fake_load(), "lfu")
    for key in [(0, 1), (0, 2), (0, 1), (0, 2)]:
        cache.get(key)
    cache.prefetch([(1, 5)])
    cache.close()
    cache.get((0, 3))  # a miss: one of the three must go
    assert (1, 5) in cache and len(cache) == 3
    cache.get((1, 5))
    assert cache.stats.prefetch_used == 1


def test_options_are_validated():
    with pytest.raises(ValueError, match="policy='fifo' is invalid: allowed 'lru', 'lfu'"):
        ExpertCache(10, _fake_load(), "fifo")


# -- a budgeted model against the same checkpoint in memory ------------------------------------------------

CFG = ModelConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=48,
                  moe=MoEConfig(d_model=32, d_expert=32, n_experts=8, top_k=2, norm_topk_prob=True))
ONE_EXPERT = 3 * 32 * 32 * 4  # float32 gate, up, down


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = MoETransformer(CFG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(1.0 if name.endswith("norm.weight") else 4.0)  # routing and logits far from ties
    path = tmp_path_factory.mktemp("ckpt")
    hf.save(model, path)
    return path


def _budget(path, quant: str | None, n_experts: int) -> float:
    """A budget (GB) for the checkpoint at `path` holding its non-expert weights and `n_experts` experts in
    format `quant` (sizes read off a model loaded with a budget that holds it all)."""
    model = hf.load(path, quant=quant, max_memory_gb=10.0)
    one = expert_cache(model).get((0, 0)).nbytes
    return (resident_bytes(model) + n_experts * one) / 1e9


@pytest.mark.parametrize("quant,policy,prefetch", [(None, "lru", False), (None, "lfu", True), ("int8", "lru", True),
                                                   ("int8", "lfu", False), ("int4", "lru", False),
                                                   ("int4", "lfu", True)])
def test_budgeted_model_generates_the_in_memory_tokens(ckpt_dir, quant, policy, prefetch):
    """Within a budget of 10 of the 24 experts, the model computes what the same checkpoint loaded whole
    computes: bit for bit when quantized (the same expert weights through the same arithmetic), within
    float rounding in float (the in-memory float model keeps the stacked, trainable layout)."""
    full = hf.load(ckpt_dir, quant=quant)
    small = hf.load(ckpt_dir, quant=quant, max_memory_gb=_budget(ckpt_dir, quant, 10), policy=policy,
                    prefetch=prefetch)
    cache = expert_cache(small)
    assert isinstance(small.blocks[0].ffn.experts, OffloadedExperts) and expert_cache(full) is None
    one = cache.get((0, 0)).nbytes
    assert 10 * one <= cache.capacity < 11 * one
    whole = prepare_inference(hf.load(ckpt_dir), quant)  # the same formats, every expert in memory
    assert resident_bytes(whole) - resident_bytes(small) == 24 * one
    cache.reset_stats()
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if quant is None:
            torch.testing.assert_close(small(ids).logits, full(ids).logits, atol=1e-5, rtol=1e-5)
        else:  # quantized as read = the float model quantized afterwards = the budgeted model, bit for bit
            assert torch.equal(full(ids).logits, whole(ids).logits)
            assert torch.equal(small(ids).logits, full(ids).logits)
    prompt = ids[0, :5].tolist()
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, seed=3)):
        assert generate(small, prompt, 30, **kwargs) == generate(full, prompt, 30, **kwargs)
    prompts = [ids[1, :7].tolist(), prompt, ids[1, 9:10].tolist()]  # a batch: experts of 3 tokens per step
    assert generate_batch(small, prompts, 12) == generate_batch(full, prompts, 12)
    s = cache.stats
    assert s.misses > 0 and s.evictions > 0 and s.hits > 0 and cache.used <= cache.capacity
    read = 3 * 32 * 32 * 4  # bytes of one expert as stored (float32)
    assert s.bytes_read == read * (s.misses + s.prefetched)
    assert (s.prefetched > 0) == prefetch
    open_files = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    cache.close()  # closes the checkpoint's files
    if open_files is not None:
        assert len(os.listdir("/proc/self/fd")) < open_files


def test_budget_errors_are_named(ckpt_dir, tmp_path):
    with pytest.raises(ValueError, match=r"quant='int3' is not supported: allowed None \(float\), 'int8', 'int4'"):
        hf.load(ckpt_dir, quant="int3")
    for bad in (0, -1.0, float("nan"), float("inf"), "4", True):
        with pytest.raises(ValueError, match=re.escape(f"max_memory_gb={bad!r} is invalid")):
            hf.load(ckpt_dir, max_memory_gb=bad)
    with pytest.raises(ValueError, match="policy='mru' is invalid"):
        hf.load(ckpt_dir, max_memory_gb=1.0, policy="mru")
    with pytest.raises(ValueError, match=r"max_memory_gb=1e-06 is below .* GB of non-expert weights \+ "
                                         r".* for one expert; allowed >= ") as err:
        hf.load(ckpt_dir, max_memory_gb=1e-6)
    need = float(str(err.value).rsplit(">= ", 1)[1])
    assert need * 1e9 >= _budget(ckpt_dir, None, 1) * 1e9 > (need - 1e-3) * 1e9
    assert expert_cache(hf.load(ckpt_dir, max_memory_gb=need)).capacity >= ONE_EXPERT
    (tmp_path / "config.json").write_text((ckpt_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="max_memory_gb needs the experts' weights in \\*.safetensors files, read "
                                         "lazily; there are none"):
        hf.load(tmp_path, max_memory_gb=1.0)


# -- the rounding rule (issue 29): what is bit for bit, what agrees to the dtype's rounding ------------------

STEPS = 16  # one-token decode steps after the prefill


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = MoETransformer(CFG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(1.0 if name.endswith("norm.weight") else 4.0)
    path = tmp_path_factory.mktemp("bf16")
    hf.save(model.bfloat16(), path)
    return path


@torch.no_grad()
def _decode_logits(model, seqs: list[list[int]], plen: list[int]) -> list[torch.Tensor]:
    """Teacher-forced decoding as generate_batch runs it (left-padded prefill, then one token per row per step
    through the KV cache): for each row the float32 logits [STEPS, V] that chose tokens plen..plen+STEPS-1."""
    from moelab.model.cache import KVCache

    pad = [max(plen) - p for p in plen]
    cache = KVCache(pad=torch.tensor(pad) if any(pad) else None)
    logits = model(torch.tensor([[s[0]] * n + s[:p] for n, s, p in zip(pad, seqs, plen)]), cache=cache).logits[:, -1]
    out = []
    for i in range(STEPS):
        out.append(logits.float())
        logits = model(torch.tensor([[s[p + i]] for s, p in zip(seqs, plen)]), cache=cache).logits[:, -1]
    return list(torch.stack(out, 1))


PLEN = [4, 9]
SEQS = [torch.randint(0, 61, (p + STEPS,), generator=torch.Generator().manual_seed(p)).tolist() for p in PLEN]


@pytest.mark.parametrize("dtype,quant", [("bfloat16", None), ("bfloat16", "int8"), ("bfloat16", "int4"),
                                         ("float32", None)])
def test_budget_is_bit_for_bit_alone_and_batched(bf16_dir, ckpt_dir, dtype, quant):
    """README / docs/HF.md (issue 29): a budgeted model computes the whole model's decode logits bit for bit, each
    prompt alone and the two in one batch — float weights (float32 or bfloat16) and bfloat16 quantized. (A float32
    checkpoint quantized is not promised bit for bit at batch 1: measured within float32 rounding.)"""
    path = bf16_dir if dtype == "bfloat16" else ckpt_dir
    whole = hf.load(path, quant=quant)
    budget = hf.load(path, quant=quant, max_memory_gb=_budget(path, quant, 10))
    for rows in ([0], [1], [0, 1]):
        got = _decode_logits(budget, [SEQS[r] for r in rows], [PLEN[r] for r in rows])
        want = _decode_logits(whole, [SEQS[r] for r in rows], [PLEN[r] for r in rows])
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (dtype, quant, rows)


def test_float32_batch_agrees_with_alone_to_rounding(ckpt_dir):
    """README / docs/HF.md (issue 29): in float32 a prompt decoded in a batch and alone, budgeted or whole, agree
    within 1e-5 of the step's largest |logit| (float32 rounding; not bit for bit: the rows a product multiplies
    choose its kernel and summation order). No bound is promised for a batch in bfloat16 or quantized."""
    for model in (hf.load(ckpt_dir), hf.load(ckpt_dir, max_memory_gb=_budget(ckpt_dir, None, 10))):
        batch = _decode_logits(model, SEQS, PLEN)
        for r, (s, p) in enumerate(zip(SEQS, PLEN)):
            a, b = batch[r], _decode_logits(model, [s], [p])[0]
            scale = torch.maximum(a.abs().amax(-1, keepdim=True), b.abs().amax(-1, keepdim=True))
            assert ((a - b).abs() <= 1e-5 * scale).all(), (r, (a - b).abs().max())


# -- peak memory in a fresh process ----------------------------------------------------------------------

# As in test_hf's loading test (conftest.peak_rss_child): the child resets its peak (VmHWM) after torch's
# one-time machinery is up — a tiny model built on the meta device (~75 MB on first use) and a warm-up generation
# by a one-layer model of the same widths and formats (kernels' code, thread pools and first-use buffers for those
# shapes) — so what is measured is what this model's loading and generation add.
_BUDGET_CHILD = """
import moelab.hf as hf
from moelab.config import MoEConfig
from moelab.inference.generate import generate
from moelab.inference.prepare import prepare_inference
from moelab.inference.offload import expert_cache, resident_bytes

path, budget, quant, policy = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
quant = None if quant == "none" else quant
torch.manual_seed(0)
tiny = MoETransformer(ModelConfig(vocab_size=512, d_model=256, n_layers=1, n_heads=4, n_kv_heads=4,
                                  max_seq_len=64, moe=MoEConfig(d_model=256, d_expert=512, n_experts=2, top_k=1)))
warm = prepare_inference(tiny.bfloat16(), quant)
generate(warm, list(range(1, 17)), 2)  # the kernels' steps (a prompt is one of them) ...
warm.decoder = None
generate(warm, list(range(1, 17)), 2)  # ... and the torch code's, which a budgeted model's prompt runs
del tiny, warm
base = reset_peak()
model = hf.load(path, quant=quant, max_memory_gb=budget, policy=policy)
generate(model, list(range(1, 17)), 48, temperature=1.0, seed=0)
s = expert_cache(model).stats
print(peak() - base, resident_bytes(model), s.misses, s.bytes_read)
"""


@pytest.mark.parametrize("quant,policy", [(None, "lru"), (None, "lfu"), ("int4", "lru")])
def test_peak_memory_stays_under_the_budget(tmp_path, quant, policy):
    """A 100 MB bfloat16 model (its experts 99 % of it) generating 48 sampled tokens within a 20 MB budget:
    peak RSS rises by less than the budget plus 20 MB (oneDNN's kernels for the expert segments' row counts,
    activations, KV cache, a token's evicted experts still in use), though the experts read add up to several
    times the budget. (Without `return_freed_memory` the int4 case rises by ~100 MB: a fragmented heap.)"""
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=64,
                      moe=MoEConfig(d_model=256, d_expert=512, n_experts=32, top_k=4))
    torch.manual_seed(0)
    model = MoETransformer(cfg).bfloat16()
    size = resident_bytes(model)
    hf.save(model, tmp_path)
    del model
    budget = 20e6
    increase, resident, misses, read = map(int, peak_rss_child(_BUDGET_CHILD, tmp_path, budget / 1e9,
                                                               str(quant).lower(), policy))
    print(f"{quant} {policy}: peak RSS increase {increase / 1e6:.1f} MB, budget {budget / 1e6:.0f} MB (resident "
          f"{resident / 1e6:.1f} MB), model {size / 1e6:.0f} MB, {misses} misses, {read / 1e6:.0f} MB read")
    assert size > 5 * budget and read > 4 * budget
    assert increase < budget + 20e6
