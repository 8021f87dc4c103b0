"""A model converted for inference (moelab.inference): its logits against the float model and against a float
twin holding the converted (dequantized) weights, cached decoding, what each weight became, the bytes a decode
token reads, and the named errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from moelab import ModelConfig, MoEConfig
from moelab.inference.generate import generate
from moelab.inference.prepare import (
    InferenceLinear,
    check_inference_device,
    decode_bytes,
    expert_quant,
    prepare_inference,
    store_experts,
    weight_formats,
)
from moelab.inference.quantized_experts import QuantizedExperts
from moelab.layer.moe import MoE
from moelab.model.attention import Attention
from moelab.model.cache import KVCache
from moelab.model.transformer import MoETransformer

MOE = MoEConfig(d_model=64, d_expert=32, n_experts=6, top_k=2, n_shared=1)
CONFIGS = {
    "gqa_tied": ModelConfig(vocab_size=96, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64,
                            n_dense_layers=1, moe=MOE, qk_norm="head", max_seq_len=32),
    "gqa_bias_untied": ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, qkv_bias=True,
                                   qk_norm="full", tie_embeddings=False, max_seq_len=32,
                                   moe=MoEConfig(d_model=64, d_expert=32, n_experts=4, top_k=2, n_shared=1,
                                                 shared_gate=True, activation="gelu")),
    "mla_vocab_100": ModelConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=4, attention="mla",
                                 q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                                 v_head_dim=16, max_seq_len=32,
                                 moe=MoEConfig(d_model=64, d_expert=32, n_experts=8, top_k=2, router="sigmoid")),
}


def build(name: str, dtype: torch.dtype = torch.float32) -> MoETransformer:
    torch.manual_seed(0)
    model = MoETransformer(CONFIGS[name])
    with torch.no_grad():  # weights of unit scale, so that quantization errors are not hidden by tiny outputs
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    return model.to(dtype).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dequantized_twin(float_model: MoETransformer, converted: MoETransformer) -> MoETransformer:
    """A float copy of the model whose every converted weight is that weight dequantized (float32)."""
    twin = copy.deepcopy(float_model).float()
    with torch.no_grad():
        for bt, bc in zip(twin.blocks, converted.blocks):
            if isinstance(bt.attn, Attention):
                parts = (bt.attn.wq, bt.attn.wk, bt.attn.wv)
                for lin, w in zip(parts, bc.attn.wqkv.w.dequantize().split([p.out_features for p in parts])):
                    lin.weight.copy_(w)
            for name, m in bc.named_modules():
                if isinstance(m, InferenceLinear) and name != "attn.wqkv":
                    bt.get_submodule(name).weight.copy_(m.w.dequantize())
                elif isinstance(m, QuantizedExperts):
                    store = bt.get_submodule(name)
                    for e, ew in enumerate(m.weights):
                        store.w_in[e], store.w_out[e] = ew.gate_up.dequantize().T, ew.down.dequantize().T
        twin.head = nn.Linear(twin.cfg.d_model, twin.cfg.vocab_size, bias=False)
        twin.head.weight.copy_(converted.head.w.dequantize())
    return twin


def cached_logits(model: MoETransformer, ids: torch.Tensor) -> torch.Tensor:
    """Prefill of 6 positions, then one position at a time through the KV cache."""
    cache = KVCache()
    pieces = [model(ids[:, :6], cache=cache).logits]
    pieces += [model(ids[:, t:t + 1], cache=cache).logits for t in range(6, ids.shape[1])]
    return torch.cat(pieces, 1)


@pytest.mark.parametrize("name", CONFIGS)
def test_float_conversion_keeps_the_logits(name):
    """quant=None: fused q|k|v and prepacked weights compute the same products (float32: to rounding)."""
    model = build(name)
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        want = model(ids).logits
        converted = prepare_inference(copy.deepcopy(model))
        assert rel(converted(ids).logits, want) < 1e-5
        assert rel(cached_logits(converted, ids), want) < 1e-5  # decode path, KV cache
    assert generate(converted, ids[0, :4].tolist(), 8) == generate(model, ids[0, :4].tolist(), 8)


def test_bfloat16_float_conversion_keeps_the_logits():
    """bfloat16: each product rounds to bfloat16 either way; only the order of the sums differs."""
    model = build("gqa_tied", torch.bfloat16)
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        assert rel(cached_logits(prepare_inference(copy.deepcopy(model)), ids), model(ids).logits) < 2e-2


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("name", CONFIGS)
def test_quantized_model_matches_its_dequantized_twin(name, quant):
    """What quantization changes is the weights, nothing else: the converted model equals the float model that
    holds the dequantized weights, up to the bfloat16 activations the int kernels take (2⁻⁸ per rounding, a few
    roundings per layer: measured ≤ 1 %), on prefill and on cached decoding."""
    model = build(name)
    converted = prepare_inference(copy.deepcopy(model), quant)
    twin = dequantized_twin(model, converted)
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        want = twin(ids).logits
        assert rel(converted(ids).logits, want) < 0.02
        assert rel(cached_logits(converted, ids), want) < 0.02


@pytest.mark.parametrize(("quant", "bound"), [("int8", 0.05), ("int4", 0.5)])
def test_quantized_logits_stay_close_to_the_float_model(quant, bound):
    """The whole quantization error on unit-scale random weights (no outliers): int8 ≈ 1–2 %, int4 g32 ≈ 20–30 %
    of the logits' norm (every weight of the model ~8 % off, compounding over the layers)."""
    model = build("gqa_tied")
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        want = model(ids).logits
        got = prepare_inference(copy.deepcopy(model), quant)(ids).logits
    assert rel(got, want) < bound


def test_what_each_weight_becomes():
    model = prepare_inference(build("gqa_tied"), "int4")
    attn = model.blocks[0].attn
    assert not hasattr(attn, "wq") and attn.wqkv.out_features == 64 + 2 * 32
    assert isinstance(model.blocks[1].ffn.experts, QuantizedExperts)
    assert isinstance(model.blocks[1].ffn.router.weight, nn.Parameter)  # routers stay float
    # 3 × (qkv, o) + dense (w_in, w_out) + 2 × shared (w_in, w_out) + 2 × 6 experts × 2 + head
    assert weight_formats(model) == {"int4": 6 + 2 + 4 + 24 + 1}
    assert torch.equal(model.embed.weight, build("gqa_tied").embed.weight)  # the lookup keeps the float table
    # vocab 100 is no multiple of 16: int4 cannot take the head, which becomes int8
    assert weight_formats(prepare_inference(build("mla_vocab_100"), "int4"))["int8"] == 1
    assert prepare_inference(model, "int4") is model and weight_formats(model)["int4"] == 37  # idempotent


def test_decode_bytes_counts_weights_experts_routers_and_cache():
    cfg = CONFIGS["gqa_tied"]
    model = prepare_inference(build("gqa_tied"))  # float32: 4 bytes a weight
    D, V, E, k = 64, 96, 6, 2
    attn = D * (64 + 2 * 32) + D * D
    dense = 2 * D * 64 + 64 * D
    moe = k * (2 * 32 * D + 32 * D) + (2 * 32 * D + 32 * D) + E * D  # k experts, the shared one, the router
    weights = 3 * attn + dense + 2 * moe + V * D
    kv = 3 * 2 * cfg.n_kv_heads * cfg.head_width  # per cached position: k and v of every layer
    assert decode_bytes(model, 10) == 4 * (weights + 10 * kv)


def test_named_errors():
    with pytest.raises(ValueError, match="quant='int2' is not supported"):
        prepare_inference(build("gqa_tied"), "int2")
    with pytest.raises(ValueError, match="group_size=16 is not supported"):
        prepare_inference(build("gqa_tied"), "int4", group_size=16)
    model = build("gqa_tied")
    check_inference_device(model, "cuda")  # not converted: it moves with .to(device)
    prepare_inference(model, "int8")
    check_inference_device(model, "cpu")
    with pytest.raises(ValueError, match=r"device='cuda:1': the model holds weights converted for CPU inference "
                                         r"\(int8\)"):
        check_inference_device(model, "cuda:1")


def test_trained_model_keeps_its_validation_perplexity(tmp_path):
    """On a trained model — weights with structure, not Gaussian noise — the quantized formats keep the held-out
    perplexity: int8 within 2 %, int4 g32 within 10 % (measured: within 0.1 % here; docs/BENCHMARKS.md, "Decode",
    for the tiny preset). Codes grouped along the wrong axis move it by a factor of ~8; rounding subtler than
    that is for the quantizer tests of test_quant.py."""
    from moelab.config.train import TrainConfig
    from moelab.data.tokens import prepare_data, unigram_entropy
    from moelab.training.evaluation import evaluate_tokens
    from moelab.training.train import train

    cfg = ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      moe=MoEConfig(d_model=64, d_expert=32, n_experts=4, top_k=2))
    run = tmp_path / "run"
    model = train(cfg, TrainConfig(steps=120, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=5, eval_every=120,
                                   eval_batches=1, log_every=120, max_corpus_bytes=150_000, threads=1),
                  run, progress=False).model.eval()
    _, data = prepare_data(None, run, vocab_size=320, max_bytes=150_000, quiet=True)
    val = [int(t) for t in data.val[:2049]]

    def perplexity(m: MoETransformer) -> float:
        nats, n = evaluate_tokens(m, val, seq_len=64)
        return float(torch.tensor(nats / n).exp())

    want = perplexity(model)
    assert want < 0.9 * math.exp(unigram_entropy(data.train))  # it learned more than token frequencies
    for quant, bound in (("int8", 0.02), ("int4", 0.10)):
        got = perplexity(prepare_inference(copy.deepcopy(model), quant))
        assert abs(got / want - 1) < bound, (quant, got, want)


def test_an_expert_gets_one_format():
    """int4 where both of an expert's weights take it; where one cannot (here down's 48 inputs are not a
    multiple of the group size 32), int8 for both: one format per expert."""
    assert expert_quant((96, 64), (64, 48), "int4", 32) == "int8"
    assert expert_quant((96, 64), (64, 64), "int4", 32) == "int4"
    assert expert_quant((96, 64), (64, 48), None, 32) is None
    cfg = MoEConfig(d_model=64, d_expert=48, n_experts=2, top_k=1)
    store = store_experts(MoE(cfg).experts, "int4", 32)
    assert {(ew.gate_up.quant, ew.down.quant) for ew in store.weights} == {("int8", "int8")}
