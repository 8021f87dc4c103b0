"""Every kernel backend a product can run on, against float64 references written here from the quantized codes,
scales and zeros (never through moelab.inference.native): moelab's own kernels ("native"), torch's CPU kernels
("torch": `_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) and dequantize-then-matmul ("plain"), chosen the
way the library chooses (`moelab.inference.backend.backend`; a faster backend is switched off by making its probe
say "unavailable"), with a spy naming the kernel that ran. Shapes reach every branch: M = 1, M > 8 (torch's int8
kernel takes over) and M = 33 (two 32-row tiles), odd int4 tile counts (N = 16·odd), K with an odd number of
64-wide chunks, int4 with K % 64 != 0 (torch's kernel, whatever else is built). Also: decode attention on a row of
scores that are all ≈ −1e4 (with a padded key), bf16 rounding ties seeded on purpose, and the int8 quantizers'
scale max/127 exactly. Kernel-only tests skip, naming why, where the kernels are not built (MOELAB_NATIVE=0)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.inference import backend as backend_module
from moelab.inference import native
from moelab.inference.formats import linear_weight, load_linear_weight
from moelab.inference.quantized_experts import ExpertWeights, decode_experts
from moelab.model.attend import attend
from moelab.model.norm import rms_norm

needs_kernels = pytest.mark.skipif(not native.available(), reason=f"moelab's CPU kernels: {native.why_unavailable()}")
BACKENDS = ("native", "torch", "plain")


# -- references written here ------------------------------------------------------------------------------------

def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """x̂ (float64) as the native int8 / int4 products state they see x: per block of 32, in float32,
    inv = 127 / max|x| (a true division), codes round(x·inv) to nearest even, clamped to ±127; sx = max|x| / 127;
    x̂ = code · sx. An all-zero block stays zero."""
    M, K = x.shape
    xb = x.float().reshape(M, K // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.div(torch.full_like(amax, 127.0), amax), torch.zeros_like(amax))
    codes = torch.round(xb * inv).clamp(-127, 127)
    return (codes.double() * torch.div(amax, 127.0).double()).reshape(M, K)


def int8_weight(N: int, K: int, seed: int) -> tuple[dict, torch.Tensor]:
    """Stored int8 tensors (codes in [-127, 127], bf16 scales) and W = q · s [N, K] in float64."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s = (torch.rand(N, generator=g) / 64 + 1e-3).bfloat16()
    return {"qweight": q, "scale": s}, q.double() * s.double()[:, None]


def int4_weight(N: int, K: int, G: int, seed: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Stored int4 tensors — codes 0..15 packed two a byte (q[n, 2i] low nibble, q[n, 2i+1] high), scale_zero
    [K/G, N, 2] bf16 — and W [N, K] = (q − 8)·s + z per group of G in float64, and |q − 8|·s + |z − 8s| (the
    size of the terms the kernels sum, for their float32 rounding bound)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
    s = (torch.rand(N, K // G, generator=g) / 8 + 0.01).bfloat16()
    z = torch.randn(N, K // G, generator=g).bfloat16()
    S, Z = s.double().repeat_interleave(G, 1), z.double().repeat_interleave(G, 1)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    tensors = {"qweight": packed, "scale_zero": torch.stack([s.t(), z.t()], -1)}
    return tensors, (q.double() - 8) * S + Z, (q.double() - 8).abs() * S + (Z - 8 * S).abs()


def activations(M: int, K: int, seed: int) -> torch.Tensor:
    """x [M, K] float32 with blocks of 32 at different scales and, in row 0 (K >= 64), an all-zero block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.rand(M, K // 32, 1, generator=g).repeat_interleave(32, 1).view(M, K) * 4
    if K >= 64:
        x[0, 32:64] = 0
    return x


# -- forcing a backend and seeing which kernel ran --------------------------------------------------------------

def force(monkeypatch, which: str) -> None:
    """Make `backend` choose `which` for the weights built after this: the faster backends' probes say no."""
    if which == "native" and not native.available():
        pytest.skip(f"moelab's CPU kernels: {native.why_unavailable()}")
    if which == "torch" and not (backend_module.int8_kernel_available() and backend_module.int4_kernel_available()
                                 and backend_module.packed_float_available(torch.bfloat16)):
        pytest.skip("torch's int8 / int4 CPU kernels or oneDNN's bfloat16 product do not run in this build")
    if which in ("torch", "plain"):
        monkeypatch.setattr(native.ops, "available", lambda: False)
    if which == "plain":
        monkeypatch.setattr(backend_module, "int8_kernel_available", lambda: False)
        monkeypatch.setattr(backend_module, "int4_kernel_available", lambda: False)
        monkeypatch.setattr(backend_module, "packed_float_available", lambda dtype: False)


class _Op:
    """A stand-in for a torch op packet that counts its calls (`.default` too)."""

    def __init__(self, packet, name: str, log: list) -> None:
        self.packet, self.name, self.log = packet, name, log
        self.default = self

    def __call__(self, *args, **kwargs):
        self.log.append(self.name)
        return self.packet(*args, **kwargs)


@pytest.fixture
def ran(monkeypatch) -> list[str]:
    """The kernels products called, in order: "native", "native-moe", "torch-int8", "torch-int4", "torch-None"
    (oneDNN's prepacked float product), "plain" (F.linear)."""
    log: list[str] = []
    for ns, op, name in ((torch.ops.aten, "_weight_int8pack_mm", "torch-int8"),
                         (torch.ops.aten, "_weight_int4pack_mm_for_cpu", "torch-int4"),
                         (torch.ops.mkldnn, "_linear_pointwise", "torch-None")):
        monkeypatch.setattr(ns, op, _Op(getattr(ns, op), name, log))
    for module, attr, name in ((F, "linear", "plain"), (native, "linear", "native"),
                               (native, "moe_decode", "native-moe")):
        real = getattr(module, attr)
        monkeypatch.setattr(module, attr, lambda *a, real=real, name=name, **k: log.append(name) or real(*a, **k))
    return log


NATIVE_ROWS = {"int8": 8, None: 16}  # as documented (not read from formats.NATIVE_MAX_ROWS: that is under test)


def expected_kernel(which: str, quant: str | None, M: int) -> str:
    """The documented routing (inference/formats.py): on moelab's kernels int4 runs for every M, int8 up to 8 rows
    (then torch's int8 kernel), bf16 up to 16 (then F.linear); torch's kernels for every M; plain: F.linear on the
    dequantized weight."""
    if which == "plain":
        return "plain"
    if which == "native" and (quant == "int4" or NATIVE_ROWS[quant] >= M):
        return "native"
    return "plain" if which == "native" and quant is None else f"torch-{quant}"


def check(y: torch.Tensor, x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, kernel: str,
          quant: str | None = "int8") -> None:
    """y against the float64 product of what `kernel` multiplies, to float32 rounding of the K terms of size A and,
    where the output is bfloat16, its rounding (≤ 2⁻⁸ relative, bfloat16's unit roundoff). A bf16 weight, every
    kernel: bf16(x) · Wᵀ, output bf16. Quantized, moelab's kernels: x̂ (per-block int8) · Wᵀ in float32; torch's:
    bf16(x) · Wᵀ, output bf16; plain: x · Wᵀ in float32."""
    if quant is None:
        xb = x.bfloat16().double()
        want, slack, rel = xb @ W.T, xb.abs() @ A.T, 2**-8
    elif kernel == "native":
        want, slack, rel = q8_activations(x) @ W.T, q8_activations(x).abs() @ A.T, 0.0
    elif kernel.startswith("torch"):
        xb = x.bfloat16().double()
        want, slack, rel = xb @ W.T, xb.abs() @ A.T, 2**-8
    else:
        want, slack, rel = x.double() @ W.T, x.double().abs() @ A.T, 0.0
    assert y.dtype == x.dtype and y.shape == want.shape
    err = (y.double() - want).abs()
    bound = rel * want.abs() + 2e-6 * slack
    assert (err <= bound).all(), (kernel, (err - bound).max().item())


# 192: three 64-wide chunks (the unrolled pair, then one); int4 N = 48, 16, 80: 3, 1 and 5 tiles of 16 rows
SHAPES = [(None, 24, 192, 0), ("int8", 24, 192, 0), ("int8", 48, 256, 0),
          ("int4", 48, 192, 64), ("int4", 16, 256, 32), ("int4", 80, 128, 32)]


@pytest.mark.parametrize("M", [1, 9, 33])
@pytest.mark.parametrize("quant,N,K,G", SHAPES)
@pytest.mark.parametrize("which", BACKENDS)
def test_product_on_every_backend_is_the_float64_product(which, quant, N, K, G, M, monkeypatch, ran):
    force(monkeypatch, which)
    if quant is None:  # a bfloat16 weight: moelab's bf16 kernel rounds x to bfloat16 too
        W = torch.randn(N, K, generator=torch.Generator().manual_seed(N)).bfloat16()
        tensors, W, A = {"weight": W}, W.double(), [W.double().abs()]
    else:
        tensors, W, *A = int8_weight(N, K, seed=N + K) if quant == "int8" else int4_weight(N, K, G, seed=N + K)
    w = load_linear_weight(quant, tensors)
    assert w.backend == which
    x = activations(M, K, seed=M)
    ran.clear()
    y = w(x)
    kernel = expected_kernel(which, quant, M)
    assert ran == [kernel]
    check(y, x, W, A[0] if A else W.abs(), kernel, quant)


@pytest.mark.parametrize("K", [96, 160])
@pytest.mark.parametrize("M", [1, 9, 33])
def test_int4_with_k_not_a_multiple_of_64_runs_on_torchs_kernel(K, M, ran):
    """moelab's kernels need K % 64 == 0: such an int4 weight goes to torch's kernel whatever else is built (and
    its codes still read back exactly for saving)."""
    if not backend_module.int4_kernel_available():
        pytest.skip("torch's int4 CPU kernel does not run in this torch build")
    tensors, W, A = int4_weight(48, K, 32, seed=K)
    w = load_linear_weight("int4", tensors)
    assert w.backend == "torch" and w.native is None
    x = activations(M, K, seed=M)
    ran.clear()
    y = w(x)
    assert ran == ["torch-int4"]
    check(y, x, W, A, "torch-int4")
    assert torch.equal(w.tensors()["qweight"], tensors["qweight"])


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_expert_decode_on_every_backend(which, quant, activation, monkeypatch, ran):
    """y = Σⱼ rⱼ · downⱼ(act(gate_upⱼ(x))) for one token through 3 experts: one `moe_decode` call on moelab's
    kernels (its hidden layer kept in float32, then quantized per block of 32 as the input is), else each
    expert's products in turn — against float64 on the weights' codes."""
    force(monkeypatch, which)
    D, I = 128, 64
    H = 2 * I if activation == "swiglu" else I
    make = (lambda n, k, seed: int8_weight(n, k, seed)) if quant == "int8" else \
        (lambda n, k, seed: int4_weight(n, k, 32, seed)[:2])
    experts = [(make(H, D, 2 * j), make(D, I, 2 * j + 1)) for j in range(3)]
    chosen = [ExpertWeights(load_linear_weight(quant, gu), load_linear_weight(quant, dn), activation)
              for (gu, _), (dn, _) in experts]
    route = [0.5, 0.3, 0.2]
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(3))
    ran.clear()
    y = decode_experts(chosen, route, activation, x)
    seen = q8_activations if which == "native" else (lambda t: t.bfloat16().double()) if which == "torch" else \
        (lambda t: t.double())
    want = torch.zeros(1, D, dtype=torch.float64)
    for r, ((_, W_gu), (_, W_dn)) in zip(route, experts):
        h = seen(x) @ W_gu.T
        h = h.float() if which == "native" else h.bfloat16().float() if which == "torch" else h
        a = F.silu(h[:, :I]) * h[:, I:] if activation == "swiglu" else F.gelu(h)
        a = r * a if which == "native" else a  # moe_decode weights before the second product; the others after
        want += (seen(a) @ W_dn.T) * (1 if which == "native" else r)
    if which == "native":
        assert ran == ["native-moe"] and y.dtype == torch.float32  # one call for the k experts
    else:
        assert ran == [expected_kernel(which, quant, 1)] * 6
    rel = ((y.double() - want).norm() / want.norm()).item()
    assert rel < (1e-5 if which != "torch" else 3 * 2**-8), rel


# -- decode attention on a row of scores that are all ≈ −1e4 ----------------------------------------------------

def softmax_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                      sink: float | None = None) -> torch.Tensor:
    """Σ_j softmax_j(scale · q·k_j) · v_j in float64 over the given keys (with a sink: one more logit that
    attends to nothing), written out: exp(s − max) / Σ exp(s − max)."""
    s = scale * keys.double() @ q.double()
    z = s if sink is None else torch.cat([s, torch.tensor([sink], dtype=torch.float64)])
    e = (z - z.max()).exp()
    return (e[:len(s)] / e.sum()) @ values.double()


def minus_1e4_attention(rows: int):
    """An attention block whose every score is very negative, its float32 cache [rows, G, L + 3, Dh] and x
    [rows, 1, D]: RMSNorm(x) = 8·e₀ (mean(x²) = 1, eps 0), q_h = 8c_h·e₀, the new key k₀ = −624, cached keys
    k₀ = −624 − m/16 — scores −2c_h·(624 + m/16), ≈ −1e4 for c = 8, exact in float32 — two query heads per kv
    head, the output product the identity (out − x = the attention output, rounded to bf16 by that product); past
    the cache length a key that would win by 1e4 if it were read, then NaN. Returns the block's arguments, the
    cache, x, c, and the new key and value as the weights make them."""
    D, H, G, Dh, L = 64, 4, 2, 16, 6
    g = torch.Generator().manual_seed(0)
    wqkv = torch.zeros((H + 2 * G) * Dh, D)
    c = torch.tensor([8.0, 4.0, 8.0, 6.0])
    wqkv[torch.arange(H) * Dh, 0] = c
    wqkv[H * Dh + torch.arange(G) * Dh, 0] = -78.0
    wqkv[H * Dh:, 0] += torch.randn((2 * G) * Dh, generator=g).bfloat16().float() * (wqkv[H * Dh:, 0] == 0)
    args = native.attention_args(torch.ones(D), 0.0, native.NativeWeight("bf16", wqkv.bfloat16()), None, None, 0,
                                 native.NativeWeight("bf16", torch.eye(D).bfloat16()), None, H, G, Dh, None)
    assert args is not None
    kb, vb = torch.randn(rows, G, L + 3, Dh, generator=g), torch.randn(rows, G, L + 3, Dh, generator=g)
    m = torch.tensor([[3.0, -1.0, 0.5, 7.0, 2.0, 40.0], [0.0, 1.5, -2.0, 4.0, 0.25, 1.0]])
    kb[:, :, :L, 0] = -624 - m / 16
    kb[:, :, L + 1, 0], vb[:, :, L + 1] = 0.0, 1e3
    kb[:, :, L + 2], vb[:, :, L + 2] = float("nan"), float("nan")
    x = torch.zeros(rows, 1, D)
    x[:, 0, 0] = 8.0
    new_k, new_v = (8 * wqkv[H * Dh + i * G * Dh:H * Dh + (i + 1) * G * Dh, 0].view(G, Dh) for i in (0, 1))
    return args, kb, vb, x, c, new_k, new_v


def check_minus_1e4_row(out_D: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, c: torch.Tensor, first: int,
                        L: int) -> None:
    """One row's attention output (out − x, [D]) against the float64 softmax over cache positions first..L."""
    H, Dh = len(c), kb.shape[-1]
    want = torch.stack([softmax_attention(8 * c[h] * torch.eye(Dh)[0], kb[h // 2, first:L + 1],
                                          vb[h // 2, first:L + 1], Dh ** -0.5) for h in range(H)]).view(-1)
    got = out_D.double()
    assert torch.isfinite(got).all()
    assert ((got - want).abs() <= 2**-8 * want.abs() + 1e-6).all(), (got - want).abs().max()
    uniform = vb[:, first:L + 1].double().mean(1).repeat_interleave(2, 0).view(-1)  # not the mean of the values
    assert (want - uniform).abs().max() > 0.1


@needs_kernels
def test_native_decode_attention_on_scores_all_near_minus_1e4():
    """attention_block (one row) on `minus_1e4_attention`: the new key and value appended at L, and the output the
    float64 softmax over positions 0..L — not NaN, not uniform, nothing past L read."""
    args, kb, vb, x, c, new_k, new_v = minus_1e4_attention(1)
    L = 6
    out = native.attention_block(args, x, torch.ones(1, 0), torch.zeros(1, 0), kb, vb, L)
    assert torch.equal(kb[0, :, L], new_k) and torch.equal(vb[0, :, L], new_v)
    check_minus_1e4_row((out - x).view(-1), kb[0], vb[0], c, 0, L)


@needs_kernels
def test_native_batched_decode_on_scores_all_near_minus_1e4_with_a_padded_key():
    """decode_rows (two rows, one layer whose MoE experts are zero: the block adds nothing) on
    `minus_1e4_attention`: row 0's position 0 is padding and holds a key that would win by 1e4 if it counted;
    each row is the float64 softmax over the positions it may see (row 0: 1..L, row 1: 0..L)."""
    args, kb, vb, x, c, _, _ = minus_1e4_attention(2)
    L, D, I = 6, 64, 64
    kb[0, :, 0, 0], vb[0, :, 0] = 0.0, 1e3
    zero_gu, zero_dn = native.NativeWeight("bf16", torch.zeros(2 * I, D).bfloat16()), \
        native.NativeWeight("bf16", torch.zeros(D, I).bfloat16())
    moe = native.moe_args(torch.ones(D), 1e-6, torch.zeros(2, D), 1, True, 1.0,
                          native.expert_table([zero_gu] * 2, [zero_dn] * 2), "swiglu")
    table = native.LayerTable([(args, moe)])
    table.set_cache(0, kb, vb)
    out, _ = native.decode_rows(table, x, torch.ones(2, 0), torch.zeros(2, 0), torch.full((2,), L),
                                torch.tensor([1, 0]))
    for b in range(2):
        check_minus_1e4_row((out[b] - x[b]).view(-1), kb[b], vb[b], c, 1 - b, L)


@pytest.mark.parametrize("case", ["decode", "padded", "padded with sinks"])
def test_torch_decode_attention_on_scores_all_near_minus_1e4(case):
    """moelab.model.attend for one query over L keys whose scores are all ≈ −1e4 — through the decode product
    (no padding), the masked kernel (row 0's first key is padding, and would win by 1e4 if it counted; a mask
    of −1e4 rather than −inf would give it a share), and the sink softmax — against the float64 softmax over the
    keys each row may see."""
    B, H, G, Dh, L = 2, 4, 2, 16, 7
    g = torch.Generator().manual_seed(1)
    q = torch.zeros(B, H, 1, Dh)
    q[:, :, 0, 0] = torch.tensor([64.0, 64.5, 63.5, 64.25])
    k, v = torch.randn(B, G, L, Dh, generator=g), torch.randn(B, G, L, Dh, generator=g)
    k[..., 0] = -625 - torch.randint(-8, 9, (B, G, L), generator=g) / 16  # scores (q₀/4)·k₀ = −1e4·q₀/64 ± 10
    pad = torch.tensor([1, 0]) if case != "decode" else None
    if pad is not None:
        k[0, :, 0, 0] = 0.0  # the padded key: score 0
    sinks = torch.tensor([-9990.0, -10020.0, -1e4, -10005.0]) if case == "padded with sinks" else None
    out = attend(q, k, v, L - 1, None, None, sinks, pad)
    assert out.shape == (B, H, 1, Dh) and torch.isfinite(out).all()
    for b in range(B):
        first = 0 if pad is None else int(pad[b])
        for h in range(H):
            want = softmax_attention(q[b, h, 0], k[b, h // 2, first:], v[b, h // 2, first:], Dh ** -0.5,
                                     None if sinks is None else float(sinks[h]))
            torch.testing.assert_close(out[b, h, 0].double(), want, rtol=1e-5, atol=1e-6)


# -- bf16 rounding ties, seeded -----------------------------------------------------------------------------------

def bf16_ties(p: torch.Tensor) -> torch.Tensor:
    """Which float64 values lie exactly halfway between two neighbouring bfloat16 values (8 significant bits)."""
    m, _ = torch.frexp(p.double())  # p = m · 2^e, 0.5 <= |m| < 1: the 9th significant bit is the half
    frac = (m.abs() * 2**9) % 2
    return (frac == 1) & (p != 0)


def rms_norm_case() -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """x [32] bf16 (multiples of 1/8: Σx² exact) and eps such that mean(x²) + eps over 64 channels (x padded with
    32 zeros) is 1.5625 exactly, so r = 1/sqrt(1.5625) = fl(0.8) however it is computed; the weight w of each channel
    chosen among bf16 values of 2 to 4 significant bits so that w · bf16(x·r) is an exact bf16 tie where one
    makes it. Returns x, w, eps, the documented result bf16(w · bf16(x·r)) and the one without the intermediate
    rounding, bf16(w · x·r)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randint(-20, 21, (32,), generator=g) / 8
    x[x == 0] = 0.125
    x = x.bfloat16()
    ms = float((x.double() ** 2).sum() / 64)
    eps = 1.5625 - ms
    assert eps > 0 and torch.tensor(eps, dtype=torch.float32).item() == eps  # exact in float32 (a multiple of 2⁻¹²)
    n = x.float() * torch.div(torch.ones(1), torch.sqrt(torch.tensor([1.5625])))  # float32, as documented
    candidates = torch.tensor([0.75, 1.5, 1.25, 1.75, 1.125, 1.375, 1.625, 1.875])
    tie = bf16_ties(candidates[:, None].double() * n.bfloat16().double())  # [candidate, channel]
    w = torch.where(tie.any(0), candidates[tie.int().argmax(0)], 1.5).bfloat16()
    twice = (w.float() * n.bfloat16().float()).bfloat16()
    once = (w.float() * n).bfloat16()
    return x, w, eps, twice, once


def test_the_rms_norm_case_has_ties_and_tells_the_roundings_apart():
    x, w, eps, twice, once = rms_norm_case()
    n = (x.float() * torch.div(torch.ones(1), torch.sqrt(torch.tensor([1.5625])))).bfloat16()
    ties = bf16_ties(w.double() * n.double())
    assert ties.sum() >= 12  # seeded exact ties in the last product
    even = (twice.view(torch.int16) & 1) == 0  # ties go to the even neighbour (the last mantissa bit 0)
    assert even[ties].all()
    up = twice.double().abs() > (w.double() * n.double()).abs()
    assert up[ties].any() and (~up[ties]).any()  # ties rounded both up and down: nearest even, not half-up/down
    assert (twice != once).sum() >= 8  # the intermediate rounding changes some outputs


def test_torch_rms_norm_rounds_as_documented_in_bfloat16():
    x, w, eps, twice, _ = rms_norm_case()
    xx = torch.cat([x, torch.zeros(32, dtype=torch.bfloat16)])
    y = rms_norm(xx[None], torch.cat([w, w]), eps)[0]
    assert y.dtype == torch.bfloat16 and torch.equal(y[:32], twice)


@needs_kernels
def test_native_rms_norm_rounds_as_documented_in_bfloat16():
    """The bf16 attention block's RMSNorm, read out exactly: h = RMSNorm(x) (zero in channels 32..63 of x) is
    copied to v by a 0/1 weight, attended by the only key (weight exactly 1), and moved by a 0/1 output weight
    into channels 32..63, where out = 0 + h: every step exact in bfloat16."""
    x, w, eps, twice, _ = rms_norm_case()
    D, H, G, Dh = 64, 2, 1, 32
    wqkv = torch.zeros((H + 2 * G) * Dh, D)
    wqkv[(H + G) * Dh + torch.arange(32), torch.arange(32)] = 1.0  # v = h[:32]
    wo = torch.zeros(D, H * Dh)
    wo[32 + torch.arange(32), torch.arange(32)] = 1.0  # out[32:] += a[:32] (head 0's copy of v)
    norm_w = torch.cat([w, w])
    args = native.attention_args(norm_w, eps, native.NativeWeight("bf16", wqkv.bfloat16()), None, None, 0,
                                 native.NativeWeight("bf16", wo.bfloat16()), None, H, G, Dh, None)
    assert args is not None
    kb, vb = torch.zeros(1, G, 2, Dh, dtype=torch.bfloat16), torch.zeros(1, G, 2, Dh, dtype=torch.bfloat16)
    xx = torch.cat([x, torch.zeros(32, dtype=torch.bfloat16)]).view(1, 1, D)
    out = native.attention_block(args, xx, torch.ones(1, 0), torch.zeros(1, 0), kb, vb, 0)
    assert torch.equal(out[0, 0, :32], x)  # the residual: x + 0
    assert torch.equal(out[0, 0, 32:], twice)


@pytest.mark.parametrize("which", BACKENDS)
def test_bf16_products_round_ties_to_even_on_every_backend(which, monkeypatch):
    """A bf16 weight and x whose float32 products are exact and land halfway between two bfloat16 values: 1 + 2⁻⁸
    → 1 (down to even), 1 + 3·2⁻⁸ → 1 + 2⁻⁶ (up to even), their negatives, and 1 + 2⁻⁸ + 2⁻¹⁶ (no tie → 1 + 2⁻⁷):
    every float backend (moelab's bf16 kernel, oneDNN's prepacked product, F.linear) rounds to nearest even."""
    if which == "native" and not native.available():
        pytest.skip(f"moelab's CPU kernels: {native.why_unavailable()}")
    if which == "torch" and not backend_module.packed_float_available(torch.bfloat16):
        pytest.skip("oneDNN does not prepack bfloat16 weights on this CPU")
    if which != "native":
        monkeypatch.setattr(native.ops, "available", lambda: False)
    if which == "plain":
        monkeypatch.setattr(backend_module, "packed_float_available", lambda dtype: False)
    x = torch.zeros(1, 64)
    x[0, :3] = torch.tensor([1.0, 2**-8, 2**-16])
    W = torch.zeros(5, 64)
    W[:, 0] = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
    W[:, 1] = torch.tensor([1.0, 3.0, -1.0, -3.0, 1.0])
    W[:, 2] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    exact = (x.double() @ W.double().T)[0]
    assert bf16_ties(exact[:4]).all() and not bf16_ties(exact[4:]).any()
    w = linear_weight(W.bfloat16())
    assert w.backend == which
    y = w(x.bfloat16())
    want = torch.tensor([1.0, 1 + 2**-6, -1.0, -1 - 2**-6, 1 + 2**-7], dtype=torch.float64)
    assert y.dtype == torch.bfloat16 and torch.equal(y[0].double(), want), y


# -- the int8 quantizers: scale max/127, exactly ------------------------------------------------------------------

def test_native_activation_quantizer_is_max_over_127_per_block():
    """moelab.inference.native.quantize_activations (plain torch, the tests' statement of the kernels' rounding)
    equals the quantizer written here bit for bit — a scale of max/126 would not."""
    x = activations(5, 256, seed=7)
    assert torch.equal(native.quantize_activations(x), q8_activations(x))
    x = torch.zeros(1, 64)
    x[0, :4] = torch.tensor([1.27, -0.635, 0.005, 0.0])  # scale 0.01: codes 127, −63.5 → −64, 0.5 → 0, 0
    assert torch.allclose(q8_activations(x)[0, :4], torch.tensor([1.27, -0.64, 0.0, 0.0], dtype=torch.float64),
                          atol=1e-6)


@needs_kernels
def test_native_kernel_quantizes_activations_at_max_over_127():
    """An int8 weight q = I, s = 1 reads the kernel's quantized activations out: y = code · (max|x| / 127) exactly,
    each block's scale and codes as written here (a kernel at max/126 moves every element)."""
    K = 256
    eye = load_linear_weight("int8", {"qweight": torch.eye(K, dtype=torch.int8),
                                      "scale": torch.ones(K, dtype=torch.bfloat16)})
    assert eye.backend == "native"
    x = activations(3, K, seed=8)
    assert torch.equal(eye(x), q8_activations(x).float())
