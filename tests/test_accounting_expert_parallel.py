"""moelab.accounting.expert_parallel: expert-parallel traffic against hand computations, exhaustive
enumeration of expert choices and a routing simulation; weights per rank; errors."""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

import pytest

from moelab import ModelConfig, MoEConfig
from moelab.accounting import (
    SUPPORTED_MODEL_TYPES,
    count_params,
    expert_parallel_plan,
    list_presets,
    load_preset,
    remote_assignments,
    remote_ranks,
    to_spec,
    weight_bytes,
)
from moelab.accounting.expert_parallel import EXPERT_COUNT_FIELDS, max_remote_ranks

# Mixtral-8x7B: d 4096, 32 MoE layers, 8 experts of 3·4096·14336 parameters, top-2
MIX_D, MIX_LAYERS, MIX_EXPERT = 4096, 32, 3 * 4096 * 14336


def rank_of(expert: int, n_experts: int, ranks: int) -> int:
    return expert // (n_experts // ranks)


def enumerate_copies(n_experts: int, k: int, ranks: int) -> tuple[Fraction, Fraction]:
    """Exact mean (per assignment, per distinct rank) remote copies over every home rank and k-subset."""
    per_assignment = per_rank = Fraction(0)
    n = 0
    for home in range(ranks):
        for chosen in itertools.combinations(range(n_experts), k):
            dest = [rank_of(e, n_experts, ranks) for e in chosen]
            per_assignment += sum(r != home for r in dest)
            per_rank += len(set(dest) - {home})
            n += 1
    return per_assignment / n, per_rank / n


def test_mixtral_8_ranks_bf16_by_hand():
    spec = to_spec("mixtral-8x7b")
    plan = expert_parallel_plan(spec, 8, tokens=4 * 1024, activation_bytes=2, link_bandwidth=50e9)
    per_layer = 2 * 2 * (7 / 8) * 4096 * 2  # dispatch + combine, k = 2, 7 of 8 ranks remote, bf16
    assert per_layer == 28672
    pa, pr = plan.per_assignment, plan.per_rank
    assert pa.copies_per_token_layer == 1.75
    assert pa.bytes_per_token_layer == per_layer
    assert pa.bytes_per_token == 32 * per_layer
    assert pa.bytes_per_step == 4096 * 32 * per_layer
    assert pa.bytes_per_rank == 4096 / 8 * 32 * per_layer  # 512 tokens per rank
    assert pa.seconds == pytest.approx(512 * 32 * per_layer / 50e9)
    # one expert per rank: a second copy to the same rank never happens, deduplication changes nothing
    assert pr.bytes_per_token == pytest.approx(pa.bytes_per_token)
    d = plan.to_dict()
    assert d["per_assignment"]["bytes_per_token_training"] == 2 * 32 * per_layer
    assert d["per_assignment"]["seconds_per_step_training"] == pytest.approx(2 * 512 * 32 * per_layer / 50e9)
    assert (plan.moe_layers, plan.n_experts, plan.experts_per_rank, plan.allowed_ranks) == (32, 8, 1, (1, 2, 4, 8))


def test_mixtral_weights_per_rank_by_hand():
    total = count_params("mixtral-8x7b").total
    experts = MIX_LAYERS * 8 * MIX_EXPERT
    for n in (1, 2, 4, 8):
        plan = expert_parallel_plan(to_spec("mixtral-8x7b"), n, precision="bf16")
        assert plan.expert_weight_bytes == 2 * experts
        assert plan.weight_bytes_per_rank == pytest.approx(2 * (total - experts) + 2 * experts / n)
    assert expert_parallel_plan(to_spec("mixtral-8x7b"), 1, precision="fp8").weight_bytes_per_rank == total


@pytest.mark.parametrize("name", ["mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b"])
def test_one_rank_moves_nothing_and_holds_everything(name):
    spec = to_spec(name)
    plan = expert_parallel_plan(spec, 1, tokens=1000)
    for t in (plan.per_assignment, plan.per_rank):
        assert t.copies_per_token_layer == 0 and t.bytes_per_token == 0 and t.seconds == 0
    assert plan.weight_bytes_per_rank == pytest.approx(weight_bytes(count_params(spec).total, "bf16"))


def test_dense_model_moves_nothing():
    plan = expert_parallel_plan(to_spec("llama-3.1-8b"), 4, tokens=10)
    assert plan.moe_layers == 0 and plan.per_assignment.bytes_per_step == 0 and plan.per_rank.bytes_per_step == 0
    assert plan.weight_bytes_per_rank == pytest.approx(2 * count_params("llama-3.1-8b").total)
    assert any("no routed experts" in n for n in plan.notes)


@pytest.mark.parametrize("E", [2, 4, 6, 8, 12])
def test_copies_match_exhaustive_enumeration(E):
    for n in (r for r in range(1, E + 1) if E % r == 0):
        for k in range(1, E + 1):
            per_assignment, per_rank = enumerate_copies(E, k, n)
            assert remote_assignments(E, k, n) == pytest.approx(float(per_assignment), abs=1e-12)
            assert remote_ranks(E, k, n) == pytest.approx(float(per_rank), abs=1e-12)


def test_dedup_known_values_and_limits():
    # E = 4, N = 2, k = 2: of the 6 pairs, 4 straddle both ranks (1 remote rank), 2 sit on one rank,
    # which is remote for half of the homes -> (4 + 2 · 1/2) / 6 = 5/6
    assert remote_ranks(4, 2, 2) == pytest.approx(5 / 6)
    assert remote_assignments(4, 2, 2) == 1.0
    # k = E: every expert is chosen, every other rank is touched once
    assert remote_ranks(256, 256, 8) == pytest.approx(7)
    # one expert per rank: dedup = per assignment
    assert remote_ranks(64, 6, 64) == pytest.approx(remote_assignments(64, 6, 64))
    assert remote_ranks(256, 8, 8) < remote_assignments(256, 8, 8)


@pytest.mark.parametrize("E,k,N", [(64, 6, 8), (256, 8, 64), (16, 4, 4)])
def test_plan_matches_simulated_uniform_routing(E, k, N):
    d = 64
    cfg = ModelConfig(vocab_size=100, d_model=d, n_layers=3, n_heads=4, n_kv_heads=4, n_dense_layers=1,
                      moe=MoEConfig(d_model=d, d_expert=16, n_experts=E, top_k=k))
    plan = expert_parallel_plan(to_spec(cfg), N, tokens=1, activation_bytes=2)
    rng = random.Random(0)
    trials = 20_000
    sent_pa = sent_pr = 0
    for _ in range(trials):
        home = rng.randrange(N)
        dest = [rank_of(e, E, N) for e in rng.sample(range(E), k)]
        sent_pa += 2 * sum(r != home for r in dest) * d * 2  # dispatch + combine, bf16
        sent_pr += 2 * len(set(dest) - {home}) * d * 2
    assert plan.moe_layers == 2  # first layer dense
    assert plan.per_assignment.bytes_per_token == pytest.approx(2 * sent_pa / trials, rel=0.02)
    assert plan.per_rank.bytes_per_token == pytest.approx(2 * sent_pr / trials, rel=0.02)


def test_ranks_must_divide_the_experts():
    with pytest.raises(ValueError, match=r"expert_parallel=3 does not divide num_local_experts=8 "
                                         r"\(routed experts per MoE layer\); allowed: 1, 2, 4, 8$"):
        expert_parallel_plan(to_spec("mixtral-8x7b"), 3)
    with pytest.raises(ValueError, match="n_routed_experts=256.*allowed: 1, 2, 4, 8, 16, 32, 64, 128, 256$"):
        expert_parallel_plan(to_spec("deepseek-v3"), 48)
    with pytest.raises(ValueError, match="expert_parallel=16 does not divide num_local_experts=8"):
        expert_parallel_plan(to_spec("mixtral-8x7b"), 16)
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                      moe=MoEConfig(d_model=32, d_expert=16, n_experts=6, top_k=2))
    with pytest.raises(ValueError, match="moe.n_experts=6.*allowed: 1, 2, 3, 6"):
        expert_parallel_plan(to_spec(cfg), 4)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="expert_parallel=.* is invalid: allowed an integer >= 1"):
            expert_parallel_plan(to_spec("mixtral-8x7b"), bad)
    with pytest.raises(ValueError, match="link_bandwidth"):
        expert_parallel_plan(to_spec("mixtral-8x7b"), 2, link_bandwidth=0)
    with pytest.raises(ValueError, match="top_k"):
        remote_ranks(8, 2.5, 2)


def _field(cfg: dict, path: str):
    for key in path.split("."):
        cfg = cfg[key]
    return cfg


def test_expert_count_field_names_are_the_config_fields():
    """Each MoE model type names the config field that holds E, and that field holds it in every preset."""
    dense = {"llama", "mistral", "qwen2", "qwen3"}
    assert set(SUPPORTED_MODEL_TYPES) - dense <= set(EXPERT_COUNT_FIELDS)
    for name in list_presets():
        spec = to_spec(name)
        banks = [layer.ffn.experts for layer in spec.layers if layer.ffn.experts is not None]
        if banks:
            assert _field(load_preset(name), EXPERT_COUNT_FIELDS[spec.model_type]) == banks[0].n, name


def test_group_limited_routing_is_read_from_deepseek_configs():
    def groups(name: str) -> tuple[int, int]:
        e = next(layer.ffn.experts for layer in to_spec(name).layers if layer.ffn.experts is not None)
        return e.n_groups, e.topk_groups

    assert groups("deepseek-v3") == (8, 4)  # node-limited routing, M = 4 (DeepSeek-V3 §2.1.2)
    assert groups("deepseek-v2") == (8, 3)  # device-limited routing, M = 3 (DeepSeek-V2 §2.2.2)
    assert groups("deepseek-v2-lite") == (1, 1)  # topk_method "greedy"
    assert groups("mixtral-8x7b") == (1, 1)
    plan = expert_parallel_plan(to_spec("deepseek-v3"), 8)
    assert plan.max_remote_ranks == 4 and plan.per_rank.copies_per_token_layer > 4  # the limit binds
    assert any("at most 4 other ranks" in n for n in plan.notes)
    assert expert_parallel_plan(to_spec("deepseek-v3"), 64).max_remote_ranks == 8  # k = 8 binds first
    assert expert_parallel_plan(to_spec("mixtral-8x7b"), 8).max_remote_ranks is None


@pytest.mark.parametrize("E,N,G,tg,k", [(8, 4, 4, 2, 3), (8, 2, 4, 1, 2), (8, 4, 2, 1, 4), (12, 4, 6, 2, 4),
                                        (12, 6, 3, 2, 5), (8, 8, 4, 3, 4)])
def test_group_bound_against_enumeration(E, N, G, tg, k):
    """The bound is >= the most remote ranks any group-limited choice reaches; equal when groups align."""
    m, s = E // N, E // G
    most = 0
    for picked in itertools.combinations(range(G), tg):
        pool = [e for g in picked for e in range(g * s, (g + 1) * s)]
        for chosen in itertools.combinations(pool, min(k, len(pool))):
            dest = {e // m for e in chosen}
            most = max(most, max(len(dest - {home}) for home in range(N)))
    bound = max_remote_ranks(E, k, N, G, tg)
    assert bound >= most
    if s % m == 0 or m % s == 0:
        assert bound == most
