"""moelab's own CPU kernels (moelab.inference.native): every format's product against float64 on the weights and the
quantized activations the kernel states it multiplies, the tiled int4 layout against its definition, one MoE
layer's decode against a per-expert float64 loop, the activation quantizer against a hand computation, and the
thread count not changing a bit. Skipped, naming why, where the kernels cannot be built (the formats then run
on torch's kernels, which tests/test_quant.py covers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.inference import native

needs_kernels = pytest.mark.skipif(not native.available(), reason=f"moelab's CPU kernels: {native.why_unavailable()}")


def test_the_kernels_run_wherever_they_can_be_built():
    """A kernel that fails its own check at load is not used (torch's run instead, with a warning); here, on a
    machine that can build them, that would hide a broken kernel behind skipped tests, so it fails instead."""
    if native.why_unavailable() is None:
        assert native.available()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_weight(fmt: str, N: int, K: int, G: int = 32, seed: int = 0) -> tuple[native.NativeWeight, torch.Tensor]:
    """A weight in `fmt` and its float64 value W [N, K]."""
    g = torch.Generator().manual_seed(seed)
    if fmt == "bf16":
        w = torch.randn(N, K, generator=g).bfloat16()
        return native.NativeWeight("bf16", w), w.double()
    if fmt == "int8":
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        s = (torch.rand(N, generator=g) / 64).bfloat16()
        return native.NativeWeight("int8", q, s), q.double() * s.double()[:, None]
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
    s, z = (torch.rand(N, K // G, generator=g) / 8).bfloat16(), torch.randn(N, K // G, generator=g).bfloat16()
    W = (codes.double() - 8) * s.double().repeat_interleave(G, 1) + z.double().repeat_interleave(G, 1)
    return native.NativeWeight("int4", *native.tile_int4(codes, s, z), G), W


def seen(fmt: str, x: torch.Tensor) -> torch.Tensor:
    """x as the kernel multiplies it."""
    return x.bfloat16().double() if fmt == "bf16" else native.quantize_activations(x)


@needs_kernels
@pytest.mark.parametrize("fmt,G", [("bf16", 0), ("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128), ("int4", 256)])
@pytest.mark.parametrize("N,K", [(16, 256), (48, 768), (96, 2048)])
@pytest.mark.parametrize("M", [1, 3, 33])  # 33: two tiles of rows
def test_linear_is_the_float64_product_of_what_it_multiplies(fmt, G, N, K, M):
    if K % max(G, 1):
        pytest.skip("group size does not divide K")
    w, W = random_weight(fmt, N, K, G or 32)
    x = torch.randn(M, K) * torch.rand(M, K // 32, 1).repeat_interleave(32, 1).view(M, K) * 4  # blocks of scales
    y = native.linear(w, x)
    want = seen(fmt, x) @ W.T
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert rel(y, want) < 2e-6  # float32 accumulation only
    # and off the exact product by at most what rounding x moved: half a step per element, through |W|
    step = (x.abs().view(M, -1, 32).amax(-1, keepdim=True) / 127).expand(M, K // 32, 32).reshape(M, K)
    step = step if fmt != "bf16" else x.abs() * 2**-8
    bound = (step.double() / 2) @ W.abs().T
    assert ((y.double() - x.double() @ W.T).abs() <= bound * (1 + 1e-5) + 1e-4).all()


@needs_kernels
def test_activation_quantization_by_hand():
    """Per block of 32: scale max|x|/127, codes round(x/scale) (ties to even), an all-zero block stays zero."""
    x = torch.zeros(1, 64)
    x[0, :4] = torch.tensor([1.27, -0.635, 0.005, 0.0])  # scale 0.01: codes 127, -63.5→-64, 0.5→0, 0
    got = native.quantize_activations(x)
    assert torch.allclose(got[0, :4], torch.tensor([1.27, -0.64, 0.0, 0.0], dtype=torch.float64), atol=1e-6)
    assert torch.equal(got[0, 32:], torch.zeros(32, dtype=torch.float64))
    w, W = random_weight("int8", 16, 64)
    assert torch.allclose(native.linear(w, x).double(), got @ W.T, rtol=1e-6, atol=1e-6)


@needs_kernels
def test_tiled_int4_layout_is_its_definition_and_inverts():
    g = torch.Generator().manual_seed(1)
    N, K = 32, 128
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
    s, z = torch.rand(N, K // 64, generator=g), torch.rand(N, K // 64, generator=g)
    packed, st, zt = native.tile_int4(codes, s, z)
    t, b, j, r, i = 1, 2, 3, 5, 2
    row = codes[16 * t + r]
    assert packed[t, b, j, r, i] == row[32 * b + 4 * j + i] | row[32 * b + 16 + 4 * j + i] << 4
    assert st[t, 1, r] == s[16 * t + r, 1]
    back = native.untile_int4(packed, st, zt)
    assert all(torch.equal(a, b) for a, b in zip(back, (codes, s, z)))


@needs_kernels
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_moe_decode_is_the_sum_of_the_experts(fmt, activation):
    """y = Σⱼ rⱼ · downⱼ(act(gate_upⱼ(x))), each product in float64 on what the kernel multiplies (its
    activations quantized as stated), against the one-call kernel."""
    D, I, k = 256, 128, 3
    H = 2 * I if activation == "swiglu" else I
    experts = [(random_weight(fmt, H, D, seed=2 * j), random_weight(fmt, D, I, seed=2 * j + 1)) for j in range(k)]
    route = [0.5, 0.3, 0.2]
    x = torch.randn(1, D)
    y = native.moe_decode([gu for (gu, _), _ in experts], [dn for _, (dn, _) in experts], route, x, activation)
    want = torch.zeros(1, D, dtype=torch.float64)
    for r, ((_, W_gu), (_, W_dn)) in zip(route, experts):
        h = (seen(fmt, x) @ W_gu.T).float()  # the kernel keeps h in float32
        a = F.silu(h[:, :I]) * h[:, I:] if activation == "swiglu" else F.gelu(h)
        want += seen(fmt, r * a) @ W_dn.T
    assert rel(y, want) < 1e-5


@needs_kernels
def test_thread_count_does_not_change_a_bit():
    w, _ = random_weight("int4", 64, 512)
    x = torch.randn(2, 512)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.linear(w, x)
        torch.set_num_threads(2)
        assert torch.equal(native.linear(w, x), one)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_same_format_decides_one_call():
    a, _ = random_weight("int4", 32, 128)
    b, _ = random_weight("int4", 32, 128, G=64)
    c, _ = random_weight("int8", 32, 128)
    assert native.same_format([a, a]) and not native.same_format([a, b]) and not native.same_format([a, c])
    assert not native.same_format([a, None]) and not native.same_format([None])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H,G", [(8, 2), (4, 4), (16, 1)])
def test_decode_attention_is_softmax_attention_on_the_cache_in_place(dtype, H, G):
    """One query per row over a cache read in place (views of buffers longer than the filled part): the float64
    grouped-query attention of the same values; only the output's rounding to bfloat16 may differ."""
    B, L, Dh = 2, 37, 64
    q = torch.randn(B, H, 1, Dh).to(dtype)
    k_buf, v_buf = torch.randn(B, G, 64, Dh).to(dtype), torch.randn(B, G, 64, Dh).to(dtype)
    k, v = k_buf[:, :, :L], v_buf[:, :, :L]
    out = native.decode_attention(q, k, v, 0.3)
    rep = H // G
    scores = (q.double().view(B, G, rep, Dh) @ k.double().transpose(-1, -2)) * 0.3
    want = (torch.softmax(scores, -1) @ v.double()).view(B, H, 1, Dh)
    assert out.dtype == dtype and out.shape == (B, H, 1, Dh)
    assert rel(out, want) < (2**-8 if dtype == torch.bfloat16 else 1e-6)
    assert native.attention_supported(q, k, v)
    assert not native.attention_supported(q.double(), k.double(), v.double())  # float64: the torch path


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_and_rope_take_the_torch_arithmetic(dtype):
    """The decode-row kernels against the torch code they replace (run with autograd on, which keeps them out):
    RoPE bit for bit (same float32 operations per element, partial rotary too); RMSNorm up to the order of its
    sum of squares (one unit in the last place of the output's dtype)."""
    from moelab.model.norm import rms_norm
    from moelab.model.rope import apply_rope

    x = torch.randn(1, 6, 1, 64).to(dtype)
    w_heads = torch.randn(6, 1, 64).to(dtype)
    w_row = torch.randn(64).to(dtype)
    cos, sin = torch.randn(1, 64), torch.randn(1, 64)
    with torch.no_grad():
        fast = [rms_norm(x, w_heads, 1e-6), rms_norm(x, w_row, 1e-6), apply_rope(x, cos, sin),
                apply_rope(x, cos[:, :32].contiguous(), sin[:, :32].contiguous())]
    assert native.rms_norm_supported(x, w_heads) is False  # autograd is on here: the torch code below
    slow = [rms_norm(x, w_heads, 1e-6), rms_norm(x, w_row, 1e-6), apply_rope(x, cos, sin),
            apply_rope(x, cos[:, :32], sin[:, :32])]
    ulp = 2**-7 if dtype == torch.bfloat16 else 1e-6
    for a, b in zip(fast[:2], slow[:2]):
        torch.testing.assert_close(a, b, rtol=ulp, atol=1e-6)
    assert torch.equal(fast[2], slow[2]) and torch.equal(fast[3], slow[3])


@needs_kernels
@pytest.mark.parametrize("renorm,scale", [(True, 1.0), (False, 1.0), (True, 2.5)])
@pytest.mark.parametrize("D", [256, 200])  # 200: a row that ends inside a 16-lane block
def test_route_is_top_k_softmax_of_the_float64_logits(renorm, scale, D):
    """logits = x·Wᵀ; the k largest, best first; weights = softmax over the chosen (renorm) or the full softmax at
    the chosen, times scale — against float64 on logits far enough apart that rounding cannot reorder them."""
    E, k = 16, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, D, generator=g)
    W = torch.randn(E, D, generator=g)
    W += torch.arange(E, dtype=torch.float32)[torch.randperm(E, generator=g), None] * 0.5 * x / x.norm() ** 2
    z = x.double() @ W.double().T
    logits, idx, weight = native.route(x, W, k, renorm, scale)
    assert torch.allclose(logits.double(), z, rtol=1e-5, atol=1e-5)
    want_idx = z.topk(k).indices
    assert torch.equal(idx, want_idx)
    p = torch.softmax(z.gather(1, want_idx), -1) if renorm else torch.softmax(z, -1).gather(1, want_idx)
    assert torch.allclose(weight.double(), p * scale, rtol=1e-5, atol=1e-7)
    bf = native.route(x.bfloat16(), W, k, renorm, scale)  # a bfloat16 x is taken exactly
    assert all(torch.equal(a, b) for a, b in zip(bf, native.route(x.bfloat16().float(), W, k, renorm, scale)))


@needs_kernels
def test_route_breaks_ties_toward_the_lower_index():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    W[5], W[2] = W[0], W[0] * 2  # logits: 2 > 0 = 5
    x = W[0:1].clone()
    assert native.route(x, W, 3, True, 1.0)[1].tolist() == [[2, 0, 5]]


@needs_kernels
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_moe_block_is_norm_route_experts_and_residual(fmt):
    """out = x + Σⱼ wⱼ · FFN_idxⱼ(RMSNorm(x)), with idx, w the top-k softmax routing of RMSNorm(x) — against the
    float64 composition on what the kernel multiplies; the chosen experts are the float64 top-k."""
    D, I, E, k = 256, 128, 6, 2
    g = torch.Generator().manual_seed(1)
    experts = [(random_weight(fmt, 2 * I, D, seed=2 * e), random_weight(fmt, D, I, seed=2 * e + 1)) for e in range(E)]
    table = native.expert_table([gu for (gu, _), _ in experts], [dn for _, (dn, _) in experts])
    x, norm_w = torch.randn(1, 1, D, generator=g), torch.rand(D, generator=g) + 0.5
    router = torch.randn(E, D, generator=g)
    out, idx = native.moe_block(native.moe_args(norm_w, 1e-6, router, k, True, 1.0, table, "swiglu"), x)
    h = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w.double())[0]
    z = h @ router.double().T
    want_idx = z.topk(k).indices[0]
    assert torch.equal(idx, want_idx)
    y = torch.zeros(1, D, dtype=torch.float64)
    for r, e in zip(torch.softmax(z[0, want_idx], -1).tolist(), want_idx.tolist()):
        (_, W_gu), (_, W_dn) = experts[e]
        a = (seen(fmt, h.float()) @ W_gu.T).float()
        y += seen(fmt, r * (F.silu(a[:, :I]) * a[:, I:])) @ W_dn.T
    assert rel(out[0] - x[0], y) < 1e-4
    assert native.expert_table([experts[0][0][0], None], [experts[0][1][0]] * 2) is None
