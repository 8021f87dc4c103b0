"""Inference weight formats (moelab.inference.formats): every
format's product against dequantize-then-matmul in float64,
the quantizers against their error bounds computed here, the portable form, the fallback off the kernels, the
quantized expert store against the per-token reference of tests/reference.py, and the named errors."""

from __future__ import annotations

import copy

import pytest
import torch

from moelab import MoEConfig
from moelab.inference import backend, native
from moelab.inference import formats as quant
from moelab.inference.formats import Int4Weight, linear_weight, load_linear_weight, pack_nibbles, unpack_nibbles
from moelab.inference.prepare import store_experts
from moelab.inference.quantized_experts import QuantizedExperts, expert_weights
from moelab.layer.moe import MoE
from moelab.layer.policy import DECODE, GROUPED, choose_path
from reference import moe_reference

FORMATS = [(None, 32), ("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)]
# The products round their output to bfloat16 — the int8/int4 kernels also take bfloat16 activations, which the
# reference is given — so each output element is off by at most bfloat16's unit roundoff 2⁻⁸ (relative), plus
# float32 accumulation (~1e-6): the norm-wise bound below. Float32 float weights are float32 throughout.
BF16_BOUND = 2**-8 + 1e-4


def kernel_input(w: quant.LinearWeight, x: torch.Tensor) -> torch.Tensor:
    """x as the kernel that runs `w` on it multiplies it (float64 where quantized): moelab's int8 / int4 kernels
    quantize it per block of 32 (`native.quantize_activations`), torch's int8 / int4 kernels take bfloat16."""
    ours = w.native is not None and (w.quant == "int4" or x.shape[0] <= quant.NATIVE_MAX_ROWS[w.quant])
    if w.quant is None:
        return x.bfloat16() if ours else x
    return native.quantize_activations(x) if ours else x.bfloat16()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape", [(48, 128), (80, 256), (64, 128)])  # 48, 80: a partial block of the int4 pack
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", FORMATS)
def test_product_matches_dequantize_then_matmul_in_float64(fmt, dtype, shape):
    q, G = fmt
    torch.manual_seed(0)
    w = linear_weight(torch.randn(*shape, dtype=dtype), q, G)
    for M in (1, 5, 40):  # 40: more rows than one tile of moelab's kernels
        x = torch.randn(M, shape[1], dtype=dtype)
        y = w(x)
        assert y.dtype == dtype and y.shape == (M, shape[0])
        want = kernel_input(w, x).double() @ w.dequantize(torch.float64).T
        assert rel(y, want) <= (1e-6 if q is None and dtype == torch.float32 else BF16_BOUND), (M, rel(y, want))
        torch.testing.assert_close(w.add(x, y), 2 * y, atol=0.05 * want.abs().max().item(), rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_float_weight_is_exact_and_on_the_fastest_kernel_here(dtype):
    w = torch.randn(48, 64, dtype=dtype)
    fw = linear_weight(w)
    ours = dtype == torch.bfloat16 and native.available()
    assert fw.backend == ("native" if ours else "torch" if backend.packed_float_available(dtype) else "plain")
    assert fw.packed == (fw.backend == "torch")
    assert torch.equal(fw.dequantize(dtype), w) and fw.nbytes == 48 * 64 * dtype.itemsize


def test_int8_quantizer_within_half_a_step_per_channel():
    """The scale is max|W[n]|/127 rounded to bfloat16 and the codes round(W / scale) — as written here, bit for bit
    — so each row's largest weight codes to ±127 and |W − dequant(W)| ≤ scale/2 ≤ (max/127)·(1 + 2⁻⁸)/2 (a
    quantizer at max/126 breaks all three)."""
    torch.manual_seed(1)
    W = torch.randn(64, 512) * torch.rand(64, 1)  # rows of different scales
    w = linear_weight(W, "int8")
    step = W.double().abs().amax(1, keepdim=True) / 127
    scale = step.float().bfloat16()
    assert torch.equal(w.scale, scale[:, 0])
    assert torch.equal(w.q, torch.round(W / scale.float()).clamp(-127, 127).to(torch.int8))
    assert torch.equal(w.q.abs().amax(1), torch.full((64,), 127, dtype=torch.int8))
    err = (w.dequantize().double() - W.double()).abs()
    assert (err <= step * (1 + 2**-8) / 2 * (1 + 1e-6)).all()
    assert rel(w.dequantize(), W) < 0.01  # Gaussian rows: ≈ step/√12 per weight
    assert w.nbytes == 64 * 512 + 64 * 2


@pytest.mark.parametrize("G", [32, 128])
def test_int4_quantizer_within_half_a_step_per_group(G):
    """Per (row, group): step = (max − min)/15; |W − dequant(W)| ≤ step/2, plus the bfloat16 rounding of the
    stored scale (≤ 15·2⁻⁸ steps at the group's ends) and zero (≤ 2⁻⁸·|zero|)."""
    torch.manual_seed(2)
    W = torch.randn(32, 256) + torch.linspace(-1, 1, 256)  # groups not centred on zero
    w = linear_weight(W, "int4", G)
    g = W.view(32, 256 // G, G)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    bound = step * (0.5 + 15 * 2**-8) + (lo + 8 * step).abs() * 2**-8 + 1e-6
    assert ((w.dequantize().view_as(g) - g).abs() <= bound).all()
    assert rel(w.dequantize(), W) < 0.1
    assert w.codes().max() <= 15 and w.nbytes == 32 * 256 // 2 + (256 // G) * 32 * 2 * 2


@pytest.mark.parametrize("shape", [(16, 64), (48, 96), (80, 128), (128, 64)])
def test_int4_codes_read_back_from_the_kernel_pack(shape):
    """The kernels' private layouts (moelab's tiles where K % 64 == 0, else torch's pack) are inverted exactly
    (`codes`, `scales_zeros`), so a packed weight saves portably."""
    torch.manual_seed(3)
    q = torch.randint(0, 16, shape, dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)
    sz = torch.stack([torch.rand(shape[1] // 32, shape[0]), torch.randn(shape[1] // 32, shape[0])], -1)
    w = Int4Weight(pack_nibbles(q), sz)
    assert w.backend == ("native" if native.available() and shape[1] % 64 == 0 else
                         "torch" if backend.int4_kernel_available() else "plain")
    assert torch.equal(w.codes(), q) and torch.equal(w.tensors()["qweight"], pack_nibbles(q))
    assert torch.equal(w.tensors()["scale_zero"], sz.bfloat16())


@pytest.mark.parametrize("fmt", FORMATS)
def test_portable_form_loads_back_to_the_same_weight(fmt):
    q, G = fmt
    w = linear_weight(torch.randn(48, 128, dtype=torch.bfloat16), q, G)
    back = load_linear_weight(q, {k: v.clone() for k, v in w.tensors().items()})
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert torch.equal(back(x), w(x)) and torch.equal(back.dequantize(), w.dequantize())
    assert all(t.layout == torch.strided for t in w.tensors().values())


@pytest.mark.parametrize("fmt", [("int8", 32), ("int4", 64)])
def test_without_the_kernels_a_weight_is_dequantized_then_multiplied(fmt, monkeypatch):
    """The path off the CPU (or on a build without the kernels): same weights, same products."""
    q, G = fmt
    W, x = torch.randn(48, 128), torch.randn(3, 128)
    fast = linear_weight(W, q, G)
    monkeypatch.setattr(backend, "int8_kernel_available", lambda: False)
    monkeypatch.setattr(backend, "int4_kernel_available", lambda: False)
    monkeypatch.setattr(native.ops, "available", lambda: False)
    slow = linear_weight(W, q, G)
    assert fast.backend != "plain" and slow.backend == "plain" and slow.native is None
    assert torch.equal(slow.dequantize(), fast.dequantize())
    want = x.double() @ slow.dequantize(torch.float64).T
    assert rel(slow(x), want) < 1e-6  # float32 x stays float32 here
    exact = 1e-5 if fast.native is not None else BF16_BOUND  # torch's kernels round their output to bfloat16
    assert rel(fast(x), kernel_input(fast, x).double() @ fast.dequantize(torch.float64).T) < exact
    assert rel(fast(x), want) < 0.01  # the kernel's activations: bfloat16, or int8 per block of 32
    assert torch.equal(load_linear_weight(q, slow.tensors()).dequantize(), fast.dequantize())


@pytest.mark.parametrize("K", [64, 40])
def test_int8_takes_misaligned_operands_and_any_width(K):
    """Weights read from a stacked file tensor start anywhere, and activations may be row slices: the product still
    matches (torch 2.13's int8 kernel would crash on these from 4 rows on; widths K % 16 != 0 dequantize)."""
    torch.manual_seed(6)
    W = torch.randn(48, K)
    ref = linear_weight(W, "int8")
    buf = torch.zeros(48 * K + 8, dtype=torch.int8)
    q = buf[8:].view(48, K)
    q.copy_(ref.q)
    sbuf = torch.zeros(49, dtype=torch.bfloat16)
    sbuf[1:] = ref.scale
    w = load_linear_weight("int8", {"qweight": q, "scale": sbuf[1:]})
    M = quant.NATIVE_MAX_ROWS["int8"] + 1  # rows that take torch's kernel where it runs
    xbuf = torch.randn((M + 1) * K + 4, dtype=torch.bfloat16)
    x = xbuf[4:].view(M + 1, K)[1:]  # M rows starting 2·(K + 4) bytes into the buffer
    assert rel(w(x), x.double() @ w.dequantize(torch.float64).T) <= BF16_BOUND
    assert w.kernel == (K % 16 == 0)


def moe_pair(dtype: torch.dtype, q: str | None, G: int = 32, **over):
    """An MoE layer with its experts converted to `q`, and the float layer holding the dequantized weights."""
    torch.manual_seed(4)
    moe = MoE(MoEConfig(d_model=64, d_expert=32, n_experts=6, top_k=2, **over)).to(dtype).eval()
    ref = copy.deepcopy(moe).double()
    moe.experts = store_experts(moe.experts, q, G)
    with torch.no_grad():
        for e, ew in enumerate(moe.experts.weights):
            ref.experts.w_in[e] = ew.gate_up.dequantize(torch.float64).T
            ref.experts.w_out[e] = ew.down.dequantize(torch.float64).T
    return moe, ref


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [(None, 32), ("int8", 32), ("int4", 32)])
def test_quantized_store_matches_the_reference_on_its_weights(fmt, dtype, activation):
    """Decode (one token) and the grouped loop (several) through the store equal the per-token float64 reference
    run on the store's own (dequantized) weights; each bfloat16 rounding — activations in, the hidden layer, the
    output — costs up to 2⁻⁸, hence 4 · 2⁻⁸ (float32 float weights: float32 rounding)."""
    moe, ref = moe_pair(dtype, *fmt, activation=activation, n_shared=1)
    assert isinstance(moe.experts, QuantizedExperts) and moe.experts.stacked() is None
    exact = fmt[0] is None and dtype == torch.float32
    for shape in [(1, 64), (2, 5, 64)]:
        x = torch.randn(*shape).to(dtype)
        with torch.no_grad():
            assert choose_path(moe, x.view(-1, 64), moe.router(x.view(-1, 64))) is (
                DECODE if shape == (1, 64) else GROUPED["loop"])
            y, _ = moe(x)
        assert y.dtype == dtype
        want, _ = moe_reference(ref, x.double())
        assert rel(y, want) < (1e-5 if exact else 4 * 2**-8), (shape, rel(y, want))


def test_quantized_store_is_close_to_the_float_store():
    """The whole quantization error of a layer on Gaussian weights: three quantized matrices in series (gate and
    up multiply in SwiGLU, then down), each off by its weight error (int8 ~0.6 %, int4 g32 ~8 %:
    test_int8/int4_quantizer_*), so ≈ √3 × that plus bfloat16 activations: measured 1.0–1.3 % and 12–15 %."""
    torch.manual_seed(5)
    float_moe = MoE(MoEConfig(d_model=64, d_expert=32, n_experts=6, top_k=2)).eval()
    with torch.no_grad():
        for p in float_moe.experts.parameters():
            p.normal_()
    x = torch.randn(7, 64)
    with torch.no_grad():
        want, _ = float_moe(x)
        for q, bound in [("int8", 0.02), ("int4", 0.2)]:
            moe = copy.deepcopy(float_moe)
            moe.experts = store_experts(moe.experts, q)
            assert rel(moe(x)[0], want) < bound


def test_store_sizes():
    moe, _ = moe_pair(torch.bfloat16, "int8")
    per_expert = (64 * 64 + 64 * 2) + (64 * 32 + 64 * 2)  # gate_up [64, 64], down [64, 32]: int8 + bf16 scales
    assert moe.experts.weights[0].nbytes == per_expert and moe.experts.nbytes == 6 * per_expert


def test_named_errors():
    w = torch.randn(48, 64)
    with pytest.raises(ValueError, match="quant='int3' is not supported"):
        linear_weight(w, "int3")
    with pytest.raises(ValueError, match="group_size=48 is not supported"):
        linear_weight(w, "int4", 48)
    with pytest.raises(ValueError, match="out_features divisible by 16"):
        linear_weight(torch.randn(40, 64), "int4")
    with pytest.raises(ValueError, match="in_features divisible by group_size"):
        linear_weight(torch.randn(48, 96), "int4", 64)
    with pytest.raises(ValueError, match="2-D floating-point"):
        linear_weight(torch.randn(64), "int8")
    with pytest.raises(ValueError, match="2-D floating-point"):
        linear_weight(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="do not fit one swiglu expert"):
        expert_weights(torch.randn(32, 64), torch.randn(64, 32), "int8")
    with pytest.raises(ValueError, match="activation='relu'"):
        expert_weights(torch.randn(32, 64), torch.randn(64, 32), activation="relu")
    with pytest.raises(ValueError, match="stored as qweight, scale"):
        load_linear_weight("int8", {"weight": w})
    with pytest.raises(ValueError, match="at least one expert"):
        QuantizedExperts([])


def test_stored_weights_are_checked_before_packing():
    """A stored form whose names or scale shapes do not fit its codes is a named error at load, not a torch
    error at the first product."""
    w = torch.randn(32, 64)
    for q, name in (("int8", "scale"), ("int4", "scale_zero")):
        good = linear_weight(w, q).tensors()
        torch.testing.assert_close(load_linear_weight(q, good).dequantize(), linear_weight(w, q).dequantize())
        cut = {**good, name: good[name][:-1] if q == "int8" else good[name][:, :-1]}
        with pytest.raises(ValueError, match=f"an {q} weight with qweight .* has {name} .* do not fit"):
            load_linear_weight(q, cut)
        with pytest.raises(ValueError, match="is stored as"):
            load_linear_weight(q, {"weight": w})


@pytest.mark.parametrize("quant_name", ["int8", "int4"])
def test_quantizing_by_blocks_of_rows_changes_nothing(quant_name, monkeypatch):
    """Large weights are quantized QUANTIZE_ROWS rows at a time (bounded temporaries): the same codes and scales."""
    W = torch.randn(80, 128)
    before = W.clone()
    whole = linear_weight(W, quant_name)
    assert torch.equal(W, before)  # quantizing works in place on its own copy, never on the caller's float32 weight
    monkeypatch.setattr(quant, "QUANTIZE_ROWS", 32)  # 80 rows: blocks of 32, 32 and 16
    blocks = linear_weight(W, quant_name)
    assert all(torch.equal(a, b) for a, b in zip(whole.tensors().values(), blocks.tensors().values()))
