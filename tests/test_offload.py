"""Experts streamed within a memory budget: the cache's eviction against a naive reference (LRU, LFU), its
bound and counters, prefetching; a budgeted model against the same checkpoint held in memory (logits and
generated tokens); peak RSS under the budget in a fresh process; and the named errors."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch

from moelab import hf
from moelab.config import ModelConfig, MoEConfig
from moelab.generate import generate
from moelab.model import MoETransformer
from moelab.offload import POLICIES, ExpertCache, OffloadedExperts, expert_cache, resident_bytes

SIZE = 100  # bytes of one fake expert


def _fake_load(log=None):
    def load(key, spare):
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


def test_prefetch_reads_ahead_on_another_thread():
    log = []
    cache = ExpertCache(10 * SIZE, _fake_load(log), "lru")
    cache.prefetch([(1, 2), (1, 3), (1, 2)])
    cache.close()  # waits for the reads in progress
    assert sorted(log) == [(1, 2), (1, 3)] and len(cache) == 2
    assert cache.get((1, 2))(torch.tensor(0.0)) == 2.0
    s = cache.stats
    assert (s.prefetched, s.prefetch_used, s.hits, s.misses, s.bytes_read) == (2, 1, 1, 0, 6 * SIZE)


def test_options_are_validated():
    with pytest.raises(ValueError, match="policy='fifo' is invalid: allowed 'lru', 'lfu'"):
        ExpertCache(10, _fake_load(), "fifo")


# -- a budgeted model against the same checkpoint in memory ------------------------------------------------

CFG = ModelConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=48,
                  moe=MoEConfig(d_model=32, d_expert=16, n_experts=8, top_k=2, norm_topk_prob=True))
ONE_EXPERT = 3 * 32 * 16 * 4  # float32 gate, up, down


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


def _budget(model: MoETransformer, n_experts: int) -> float:
    """A budget holding the non-expert weights of an in-memory `model` and `n_experts` experts."""
    return (resident_bytes(model) - 3 * 8 * ONE_EXPERT + n_experts * ONE_EXPERT) / 1e9


@pytest.mark.parametrize("policy,prefetch", [("lru", False), ("lfu", False), ("lru", True), ("lfu", True)])
def test_budgeted_model_generates_the_in_memory_tokens(ckpt_dir, policy, prefetch):
    full = hf.load(ckpt_dir)
    small = hf.load(ckpt_dir, max_memory_gb=_budget(full, 10), policy=policy, prefetch=prefetch)
    cache = expert_cache(small)
    assert isinstance(small.blocks[0].ffn.experts, OffloadedExperts) and cache.capacity < 11 * ONE_EXPERT
    assert resident_bytes(full) - resident_bytes(small) == 3 * 8 * ONE_EXPERT  # experts not in memory
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, full(ids).logits, atol=1e-5, rtol=1e-5)
    prompt = ids[0, :5].tolist()
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, seed=3)):
        assert generate(small, prompt, 30, **kwargs) == generate(full, prompt, 30, **kwargs)
    s = cache.stats
    assert s.misses > 0 and s.evictions > 0 and s.hits > 0 and cache.used <= cache.capacity
    assert s.bytes_read == ONE_EXPERT * (s.misses + s.prefetched)
    assert (s.prefetched > 0) == prefetch
    cache.close()


def test_budget_errors_are_named(ckpt_dir, tmp_path):
    full = hf.load(ckpt_dir)
    with pytest.raises(ValueError, match="quant='int3' is not supported: allowed None, 'int8', 'int4'"):
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
    assert need * 1e9 >= resident_bytes(full) + ONE_EXPERT > (need - 1e-3) * 1e9
    assert expert_cache(hf.load(ckpt_dir, max_memory_gb=need)).capacity >= ONE_EXPERT
    (tmp_path / "config.json").write_text((ckpt_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="max_memory_gb needs the experts' weights in \\*.safetensors files, read "
                                         "lazily; there are none"):
        hf.load(tmp_path, max_memory_gb=1.0)


# -- peak memory in a fresh process ----------------------------------------------------------------------

# As in test_hf's loading test: the child resets its peak (VmHWM) after torch's one-time machinery is up — a
# tiny model built on the meta device (~75 MB on first use) and a warm-up generation (kernels' first-use
# buffers) — so what is measured is what this model's loading and generation add.
_BUDGET_CHILD = textwrap.dedent("""
    import sys, torch, moelab.hf as hf
    from moelab.config import ModelConfig, MoEConfig
    from moelab.generate import generate
    from moelab.model import MoETransformer
    from moelab.offload import expert_cache, resident_bytes

    with torch.device("meta"):
        MoETransformer(ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, max_seq_len=8,
                                   d_ff=8, moe=None))
    torch.manual_seed(0)
    generate(MoETransformer(ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, max_seq_len=8,
                                        moe=MoEConfig(d_model=8, d_expert=8, n_experts=2, top_k=1))), [1], 2)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS:")
    budget = float(sys.argv[2])
    model = hf.load(sys.argv[1], max_memory_gb=budget, policy=sys.argv[3])
    generate(model, list(range(1, 17)), 48, temperature=1.0, seed=0)
    s = expert_cache(model).stats
    print(status("VmHWM:") - base, resident_bytes(model), s.misses, s.bytes_read)
""")


@pytest.mark.parametrize("policy", POLICIES)
def test_peak_memory_stays_under_the_budget(tmp_path, policy):
    """A 200 MB model (its experts 99 % of it) generating 48 sampled tokens within a 40 MB budget: peak RSS
    rises by less than the budget plus 15 MB (activations, KV cache, read scratch), though the
    experts read add up to several times the budget."""
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=64,
                      moe=MoEConfig(d_model=256, d_expert=512, n_experts=32, top_k=4))
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    size = resident_bytes(model)
    hf.save(model, tmp_path)
    del model
    budget = 40e6
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status")
    out = subprocess.run([sys.executable, "-c", _BUDGET_CHILD, str(tmp_path), str(budget / 1e9), policy],
                         capture_output=True, text=True, check=True)
    increase, resident, misses, read = map(int, out.stdout.split())
    print(f"{policy}: peak RSS increase {increase / 1e6:.1f} MB, budget {budget / 1e6:.0f} MB (resident "
          f"{resident / 1e6:.1f} MB), model {size / 1e6:.0f} MB, {misses} misses, {read / 1e6:.0f} MB read")
    assert size > 5 * budget and read > 3 * budget
    assert increase < budget + 15e6
