"""The expert stores (moelab.layer.experts) against the per-expert reference FFN of tests/reference.py."""

from __future__ import annotations

import pytest
import torch

from moelab import MoEConfig
from moelab.layer.experts import Experts, ExpertStore, FeedForward
from reference import expert_ffn


def store(activation: str) -> Experts:
    torch.manual_seed(0)
    experts = Experts(MoEConfig(d_model=8, d_expert=4, n_experts=5, top_k=2, activation=activation)).double()
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.5)
    return experts


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_ffn_and_decode_match_the_reference(activation):
    experts = store(activation)
    x = torch.randn(3, 8, dtype=torch.float64)
    for e in range(5):
        want = torch.stack([expert_ffn(x[t], experts.w_in[e], experts.w_out[e], activation) for t in range(3)])
        torch.testing.assert_close(experts.ffn(x, e), want)
    chosen, weights = [4, 1], [0.75, -0.5]
    want = sum(w * expert_ffn(x[0], experts.w_in[e], experts.w_out[e], activation) for e, w in zip(chosen, weights))
    with torch.no_grad():
        torch.testing.assert_close(experts.decode(x[:1], chosen, weights)[0], want)
        # the generic decode of the interface (a store that only implements ffn) gives the same
        torch.testing.assert_close(ExpertStore.decode(experts, x[:1], chosen, weights)[0], want)
        bf16 = experts.decode(x[:1].bfloat16(), chosen, weights, torch.bfloat16)  # autocast: cast chosen experts
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16[0].double(), want, atol=0.1, rtol=0.05)


def test_stacked_weights_and_keep_a_slice():
    experts = store("swiglu")
    assert experts.stacked()[0] is experts.w_in and experts.stacked(torch.float32)[1].dtype == torch.float32
    assert ExpertStore().stacked() is None  # a store without stacked weights says so
    w_in = experts.w_in.detach().clone()
    experts.keep(2, 4)
    assert experts.n_experts == 2 and torch.equal(experts.w_in, w_in[2:4])
    assert experts.w_in.expert_parallel and experts.w_out.expert_parallel


def test_feed_forward_initialises_its_output_projection_with_out_std():
    torch.manual_seed(0)
    ffn = FeedForward(256, 512, out_std=1e-3)
    assert ffn.w_in.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert ffn.w_out.weight.std().item() == pytest.approx(1e-3, rel=0.05)
