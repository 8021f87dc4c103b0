"""moelab's own CPU kernels for decode-time products (`csrc/cpu_kernels.c`), built on first use and called through
ctypes. They exist because torch's weight-only kernels read int8 and int4 weights well below the machine's memory
bandwidth at one activation row, and pay a fixed cost per call that a decode step pays hundreds of times
(docs/BENCHMARKS.md, "Decode"): here one call runs a whole MoE layer's k experts.

    available()                                  # built and checked on this CPU (False: torch's kernels run)
    w = NativeWeight("int4", codes, scale, zero, group_size)  # views of a LinearWeight's tensors
    y = linear(w, x_MK)                          # x·Wᵀ, float32 [M, N]
    y = moe_decode(gate_ups, downs, route_k, x_1D, activation)  # Σⱼ rⱼ·downⱼ(act(gate_upⱼ(x))), [1, D]

Formats (the kernel's docstring states the arithmetic and layouts): "bf16" weights [N, K]; "int8" q [N, K] +
bfloat16 scale [N]; "int4" codes tiled by 16 rows (`tile_int4`, N % 16 == 0) + bfloat16 scale and zero.
For int8 and int4 weights the activations are quantized per block of 32 to int8 (as llama.cpp's Q8_0 × Q4_0 /
Q8_0 products) and the products run on AVX-512 VNNI; bf16 runs on AVX-512 BF16. Needs K % 64 == 0.

Built with the system C compiler (`cc -O3 -march=native -fopenmp`) into a cache directory
($MOELAB_CACHE, default ~/.cache/moelab), keyed by the source, the flags and the CPU; its OpenMP threads are
torch's own (same libgomp). Not available — and torch's kernels run instead — when the CPU lacks AVX-512
VNNI / BF16, no compiler is found, torch is not built with GNU OpenMP, the build or a check against a float64
reference fails, or MOELAB_NATIVE=0.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).parent / "cpu_kernels.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=c11")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")
FORMATS = {"bf16": 0, "int8": 1, "int4": 2}
ACTIVATIONS = {"swiglu": 0, "gelu": 1}
BLOCK = 64  # K must be a multiple of it
IO_DTYPES = (torch.float32, torch.bfloat16)  # activations the kernels take and return


class _Weight(ctypes.Structure):
    _fields_ = [("fmt", ctypes.c_int32), ("n", ctypes.c_int32), ("k", ctypes.c_int32), ("g", ctypes.c_int32),
                ("q", ctypes.c_void_p), ("s", ctypes.c_void_p), ("z", ctypes.c_void_p)]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    return Path(os.environ.get("MOELAB_CACHE") or Path.home() / ".cache" / "moelab")


def why_unavailable() -> str | None:
    """None when the kernels can be built here, else the reason they are not used."""
    if os.environ.get("MOELAB_NATIVE", "1") == "0":
        return "disabled by MOELAB_NATIVE=0"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"needs Linux on x86-64 (this is {platform.system()} on {platform.machine()})"
    missing = [f for f in CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if shutil.which(os.environ.get("CC", "cc")) is None:
        return "no C compiler (cc, or $CC) on PATH"
    if "GNU OpenMP" not in torch.__config__.parallel_info() and "libgomp" not in _torch_openmp():
        return "torch is not built with GNU OpenMP"
    return None


def _torch_openmp() -> str:
    lib = Path(torch.__file__).parent / "lib"
    return " ".join(p.name for p in lib.glob("libgomp*")) if lib.is_dir() else ""


def _build() -> Path:
    """The shared library for this source, flags and CPU, compiled (atomically) if not cached yet."""
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(FLAGS).encode() + " ".join(sorted(_cpu_flags())).encode()).hexdigest()[:16]
    out = _cache_dir() / f"cpu_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([os.environ.get("CC", "cc"), *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    if why_unavailable() is not None:
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        warnings.warn(f"moelab's CPU kernels could not be built ({detail.strip()[:500]}); torch's kernels run instead",
                      RuntimeWarning, stacklevel=2)
        return None
    ptr = ctypes.c_void_p
    i, ll = ctypes.c_int, ctypes.c_longlong
    lib.moelab_linear.argtypes = [ptr, ptr, i, i, ptr, i, i]
    lib.moelab_moe_decode.argtypes = [ptr, ptr, i, ptr, ptr, i, ptr, i, i, i]
    lib.moelab_rms_norm.argtypes = [ptr, ptr, ptr, i, i, i, i, ctypes.c_float]
    lib.moelab_rope.argtypes = [ptr, ptr, i, i, i, i, ptr, ptr]
    f = ctypes.c_float
    lib.moelab_attention_block.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ll, ll, i, i]
    lib.moelab_decode_attention.argtypes = [ptr, i, ptr, ptr, ptr, i, i, i, i, i, ll, ll, ll, ll, ll, ll, i,
                                            ctypes.c_float, i]
    lib.moelab_route.argtypes = [ptr, i, ptr, i, i, i, i, f, ptr, ptr, ptr, i]
    lib.moelab_moe_block.argtypes = [ptr, ptr, ptr, ptr, i]
    lib.moelab_decode_layers.argtypes = [ptr, i, ptr, ptr, ptr, i, i]
    return lib


@functools.cache
def available() -> bool:
    """Whether the kernels are built and multiply correctly here (each format checked against float64)."""
    if _library() is None:
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 128, generator=g)
    w = torch.randn(32, 128, generator=g)
    q8 = torch.randint(-127, 128, (32, 128), dtype=torch.int8, generator=g)
    s = torch.rand(32, generator=g).add_(0.5).to(torch.bfloat16)
    codes = torch.randint(0, 16, (32, 128), dtype=torch.uint8, generator=g)
    sz = torch.rand(32, 4, 2, generator=g).to(torch.bfloat16)
    cases = [
        (NativeWeight("bf16", w.bfloat16()), x.bfloat16().double() @ w.bfloat16().double().t()),
        (NativeWeight("int8", q8, s), quantize_activations(x) @ (q8.double() * s.double()[:, None]).t()),
        (NativeWeight("int4", *tile_int4(codes, sz[..., 0], sz[..., 1]), 32),
         quantize_activations(x) @ ((codes.double() - 8) * sz[..., 0].double().repeat_interleave(32, 1)
                                    + sz[..., 1].double().repeat_interleave(32, 1)).t()),
    ]
    bad = [nw.fmt for nw, ref in cases if not torch.allclose(linear(nw, x).double(), ref, rtol=1e-4, atol=1e-3)]
    if bad:
        warnings.warn(f"moelab's CPU kernels gave wrong {', '.join(bad)} products on this machine; torch's kernels "
                      "run instead", RuntimeWarning, stacklevel=2)
    return not bad


def quantize_activations(x_MK: Tensor) -> Tensor:
    """x̂ (float64) as the int8 / int4 kernels see x: per block of 32, sx = max|x| / 127, x̂ = round(x / sx)·sx,
    computed in float32 as the kernel does (the reference the tests compare the kernels against)."""
    xb = x_MK.float().reshape(*x_MK.shape[:-1], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), 0.0)  # a true division (127 / t is 127·(1/t))
    q = torch.round(xb * inv).clamp_(-127, 127)
    return (q.double() * (amax / 127.0).double()).reshape(x_MK.shape)


def tile_int4(codes_NK: Tensor, scale_NG: Tensor, zero_NG: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Codes 0..15 [N, K] and scale, zero [N, K/G] → the kernel's int4 layout (N % 16 == 0, K % 32 == 0):
    codes uint8 [N/16, K/32, 4, 16, 4], byte [t, b, j, r, i] = q[16t+r, 32b+4j+i] | q[16t+r, 32b+16+4j+i] << 4,
    so one 64-byte load holds 4 codes of each of 16 rows; scale, zero [N/16, K/G, 16]."""
    N, K = codes_NK.shape
    q = codes_NK.to(torch.uint8).view(N // 16, 16, K // 32, 2, 4, 4)
    packed = (q[:, :, :, 0] | q[:, :, :, 1] << 4).permute(0, 2, 3, 1, 4).contiguous()
    scale, zero = (t.reshape(N // 16, 16, -1).transpose(1, 2).contiguous() for t in (scale_NG, zero_NG))
    return packed, scale, zero


def untile_int4(packed: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The inverse of `tile_int4`: codes [N, K] uint8, scale and zero [N, K/G]."""
    T, nb = packed.shape[:2]
    b = packed.permute(0, 3, 1, 2, 4)  # [T, 16, K/32, 4, 4]
    codes = torch.stack([b & 15, b >> 4], dim=3).reshape(16 * T, 32 * nb)
    return codes, *(t.transpose(1, 2).reshape(16 * T, -1) for t in (scale, zero))


class NativeWeight:
    """A weight as the kernels read it (`q`, `scale`, `zero` in the kernel's layout of format `fmt`): a
    descriptor over tensors that must outlive it (it keeps them)."""

    __slots__ = ("fmt", "tensors", "desc", "n", "k", "g")

    def __init__(self, fmt: str, q: Tensor, scale: Tensor | None = None, zero: Tensor | None = None,
                 group_size: int = 0) -> None:
        self.fmt = fmt
        self.n = q.shape[0] * (16 if fmt == "int4" else 1)
        self.k = q.shape[1] * 32 if fmt == "int4" else q.shape[1]
        self.g = group_size
        self.tensors = tuple(t.contiguous() for t in (q, scale, zero) if t is not None)
        ptrs = [t.data_ptr() for t in self.tensors] + [0] * (3 - len(self.tensors))
        self.desc = _Weight(FORMATS[fmt], self.n, self.k, group_size, *ptrs)


def supports(k: int, device: torch.device) -> bool:
    """Whether a weight with input width k on `device` can run on these kernels."""
    return device.type == "cpu" and k % BLOCK == 0 and k > 0 and available()


def same_format(weights: list[NativeWeight | None]) -> bool:
    """Whether `weights` can go through one `moe_decode` call as one side (all first or all second projections):
    all on these kernels, in one format, group size and shape."""
    w0 = weights[0]
    return w0 is not None and all(w is not None and (w.fmt, w.g, w.n, w.k) == (w0.fmt, w0.g, w0.n, w0.k)
                                  for w in weights)


def _io(x: Tensor) -> Tensor:
    """x as the kernels take it: float32 or bfloat16 (others converted to float32), contiguous."""
    return (x if x.dtype in IO_DTYPES else x.float()).contiguous()


def linear(w: NativeWeight, x_MK: Tensor) -> Tensor:
    """y [M, N] = x·Wᵀ, in x's dtype where it is float32 or bfloat16 (else float32)."""
    x = _io(x_MK)
    y = torch.empty(x.shape[0], w.n, dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    if _library().moelab_linear(ctypes.addressof(w.desc), x.data_ptr(), bf16, x.shape[0], y.data_ptr(), bf16,
                                torch.get_num_threads()):
        raise MemoryError("moelab native linear: out of memory for its activation buffers")
    return y


def moe_decode(gate_ups: list[NativeWeight], downs: list[NativeWeight], route: list[float], x_1D: Tensor,
               activation: str) -> Tensor:
    """y [1, D] = Σⱼ routeⱼ · downⱼ(act(gate_upⱼ(x))) for one token through k experts of one format, in x's dtype
    where it is float32 or bfloat16 (else float32)."""
    k = len(gate_ups)
    x = _io(x_1D)
    y = torch.empty(1, downs[0].n, dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    gu = (ctypes.c_void_p * k)(*(ctypes.addressof(w.desc) for w in gate_ups))
    dn = (ctypes.c_void_p * k)(*(ctypes.addressof(w.desc) for w in downs))
    r = (ctypes.c_float * k)(*route)
    if _library().moelab_moe_decode(gu, dn, k, r, x.data_ptr(), bf16, y.data_ptr(), bf16, ACTIVATIONS[activation],
                                    torch.get_num_threads()):
        raise MemoryError("moelab native moe_decode: out of memory for its activation buffers")
    return y


def attention_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether `decode_attention` takes these: one query per row, kv in bfloat16 or float32 with unit stride along
    the head width, Dh % 16 == 0, at most 16 query heads per kv head, on the CPU."""
    H, G, Dh = q.shape[1], k.shape[1], q.shape[-1]
    return (q.device.type == "cpu" and q.shape[2] == 1 and k.dtype == v.dtype in IO_DTYPES
            and Dh % 16 == 0 and v.shape[-1] == Dh and k.stride(-1) == v.stride(-1) == 1 and H % G == 0
            and H // G <= 16 and available())


def decode_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """out [B, H, 1, Dh] (q's dtype) = softmax(scale · q·kᵀ)·v for one query per row, q [B, H, 1, Dh], k and v
    [B, G, L, Dh] (grouped-query; any strides over B, G, L: the cache is read in place), in float32."""
    B, H, _, Dh = q.shape
    G, L = k.shape[1], k.shape[2]
    qc = _io(q)
    out = torch.empty(B, H, 1, Dh, dtype=qc.dtype)
    if _library().moelab_decode_attention(qc.data_ptr(), int(qc.dtype == torch.bfloat16), k.data_ptr(), v.data_ptr(),
                                          out.data_ptr(), B, H, G, L, Dh, *k.stride()[:3], *v.stride()[:3],
                                          int(k.dtype == torch.bfloat16), scale, torch.get_num_threads()):
        raise MemoryError("moelab native decode_attention: out of memory for its score buffers")
    return out if out.dtype == q.dtype else out.to(q.dtype)


SMALL = 1 << 16  # elements up to which `rms_norm` / `rope` take a tensor (decode rows; larger ones stay in torch)


def rms_norm_supported(x: Tensor, weight: Tensor) -> bool:
    """Whether `rms_norm` takes these: a small contiguous CPU tensor outside autograd, weight of x's dtype (float32
    or bfloat16) shaped as x's trailing dimensions."""
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype == weight.dtype
            and x.dtype in IO_DTYPES and 0 < x.numel() <= SMALL and x.is_contiguous()
            and weight.is_contiguous() and weight.shape == x.shape[x.dim() - weight.dim():] and available())


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`moelab.model.norm.rms_norm` in one call (same roundings: normalised in float32, rounded to x's dtype, times
    the weight in it)."""
    y = torch.empty_like(x)
    dim = x.shape[-1]
    _library().moelab_rms_norm(x.data_ptr(), y.data_ptr(), weight.data_ptr(), int(x.dtype == torch.bfloat16),
                               x.numel() // dim, dim, weight.numel() // dim, eps)
    return y


def rope_supported(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether `rope` takes these: one position (cos, sin [1, r], float32), x small, contiguous, float32 or
    bfloat16, on the CPU outside autograd."""
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype in IO_DTYPES
            and x.shape[-2] == 1 and cos.shape[0] == 1 and cos.dtype == sin.dtype
            and cos.dtype in IO_DTYPES and 0 < x.numel() <= SMALL and x.is_contiguous()
            and available())


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`moelab.model.rope.apply_rope` at one position in one call (same arithmetic in float32; tables of a bfloat16
    model are bfloat16, which torch's code promotes exactly)."""
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    y = torch.empty_like(x)
    dh, r = x.shape[-1], cos.shape[-1]
    _library().moelab_rope(x.data_ptr(), y.data_ptr(), int(x.dtype == torch.bfloat16), x.numel() // dh, dh, r,
                           cos.data_ptr(), sin.data_ptr())
    return y


class _AttnArgs(ctypes.Structure):
    _fields_ = [*((n, ctypes.c_int32) for n in ("bf16", "H", "G", "Dh", "rot", "qk_full")),
                *((n, ctypes.c_float) for n in ("eps", "qk_eps", "scale")),
                *((n, ctypes.c_void_p) for n in ("norm_w", "qkv_bias", "q_w", "k_w", "o_bias", "wqkv", "wo"))]


class _MoEArgs(ctypes.Structure):
    _fields_ = [("bf16", ctypes.c_int32), ("E", ctypes.c_int32), ("k", ctypes.c_int32), ("renorm", ctypes.c_int32),
                ("activation", ctypes.c_int32), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("norm_w", ctypes.c_void_p), ("router_w", ctypes.c_void_p), ("gate_up", ctypes.c_void_p),
                ("down", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn", ctypes.c_void_p), ("moe", ctypes.c_void_p), ("kbuf", ctypes.c_void_p),
                ("vbuf", ctypes.c_void_p), ("sg", ctypes.c_longlong), ("sl", ctypes.c_longlong)]


def cached(owner: object, key: tuple, build):
    """owner's BlockArgs for `key`: build() on first use and whenever the key changes (one per owner)."""
    hit = owner.__dict__.get("_native_args")
    if hit is None or hit[0] != key:
        hit = (key, build())
        owner.__dict__["_native_args"] = hit
    return hit[1]


class BlockArgs:
    """The fixed arguments of one block's kernel call — a C structure of pointers into weights and tensors that
    it keeps alive — for activations of `dtype`. Not copied with a model (a copy's tensors live elsewhere)."""

    __slots__ = ("struct", "keep", "dtype")

    def __init__(self, struct: ctypes.Structure, keep: tuple, dtype: torch.dtype) -> None:
        self.struct, self.keep, self.dtype = struct, keep, dtype

    def __deepcopy__(self, memo: dict) -> None:
        return None


def attention_args(norm_weight: Tensor, eps: float, wqkv: NativeWeight, qkv_bias: Tensor | None,
                   qk_norms: tuple[Tensor, Tensor, float] | None, rotary_dim: int, wo: NativeWeight,
                   o_bias: Tensor | None, n_heads: int, n_kv: int, head_dim: int,
                   scale: float | None) -> BlockArgs | None:
    """`attention_block`'s fixed arguments for a grouped-query attention layer, or None where the kernel does not
    take them: the norms' weights and the biases must share one dtype (float32 or bfloat16) and be contiguous,
    head_dim % 16 == 0, at most 16 query heads per kv head, rotary_dim <= head_dim. q/k norms (q_w, k_w, eps)
    of width head_dim act per head; of width n_heads·head_dim and n_kv·head_dim, over all heads at once."""
    q_w, k_w, qk_eps = qk_norms if qk_norms is not None else (None, None, 0.0)
    full = q_w is not None and q_w.numel() == n_heads * head_dim and n_heads > 1
    if q_w is not None and (q_w.numel(), k_w.numel()) not in ((head_dim, head_dim),
                                                              (n_heads * head_dim, n_kv * head_dim)):
        return None
    dtype, D, nq, nqkv = norm_weight.dtype, wqkv.k, n_heads * head_dim, (n_heads + 2 * n_kv) * head_dim
    small = [t for t in (norm_weight, qkv_bias, q_w, k_w, o_bias) if t is not None]
    if (dtype not in IO_DTYPES or any(t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu"
                                      for t in small)
            or (norm_weight.numel(), wqkv.n, wo.k, wo.n) != (D, nqkv, nq, D)
            or (qkv_bias is not None and qkv_bias.numel() != nqkv) or (o_bias is not None and o_bias.numel() != D)
            or head_dim % 16 or n_heads % n_kv or n_heads // n_kv > 16 or rotary_dim > head_dim or not available()):
        return None
    struct = _AttnArgs(int(dtype == torch.bfloat16), n_heads, n_kv, head_dim, rotary_dim, int(full), eps, qk_eps,
                       head_dim ** -0.5 if scale is None else scale, *(_ptr(t) for t in (norm_weight, qkv_bias, q_w,
                                                                                         k_w, o_bias)),
                       ctypes.addressof(wqkv.desc), ctypes.addressof(wo.desc))
    return BlockArgs(struct, (*small, wqkv, wo), dtype)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _tables(cos: Tensor, sin: Tensor, rotary_dim: int) -> tuple[Tensor, Tensor]:
    if cos.shape != (1, rotary_dim) or sin.shape != cos.shape:
        raise ValueError(f"rotary tables of shape {tuple(cos.shape)}: one position of {rotary_dim} channels expected")
    return cos.float().contiguous(), sin.float().contiguous()


def attention_block(args: BlockArgs, x: Tensor, cos: Tensor, sin: Tensor, k_buf: Tensor, v_buf: Tensor,
                    L: int) -> Tensor:
    """x + attention(RMSNorm(x)) for one token x [1, 1, D] of args' dtype, appending its key and value at position
    L of the cache buffers [1, G, capacity, Dh] (`csrc/cpu_kernels.c`, moelab_attention_block, states the steps
    and roundings); cos, sin [1, rotary_dim]."""
    _check_token(args.dtype, x)
    _check_cache(args, k_buf, v_buf, L)
    cos, sin = _tables(cos, sin, args.struct.rot)
    out = torch.empty_like(x)
    if _library().moelab_attention_block(ctypes.addressof(args.struct), x.data_ptr(), out.data_ptr(), cos.data_ptr(),
                                         sin.data_ptr(), k_buf.data_ptr(), v_buf.data_ptr(), k_buf.stride(1),
                                         k_buf.stride(2), L, torch.get_num_threads()):
        raise MemoryError("moelab native attention_block: out of memory for its buffers")
    return out


def _check_token(dtype: torch.dtype, x: Tensor) -> None:
    if x.dtype != dtype or not x.is_contiguous() or x.numel() != x.shape[-1]:
        raise ValueError(f"a block kernel takes one contiguous token of {dtype}: got {x.dtype} {tuple(x.shape)}")


def _check_cache(args: BlockArgs, k_buf: Tensor, v_buf: Tensor, L: int) -> None:
    s = args.struct
    if (k_buf.dtype != args.dtype or v_buf.stride() != k_buf.stride() or k_buf.shape != v_buf.shape
            or k_buf.stride(-1) != 1 or k_buf.shape[0] != 1 or k_buf.shape[1] != s.G or k_buf.shape[-1] != s.Dh
            or not 0 <= L < k_buf.shape[2]):
        raise ValueError(f"the cache buffers must be [1, {s.G}, capacity > {L}, {s.Dh}] of {args.dtype}, one layout")


def route(x_1D: Tensor, weight_ED: Tensor, k: int, renorm: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k softmax routing of one token (`csrc/cpu_kernels.c`, route_f32, states it): logits [1, E] float32
    = x·Wᵀ, the k largest [1, k] int64 in decreasing order (ties: the lower index), their weights [1, k] float32
    (softmax over the chosen logits when `renorm`, else the full softmax at the chosen; times `scale`)."""
    x = _io(x_1D)
    E, D = weight_ED.shape
    logits, idx, weight = torch.empty(1, E), torch.empty(1, k, dtype=torch.int64), torch.empty(1, k)
    if _library().moelab_route(x.data_ptr(), int(x.dtype == torch.bfloat16), weight_ED.data_ptr(), E, D, k,
                               int(renorm), scale, logits.data_ptr(), idx.data_ptr(), weight.data_ptr(),
                               torch.get_num_threads()):
        raise MemoryError("moelab native route: out of memory")
    return logits, idx, weight


class ExpertTable:
    """The E experts of a layer as `moe_block` takes them: their first and second projections' descriptors (the
    NativeWeights must outlive the table; it keeps them)."""

    __slots__ = ("weights", "gate_up", "down", "n")

    def __init__(self, gate_ups: list[NativeWeight], downs: list[NativeWeight]) -> None:
        self.weights, self.n = (gate_ups, downs), len(gate_ups)
        self.gate_up = (ctypes.c_void_p * self.n)(*(ctypes.addressof(w.desc) for w in gate_ups))
        self.down = (ctypes.c_void_p * self.n)(*(ctypes.addressof(w.desc) for w in downs))


def expert_table(gate_ups: list[NativeWeight | None], downs: list[NativeWeight | None]) -> ExpertTable | None:
    """An ExpertTable of these experts, or None unless all run on these kernels in one format (`same_format`)."""
    return ExpertTable(gate_ups, downs) if same_format(gate_ups) and same_format(downs) else None


def moe_args(norm_weight: Tensor, eps: float, router_ED: Tensor, k: int, renorm: bool, scale: float,
             experts: ExpertTable, activation: str) -> BlockArgs | None:
    """`moe_block`'s fixed arguments for an MoE layer (router float32 [E, D], routed as `route`), or None where the
    kernel does not take them (the norm's weight float32 or bfloat16, contiguous, on the CPU)."""
    dtype = norm_weight.dtype
    if (dtype not in IO_DTYPES or not norm_weight.is_contiguous() or norm_weight.device.type != "cpu"
            or router_ED.dtype != torch.float32 or not router_ED.is_contiguous() or router_ED.shape[0] != experts.n
            or not norm_weight.numel() == experts.weights[0][0].k == experts.weights[1][0].n == router_ED.shape[1]
            or not available()):
        return None
    struct = _MoEArgs(int(dtype == torch.bfloat16), experts.n, k, int(renorm), ACTIVATIONS[activation], eps, scale,
                      norm_weight.data_ptr(), router_ED.data_ptr(), ctypes.addressof(experts.gate_up),
                      ctypes.addressof(experts.down))
    return BlockArgs(struct, (norm_weight, router_ED, experts), dtype)


def moe_block(args: BlockArgs, x: Tensor) -> tuple[Tensor, Tensor]:
    """x + MoE(RMSNorm(x)) for one token x [1, 1, D] of args' dtype, routed by `route` to k experts; (out, the
    chosen experts [k] int64). The steps and roundings: `csrc/cpu_kernels.c`, moelab_moe_block."""
    _check_token(args.dtype, x)
    out, idx = torch.empty_like(x), torch.empty(args.struct.k, dtype=torch.int64)
    if _library().moelab_moe_block(ctypes.addressof(args.struct), x.data_ptr(), out.data_ptr(), idx.data_ptr(),
                                   torch.get_num_threads()):
        raise MemoryError("moelab native moe_block: out of memory for its buffers")
    return out, idx


class LayerTable:
    """The layers `decode_layers` runs — each its attention and MoE blocks' arguments (one dtype) and its cache
    buffers, set by `set_cache` — as one C array, kept from step to step."""

    def __init__(self, blocks: list[tuple[BlockArgs, BlockArgs]]) -> None:
        first = blocks[0][0] if blocks else None
        if not blocks or any((a.dtype, m.dtype, a.struct.rot) != (first.dtype, first.dtype, first.struct.rot)
                             for a, m in blocks):
            raise ValueError("decode_layers: the attention and MoE blocks must take one dtype and one rotary width")
        self.blocks, self.dtype, self.rot, self.n = blocks, first.dtype, first.struct.rot, len(blocks)
        self.array = (_Layer * self.n)()
        for slot, (attn, moe) in zip(self.array, blocks):
            slot.attn, slot.moe = ctypes.addressof(attn.struct), ctypes.addressof(moe.struct)
        self.buffers: list[tuple[Tensor, Tensor] | None] = [None] * self.n
        self.capacity = 0

    def set_cache(self, i: int, k_buf: Tensor, v_buf: Tensor) -> None:
        """Layer i's keys and values go to k_buf, v_buf [1, G, capacity, Dh] (kept)."""
        if self.buffers[i] is not None and self.buffers[i][0] is k_buf and self.buffers[i][1] is v_buf:
            return
        _check_cache(self.blocks[i][0], k_buf, v_buf, 0)
        slot = self.array[i]
        slot.kbuf, slot.vbuf, slot.sg, slot.sl = k_buf.data_ptr(), v_buf.data_ptr(), k_buf.stride(1), k_buf.stride(2)
        self.buffers[i] = (k_buf, v_buf)
        self.capacity = min(b[0].shape[2] if b else 0 for b in self.buffers)


def decode_layers(table: LayerTable, x: Tensor, cos: Tensor, sin: Tensor, L: int) -> Tensor:
    """x after the table's layers — each `attention_block` then `moe_block` — for one token x [1, 1, D] at
    position L, in one call (`csrc/cpu_kernels.c`, moelab_decode_layers); each layer's key and value are
    appended at L (every layer's buffers must hold more than L positions)."""
    _check_token(table.dtype, x)
    if not 0 <= L < table.capacity:
        raise ValueError(f"decode_layers: position {L} is outside the cache buffers ({table.capacity} positions)")
    cos, sin = _tables(cos, sin, table.rot)
    out = x.clone()
    if _library().moelab_decode_layers(table.array, table.n, out.data_ptr(), cos.data_ptr(), sin.data_ptr(), L,
                                       torch.get_num_threads()):
        raise MemoryError("moelab native decode_layers: out of memory for its buffers")
    return out
