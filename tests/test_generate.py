"""Generation: the sampling distribution against a hand computation, seeded draws against it, cached decoding
of several new tokens against a full recompute, the bounds, and the errors."""

from __future__ import annotations

import math

import pytest
import torch

from moelab import ModelConfig, MoEConfig
from moelab.inference.generate import generate, generate_batch, next_token_probs, sample_next
from moelab.model.cache import KVCache
from moelab.model.transformer import MoETransformer

LOGITS = [2.0, 1.0, 0.5, -1.0, 0.0]


def hand_probs(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """softmax(logits / T), then keep the most likely tokens until the mass before a token reaches top_p."""
    e = [math.exp(v / temperature) for v in logits]
    p = [v / sum(e) for v in e]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept, before = set(), 0.0
    for i in order:
        if before < top_p:
            kept.add(i)
        before += p[i]
    total = sum(p[i] for i in kept)
    return [p[i] / total if i in kept else 0.0 for i in range(len(p))]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (0.5, 0.8), (2.0, 0.6), (1.0, 0.3)])
def test_distribution_matches_a_hand_computation(temperature, top_p):
    got = next_token_probs(torch.tensor(LOGITS), temperature, top_p)
    assert got.tolist() == pytest.approx(hand_probs(LOGITS, temperature, top_p), abs=1e-6)


def test_seeded_draws_follow_the_distribution():
    probs = hand_probs(LOGITS, 0.7, 0.9)
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    counts = [0] * len(LOGITS)
    for _ in range(n):
        counts[sample_next(torch.tensor(LOGITS), 0.7, 0.9, gen)] += 1
    for c, p in zip(counts, probs):
        assert abs(c / n - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12, (counts, probs)  # 4 sigma; 0 stays 0


def test_greedy_and_non_finite_logits():
    assert sample_next(torch.tensor(LOGITS), 0.0, 0.5, None) == 0
    assert next_token_probs(torch.tensor(LOGITS), 0.0, 1.0).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="non-finite logits"):
            sample_next(torch.tensor([0.0, bad]), 1.0, 1.0, None)


CONFIGS = {
    "gqa": ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24,
                       moe=MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2)),
    "mla": ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, attention="mla", kv_lora_rank=16,
                       qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=24,
                       moe=MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2, router="sigmoid")),
    "sinks-window": ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24,
                                attn_sinks=True, sliding_window=4, sliding_every=2, qkv_bias=True, o_bias=True,
                                head_dim=8, rotary_dim=4,  # gpt-oss's attention, GLM's partial rotary
                                moe=MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2, biases=True,
                                              activation="clamped_swiglu")),
}


def _model(name: str) -> MoETransformer:
    """CONFIGS[name] in float64 with random weights; sinks and biases random too (they start at zero)."""
    torch.manual_seed(0)
    model = MoETransformer(CONFIGS[name]).double().eval()
    with torch.no_grad():
        for n, t in model.named_parameters():
            if n.endswith(("sinks", "bias", "b_in", "b_out")):
                t.normal_()
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_several_new_tokens_after_a_cache_are_causally_masked(name):
    """A chunk of 4 tokens fed after 5 cached ones gives the logits a full recompute gives: each new token
    sees the cache and the new tokens before it, never the ones after."""
    model = _model(name)
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache()
        model(ids[:, :5], cache=cache)
        chunk = model(ids[:, 5:9], cache=cache).logits
        rest = model(ids[:, 9:], cache=cache).logits
    torch.testing.assert_close(chunk, full[:, 5:9], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(rest, full[:, 9:], atol=1e-12, rtol=1e-10)


def test_bounds_are_errors_not_silent_cuts():
    torch.manual_seed(0)
    model = MoETransformer(CONFIGS["gqa"]).eval()  # max_seq_len 24
    assert len(generate(model, [1] * 20, 4)) == 4  # exactly fills the context
    assert generate(model, [1, 2], 0) == []
    with pytest.raises(ValueError, match=r"prompt \(20 tokens\) \+ max_new_tokens=5 exceed .*=24.*at most 4"):
        generate(model, [1] * 20, 5)
    with pytest.raises(ValueError, match=r"prompt \(24 tokens\).*max_seq_len=24.*shorter prompt"):
        generate(model, [1] * 24, 1)
    for kwargs, match in [(dict(max_new_tokens=-1), "max_new_tokens=-1"),
                          (dict(max_new_tokens=3, temperature=float("nan")), "temperature=nan"),
                          (dict(max_new_tokens=3, temperature=-1.0), "temperature=-1.0"),
                          (dict(max_new_tokens=3, top_p=0.0), "top_p=0.0")]:
        with pytest.raises(ValueError, match=match):
            generate(model, [1, 2], **kwargs)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        generate(model, [], 3)


def test_text_or_foreign_ids_where_ids_are_expected_are_named():
    """Issue 29: `generate(model, "hello", 4)` was a TypeError from inside the batch builder; an id outside the
    vocabulary an IndexError from the embedding. Each names the argument; a tensor of ids is accepted."""
    model = _model(next(iter(CONFIGS)))
    V = model.cfg.vocab_size
    with pytest.raises(TypeError, match=r"prompt_ids='hello' is text: pass token ids, e.g\. .*prompt_ids\(text\)"):
        generate(model, "hello", 4)
    with pytest.raises(TypeError, match=r"prompts\[1\]='b' is text"):
        generate_batch(model, [[1], "b"], 4)
    with pytest.raises(TypeError, match=r"prompt_ids=\[1, 'a'\] is not a sequence of integer token ids"):
        generate(model, [1, "a"], 4)
    with pytest.raises(TypeError, match="prompts='x' is not a list of token-id lists"):
        generate_batch(model, "x", 4)
    with pytest.raises(ValueError, match=f"prompt_ids holds token id {V}: allowed 0..{V - 1}"):
        generate(model, [1, V], 4)
    with pytest.raises(ValueError, match=r"prompts\[0\] holds token id -1"):
        generate_batch(model, [[-1]], 4)
    assert generate(model, torch.tensor([3, 9, 14]), 5) == generate(model, [3, 9, 14], 5)


# -- many prompts at once ---------------------------------------------------------------------------------

PROMPTS = [[3, 9, 14, 2, 40], [7], [5, 1, 8, 33, 21, 60, 12, 4, 9], [11, 30, 2]]


def _greedy_by_recompute(model, prompt: list[int], n: int) -> list[int]:
    """The reference: each new token the argmax of a full forward over the prompt and the tokens so far (no
    cache, no padding, one prompt)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("name", CONFIGS)
def test_a_batch_of_prompts_gets_each_prompts_own_tokens(name):
    """Prompts of lengths 5, 1, 9 and 3, left-padded into one batch: each gets, greedy, exactly the tokens a
    full recompute of it alone gives, and, sampled with a seed, the tokens it draws alone; its prefill logits
    are those it has alone."""
    model = _model(name)
    with torch.no_grad():
        expected = [_greedy_by_recompute(model, p, 8) for p in PROMPTS]
        record: list = []
        assert generate_batch(model, PROMPTS, 8, record=record) == expected
        assert [generate(model, p, 8) for p in PROMPTS] == expected
        sampled = generate_batch(model, PROMPTS, 8, temperature=1.0, seed=5)
        assert sampled == [generate(model, p, 8, temperature=1.0, seed=5) for p in PROMPTS]
        cache = KVCache(pad=torch.tensor([9 - len(p) for p in PROMPTS]))
        padded = torch.tensor([[0] * (9 - len(p)) + p for p in PROMPTS])
        logits = model(padded, cache=cache).logits
        for b, p in enumerate(PROMPTS):
            torch.testing.assert_close(logits[b, 9 - len(p):], model(torch.tensor([p])).logits[0], atol=1e-12,
                                       rtol=1e-10)
    n_moe, k = len(model.moe_layers()), CONFIGS[name].moe.top_k
    assert len(record) == 7 and all(len(step) == n_moe for step in record)  # 7 decode steps after the prefill
    assert all(a.shape == (4, k) and a.dtype.kind == "i" for step in record for a in step)


def test_a_batch_stops_each_prompt_at_its_stop_id_and_checks_its_input():
    torch.manual_seed(0)
    model = MoETransformer(CONFIGS["gqa"]).double().eval()
    alone = [generate(model, p, 10) for p in PROMPTS]
    stop = alone[2][3]  # the 4th token of the longest prompt's continuation
    out = generate_batch(model, PROMPTS, 10, stop_id=stop)
    assert out == [a[:a.index(stop)] if stop in a else a for a in alone]
    assert generate_batch(model, PROMPTS, 0) == [[], [], [], []]
    with pytest.raises(ValueError, match=r"prompt \(9 tokens\) \+ max_new_tokens=16 exceed .*=24.*at most 15"):
        generate_batch(model, PROMPTS, 16)
    for bad, match in (([], "prompts is empty"), ([[1], []], r"prompts\[1\] is empty")):
        with pytest.raises(ValueError, match=match):
            generate_batch(model, bad, 3)
