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
    # seeded: an x whose GELU lands next to a bfloat16 rounding boundary makes the kernel's float32 GELU and F.gelu
    # round r·a one ulp apart there (seen at 1e-4 relative with an unseeded x)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(3))
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


FUZZ = r'''
import random, sys, torch
from moelab.inference import native

rng = random.Random(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
D, I, E, G, Dh = 128, 64, 4, 2, 32


def weight(fmt, N, K):
    if fmt == "bf16":
        return native.NativeWeight("bf16", torch.randn(N, K, generator=g).bfloat16())
    if fmt == "int8":
        return native.NativeWeight("int8", torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g),
                                   torch.rand(N, generator=g).bfloat16())
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
    s = torch.rand(N, K // 32, generator=g).bfloat16()
    return native.NativeWeight("int4", *native.tile_int4(codes, s, s), 32)


BAD_TENSORS = [None, 3, "x", torch.zeros(0), torch.zeros(5), torch.zeros(2, 3), torch.zeros(1, D, dtype=torch.float64),
               torch.zeros(1, D, dtype=torch.int64), torch.zeros(1, 1, D, device="meta"), torch.zeros(3, D + 1),
               torch.zeros(D, 1), torch.zeros(1, 2 * D)[:, ::2], torch.zeros(1, 1, 1, 1), torch.zeros(1, 64)]


def mutate(args):
    args = list(args)
    i = rng.randrange(len(args))
    choice = rng.random()
    if choice < 0.5:
        args[i] = rng.choice(BAD_TENSORS)
    elif choice < 0.7:
        args[i] = rng.choice([-1, 0, 10**9, 2**31, 1.5, None, "bf16", [], [None]])
    elif choice < 0.85 and isinstance(args[i], list):
        args[i] = args[i][:rng.randrange(len(args[i]))] + ([None] if rng.random() < 0.5 else [])
    else:
        args[i] = object()
    return args


wq = {f: weight(f, 3 * D, D) for f in ("bf16", "int8", "int4")}
gu = [weight("int8", 2 * I, D) for _ in range(E)]
dn = [weight("int8", D, I) for _ in range(E)]
norm = torch.ones(D).bfloat16()
attn = native.attention_args(norm, 1e-6, weight("bf16", (4 + 2 * G) * Dh, D), None, None, Dh,
                             weight("bf16", D, 4 * Dh), None, 4, G, Dh, None)
moe = native.moe_args(norm, 1e-6, torch.randn(E, D), 2, True, 1.0, native.expert_table(gu, dn), "swiglu")
table = native.LayerTable([(attn, moe)])
kb, vb = torch.zeros(1, G, 16, Dh).bfloat16(), torch.zeros(1, G, 16, Dh).bfloat16()
table.set_cache(0, kb, vb)
x = torch.randn(1, 1, D).bfloat16()
cos, sin = torch.ones(1, Dh), torch.zeros(1, Dh)
rows = native.LayerTable([(attn, moe)])
rows.set_cache(0, torch.zeros(2, G, 16, Dh).bfloat16(), torch.zeros(2, G, 16, Dh).bfloat16())
calls = {
    "NativeWeight": (lambda *a: native.NativeWeight(*a), ["int4", *native.tile_int4(
        torch.zeros(32, 128, dtype=torch.uint8), torch.ones(32, 4).bfloat16(), torch.ones(32, 4).bfloat16()), 32]),
    "linear": (native.linear, [wq["int4"], torch.randn(2, D)]),
    "moe_decode": (native.moe_decode, [gu[:2], dn[:2], [0.5, 0.5], torch.randn(1, D), "swiglu"]),
    "route": (native.route, [torch.randn(1, D), torch.randn(E, D), 2, True, 1.0]),
    "expert_table": (native.expert_table, [gu, dn]),
    "moe_args": (native.moe_args, [norm, 1e-6, torch.randn(E, D), 2, True, 1.0, native.expert_table(gu, dn),
                                   "swiglu"]),
    "moe_block": (native.moe_block, [moe, x]),
    "attention_block": (native.attention_block, [attn, x, cos, sin, kb, vb, 0]),
    "decode_layers": (native.decode_layers, [table, x, cos, sin, 0]),
    "decode_rows": (native.decode_rows, [rows, torch.randn(2, 1, D).bfloat16(), torch.ones(2, Dh), torch.zeros(2, Dh),
                                         torch.tensor([3, 3]), torch.tensor([2, 0]), torch.tensor([1, 0])]),
    "LayerTable": (lambda *a: native.LayerTable(*a), [[(attn, moe)]]),
    "attention_args": (native.attention_args, [norm, 1e-6, weight("bf16", (4 + 2 * G) * Dh, D), None,
                                               (torch.ones(Dh).bfloat16(), torch.ones(Dh).bfloat16(), 1e-6), Dh,
                                               weight("bf16", D, 4 * Dh), None, 4, G, Dh, None]),
}
raised = survived = 0
for name, (fn, good) in calls.items():
    fn(*good)  # the valid call runs
    for _ in range(int(sys.argv[2])):
        args = mutate(good)
        try:
            fn(*args)
        except ValueError:  # naming the argument: never a TypeError or AttributeError from deep inside
            raised += 1
        else:
            survived += 1  # a mutation that happened to stay valid (e.g. the same value) — it must compute
print(raised, survived)
'''


@needs_kernels
def test_malformed_calls_raise_and_never_crash(tmp_path):
    """Every public entry of the native layer called with randomly malformed arguments (wrong types, dtypes, shapes,
    devices, lengths, out-of-range integers), hundreds of times, in a subprocess: each call raises a Python
    exception or computes, and the process lives to print its count (a crash would kill it: SIGSEGV / SIGFPE)."""
    import subprocess
    import sys

    script = tmp_path / "fuzz.py"
    script.write_text(FUZZ)
    done = subprocess.run([sys.executable, str(script), "0", "40"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    raised, survived = map(int, done.stdout.split())
    assert raised + survived == 480 and raised >= 360, (raised, survived)


@needs_kernels
def test_the_reported_crashes_are_named_errors():
    """The calls that used to kill the interpreter or read past a tensor: int4 without a group size (SIGFPE), x of the
    wrong width (read past x), a float32 tensor described as bf16, lists of different lengths, k > E."""
    codes = torch.zeros(32, 128, dtype=torch.uint8)
    sz = torch.ones(32, 4).bfloat16()
    with pytest.raises(ValueError, match="group_size=0"):
        native.NativeWeight("int4", *native.tile_int4(codes, sz, sz))
    w = native.NativeWeight("int4", *native.tile_int4(codes, sz, sz), 32)
    with pytest.raises(ValueError, match=r"x_MK=.*\[M, 128\]"):
        native.linear(w, torch.randn(1, 64))
    with pytest.raises(ValueError, match="torch.bfloat16"):
        native.NativeWeight("bf16", torch.randn(32, 128))
    with pytest.raises(ValueError, match="one equal length"):
        native.moe_decode([w, w], [w], [1.0, 1.0], torch.randn(1, 128), "swiglu")
    with pytest.raises(ValueError, match=r"k=5 .*\[1, E=4\]"):
        native.route(torch.randn(1, 128), torch.randn(4, 128), 5, True, 1.0)
