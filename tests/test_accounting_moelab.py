"""moelab.accounting on moelab's own models: counts against the built MoETransformer.

- total == sum(p.numel()) of the model built from the same ModelConfig;
- active == the parameters a one-token forward touches, measured with forward hooks: every module
  that runs contributes its parameters, except the stacked experts, which contribute one slice per
  expert that received the token (read from the `counts` the Experts module is called with, and
  cross-checked against which expert slices get a nonzero gradient).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from moelab import ModelConfig, MoEConfig  # noqa: E402
from moelab.accounting import count_params  # noqa: E402
from moelab.layer import paths  # noqa: E402
from moelab.layer.experts import Experts  # noqa: E402
from moelab.model.transformer import MoETransformer  # noqa: E402

D = 32


def moe(**kw) -> MoEConfig:
    return MoEConfig(**{"d_model": D, "d_expert": 24, "n_experts": 6, "top_k": 2, **kw})


CONFIGS = {
    "default_tied": ModelConfig(vocab_size=97, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40, moe=moe()),
    "shared_gate_dense_first_untied": ModelConfig(
        vocab_size=97, d_model=D, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=40, n_dense_layers=1, moe_every=2,
        tie_embeddings=False, qk_norm="head", qkv_bias=True,
        moe=moe(n_shared=2, d_shared=12, shared_gate=True)),
    "mla_qlora_sigmoid_groups_gelu": ModelConfig(
        vocab_size=97, d_model=D, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=40, n_dense_layers=2,
        attention="mla", q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
        tie_embeddings=False, activation="gelu",
        moe=moe(n_experts=8, top_k=3, n_shared=1, router="sigmoid", expert_bias=True, n_groups=4,
                topk_groups=2, activation="gelu")),
    "mla_full_rank_switch": ModelConfig(
        vocab_size=97, d_model=D, n_layers=3, n_heads=2, n_kv_heads=2, d_ff=40, attention="mla",
        q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=8,
        moe=moe(top_k=1, router="switch", capacity_factor=1.25)),
    "gqa_full_qknorm_k_equals_e": ModelConfig(
        vocab_size=97, d_model=D, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=12, d_ff=40, qk_norm="full",
        moe=moe(n_experts=3, top_k=3, n_shared=1)),
    "noisy_topk_router": ModelConfig(vocab_size=97, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40,
                                     moe=moe(router="noisy_topk", importance_loss_coef=0.1, load_loss_coef=0.1)),
    "dense_only": ModelConfig(vocab_size=97, d_model=D, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=40, moe=None),
}


def touched_by_one_token(model: MoETransformer, token: int = 5) -> tuple[int, list[int], list[int]]:
    """Parameters one token's forward touches, measured with forward hooks (see module docstring).

    Returns (touched, experts per MoE layer from the hooks, experts per MoE layer with nonzero grad).
    """
    ran: list[torch.nn.Module] = []
    experts_used: dict[torch.nn.Module, int] = {}

    def record(module, args, output):
        ran.append(module)
        if isinstance(module, Experts):
            experts_used[module] = int((args[1] > 0).sum())

    # the MoE layer reaches its experts either through Experts.forward (rows, counts) or, on the fused
    # CPU path, through fused.routed_ffn (tokens, token_idx, weight, counts, the store's w_in, ...):
    # record both
    banks_by_weight = {id(m.w_in): m for m in model.modules() if isinstance(m, Experts)}
    original_routed = paths.routed_ffn

    def routed(x_TD, token_idx, weight_A, counts, w_in, *rest):
        module = banks_by_weight[id(w_in)]
        ran.append(module)
        experts_used[module] = int((counts > 0).sum())
        return original_routed(x_TD, token_idx, weight_A, counts, w_in, *rest)

    handles = [m.register_forward_hook(record) for m in model.modules()]
    paths.routed_ffn = routed
    try:
        out = model(torch.tensor([[token]]))
    finally:
        paths.routed_ffn = original_routed
        for h in handles:
            h.remove()
    touched, seen = 0, set()
    for module in ran:
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            touched += p[0].numel() * experts_used[module] if isinstance(module, Experts) else p.numel()
    out.logits.float().sum().backward()
    banks = [m for m in model.modules() if isinstance(m, Experts)]
    by_hook = [experts_used.get(m, 0) for m in banks]
    by_grad = [int((m.w_out.grad.flatten(1).abs().sum(1) > 0).sum()) for m in banks]
    return touched, by_hook, by_grad


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_total_equals_numel_and_active_equals_touched(name):
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    model = MoETransformer(cfg)
    c = count_params(cfg)
    assert c.total == sum(p.numel() for p in model.parameters())
    touched, by_hook, by_grad = touched_by_one_token(model)
    assert c.active == touched
    assert by_hook == by_grad  # the hook's expert count is what the gradient sees
    if cfg.moe is not None:
        assert by_hook == [cfg.moe.top_k] * len(by_hook)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_breakdown_matches_module_names(name):
    cfg = CONFIGS[name]
    model = MoETransformer(cfg)
    named = dict(model.named_parameters())

    def size(pred) -> int:
        return sum(p.numel() for n, p in named.items() if pred(n))

    c = count_params(cfg)
    b = c.breakdown
    assert b["input_embedding"] == size(lambda n: n.startswith("embed."))
    assert b["output_head"] == size(lambda n: n.startswith("head."))
    assert b["routed_experts"] == size(lambda n: ".experts." in n)
    assert b["routers"] == size(lambda n: ".router." in n)
    assert b["shared_experts"] == size(lambda n: ".shared" in n)
    assert b["norms"] == size(lambda n: "norm" in n)
    assert b["attention"] == size(lambda n: ".attn." in n and "norm" not in n)
    assert b["dense_ffn"] == size(lambda n: ".ffn.w_" in n)
    assert sum(b.values()) == c.total


def test_expert_choice_counts_top_k_per_token_on_average():
    """Expert choice has no per-token k; each expert takes c = cf·T·k/E tokens, so a batch uses k
    experts per token on average — the figure `count_params` reports."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=D, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=40,
                      moe=moe(n_experts=4, top_k=2, router="expert_choice", capacity_factor=1.0))
    model = MoETransformer(cfg)
    out = model(torch.randint(0, 97, (2, 8)))
    assignments = float(out.aux[0].load.sum())
    expert = model.blocks[0].ffn.experts.w_in[0].numel() + model.blocks[0].ffn.experts.w_out[0].numel()
    c = count_params(cfg)
    per_token_routed = c.active_breakdown["routed_experts"]
    assert per_token_routed == expert * assignments / 16


def test_moelab_config_dict_is_accepted():
    cfg = CONFIGS["shared_gate_dense_first_untied"]
    assert count_params(cfg.to_dict()).total == count_params(cfg).total


@st.composite
def model_configs(draw) -> ModelConfig:
    """Small valid ModelConfigs over every layout switch the counter knows about."""
    d = draw(st.sampled_from([16, 24, 32]))
    n_heads = draw(st.sampled_from([2, 4]))
    n_layers = draw(st.integers(1, 4))
    attention = draw(st.sampled_from(["gqa", "mla"]))
    moe_cfg = None
    if draw(st.booleans()):
        n_experts = draw(st.integers(1, 6))
        n_shared = draw(st.integers(0, 2))
        moe_cfg = MoEConfig(d_model=d, d_expert=draw(st.sampled_from([8, 12])), n_experts=n_experts,
                            top_k=draw(st.integers(1, n_experts)), n_shared=n_shared,
                            d_shared=draw(st.sampled_from([None, 4])),
                            shared_gate=n_shared > 0 and draw(st.booleans()),
                            activation=draw(st.sampled_from(["swiglu", "gelu"])))
    return ModelConfig(
        vocab_size=draw(st.integers(5, 50)), d_model=d, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=draw(st.sampled_from([1, n_heads])), head_dim=draw(st.sampled_from([None, 6])),
        tie_embeddings=draw(st.booleans()), qkv_bias=draw(st.booleans()),
        activation=draw(st.sampled_from(["swiglu", "gelu"])),
        qk_norm=draw(st.sampled_from(["none", "head", "full"])), d_ff=draw(st.sampled_from([8, 20])),
        n_dense_layers=draw(st.integers(0, n_layers)), moe_every=draw(st.integers(1, 2)), moe=moe_cfg,
        attention=attention, q_lora_rank=draw(st.sampled_from([None, 8])), kv_lora_rank=8,
        qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=draw(st.sampled_from([4, 6])))


@settings(max_examples=40, deadline=None)
@given(model_configs())
def test_random_configs_total_and_active(cfg):
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    c = count_params(cfg)
    assert c.total == sum(p.numel() for p in model.parameters())
    touched, by_hook, _ = touched_by_one_token(model, token=cfg.vocab_size - 1)
    assert c.active == touched
