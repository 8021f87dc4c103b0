"""Products on moelab's kernels: a weight as the kernels read it (`NativeWeight`), x·Wᵀ (`linear`), a decode
step's k experts in one call (`moe_decode`), one token's top-k softmax routing (`route`), and `available`: the
kernels built here and checked against float64."""

from __future__ import annotations

import ctypes
import functools
import math
import warnings

import torch
from torch import Tensor

from moelab.inference.native import build
from moelab.inference.native.layout import quantize_activations, tile_int4

FORMATS = {"bf16": 0, "int8": 1, "int4": 2}
ACTIVATIONS = {"swiglu": 0, "gelu": 1}
BLOCK = 64  # K must be a multiple of it
IO_DTYPES = (torch.float32, torch.bfloat16)  # activations the kernels take and return


class _Weight(ctypes.Structure):
    _fields_ = [("fmt", ctypes.c_int32), ("n", ctypes.c_int32), ("k", ctypes.c_int32), ("g", ctypes.c_int32),
                ("q", ctypes.c_void_p), ("s", ctypes.c_void_p), ("z", ctypes.c_void_p)]














@functools.cache
def available() -> bool:
    """Whether the kernels are built and multiply correctly here (each format checked against float64)."""
    if build.library() is None:
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








class NativeWeight:
    """A weight as the kernels read it (`q`, `scale`, `zero` in the kernel's layout of format `fmt`): a
    descriptor over tensors that must outlive it (it keeps them)."""

    __slots__ = ("fmt", "tensors", "desc", "n", "k", "g")

    def __init__(self, fmt: str, q: Tensor, scale: Tensor | None = None, zero: Tensor | None = None,
                 group_size: int = 0) -> None:
        """ValueError naming the argument unless the tensors are the CPU tensors format `fmt` describes (module
        docstring of `moelab.inference.native`): bf16 q [N, K]; int8 q [N, K] + scale [N]; int4 q [N/16, K/32, 4, 16,
        4] uint8 + scale, zero [N/16, K/G, 16] with G = group_size in GROUP_SIZES; K a positive multiple of 64."""
        if not isinstance(fmt, str) or fmt not in FORMATS:
            _fail("fmt", fmt, f"one of {', '.join(map(repr, FORMATS))}")
        dtypes = {"bf16": (torch.bfloat16, None, None), "int8": (torch.int8, torch.bfloat16, None),
                  "int4": (torch.uint8, torch.bfloat16, torch.bfloat16)}[fmt]
        for name, t, dtype in zip(("q", "scale", "zero"), (q, scale, zero), dtypes):
            if dtype is None:
                if t is not None:
                    _fail(name, type(t).__name__, f"None for format {fmt!r}")
                continue
            _check_tensor(name, t, dtype)
        if fmt == "int4":
            if q.dim() != 5 or tuple(q.shape[2:]) != (4, 16, 4):
                _fail("q", tuple(q.shape), "[N/16, K/32, 4, 16, 4] (`tile_int4`) for int4")
            if not isinstance(group_size, int) or group_size not in GROUP_SIZES:
                _fail("group_size", group_size, f"one of {', '.join(map(str, GROUP_SIZES))} for int4")
        elif q.dim() != 2:
            _fail("q", tuple(q.shape), f"[N, K] for {fmt}")
        self.fmt = fmt
        self.n = q.shape[0] * (16 if fmt == "int4" else 1)
        self.k = q.shape[1] * 32 if fmt == "int4" else q.shape[1]
        if self.n < 1 or self.k < BLOCK or self.k % BLOCK:
            _fail("q", tuple(q.shape), f"N >= 1 rows and K a positive multiple of {BLOCK} columns")
        if fmt == "int8" and tuple(scale.shape) != (self.n,):
            _fail("scale", tuple(scale.shape), f"({self.n},): one per row")
        if fmt == "int4":
            if self.k % group_size:
                _fail("group_size", group_size, f"a divisor of K={self.k}")
            for name, t in (("scale", scale), ("zero", zero)):
                if tuple(t.shape) != (self.n // 16, self.k // group_size, 16):
                    _fail(name, tuple(t.shape), f"({self.n // 16}, {self.k // group_size}, 16)")
        self.g = group_size if fmt == "int4" else 0
        self.tensors = tuple(t.contiguous() for t in (q, scale, zero) if t is not None)
        ptrs = [t.data_ptr() for t in self.tensors] + [0] * (3 - len(self.tensors))
        self.desc = _Weight(FORMATS[fmt], self.n, self.k, group_size, *ptrs)

    def __reduce__(self):
        """Copied and pickled as its tensors (the C descriptor is rebuilt around the copies)."""
        return _native_weight, (self.fmt, self.tensors, self.g)


GROUP_SIZES = (32, 64, 128, 256)


def _fail(name: str, value, allowed: str):
    raise ValueError(f"moelab native: {name}={value!r} is not allowed: expected {allowed}")


def _check_tensor(name: str, t, dtype: torch.dtype | None = None, dims: int | None = None) -> None:
    """ValueError unless t is a CPU tensor (of `dtype`, with `dims` dimensions, when given)."""
    if not isinstance(t, Tensor):
        _fail(name, type(t).__name__, "a torch.Tensor")
    if t.device.type != "cpu":
        _fail(name, f"a tensor on {t.device}", "a CPU tensor")
    if dtype is not None and t.dtype != dtype:
        _fail(name, f"a {t.dtype} tensor", f"{dtype}")
    if dims is not None and t.dim() != dims:
        _fail(name, f"a tensor of shape {tuple(t.shape)}", f"{dims} dimensions")
    if not t.is_contiguous() and dtype in (torch.uint8, torch.int8):
        _fail(name, "a non-contiguous tensor", "a contiguous tensor")


def _check_number(name: str, v) -> None:
    """ValueError unless v is a finite real number (bool included: flags are numbers to C)."""
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(name, v, "a finite number")


def _check_weight(name: str, w) -> None:
    if not isinstance(w, NativeWeight):
        _fail(name, type(w).__name__, "a NativeWeight")


def _check_rows(name: str, x, k: int, rows: int | None = None) -> None:
    """ValueError unless x is a floating-point CPU tensor [M, k] (M == rows when given)."""
    _check_tensor(name, x, dims=2)
    if not x.is_floating_point() or x.dtype == torch.float64:
        _fail(name, f"a {x.dtype} tensor", "float32 or bfloat16 (float16 is converted)")
    if x.shape[1] != k or (rows is not None and x.shape[0] != rows):
        _fail(name, f"a tensor of shape {tuple(x.shape)}", f"[{rows if rows is not None else 'M'}, {k}]")


def _native_weight(fmt: str, tensors: tuple[Tensor, ...], group_size: int) -> NativeWeight:
    return NativeWeight(fmt, *tensors, group_size=group_size)


def supports(k: int, device: torch.device) -> bool:
    """Whether a weight with input width k on `device` can run on these kernels."""
    return device.type == "cpu" and k % BLOCK == 0 and k > 0 and available()


def same_format(weights: list[NativeWeight | None]) -> bool:
    """Whether `weights` can go through one `moe_decode` call as one side (all first or all second projections):
    all on these kernels, in one format, group size and shape."""
    if not isinstance(weights, (list, tuple)) or not weights or not isinstance(weights[0], NativeWeight):
        return False
    w0 = weights[0]
    return all(isinstance(w, NativeWeight) and (w.fmt, w.g, w.n, w.k) == (w0.fmt, w0.g, w0.n, w0.k) for w in weights)


def _io(x: Tensor) -> Tensor:
    """x as the kernels take it: float32 or bfloat16 (others converted to float32), contiguous."""
    return (x if x.dtype in IO_DTYPES else x.float()).contiguous()


def linear(w: NativeWeight, x_MK: Tensor) -> Tensor:
    """y [M, N] = x·Wᵀ, in x's dtype where it is float32 or bfloat16 (else float32). ValueError naming the
    argument for a w that is no NativeWeight or an x that is not a floating-point CPU tensor [M, K]."""
    _check_weight("w", w)
    _check_rows("x_MK", x_MK, w.k)
    x = _io(x_MK)
    if x.shape[0] == 0:
        return x.new_empty(0, w.n)
    y = torch.empty(x.shape[0], w.n, dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    if build.library().moelab_linear(ctypes.addressof(w.desc), x.data_ptr(), bf16, x.shape[0], y.data_ptr(), bf16,
                                torch.get_num_threads()):
        raise MemoryError("moelab native linear: out of memory for its activation buffers")
    return y


def moe_decode(gate_ups: list[NativeWeight], downs: list[NativeWeight], route: list[float], x_1D: Tensor,
               activation: str) -> Tensor:
    """y [1, D] = Σⱼ routeⱼ · downⱼ(act(gate_upⱼ(x))) for one token through k experts of one format, in x's dtype
    where it is float32 or bfloat16 (else float32)."""
    lists = (gate_ups, downs, route)
    if not all(isinstance(xs, (list, tuple)) for xs in lists) or not gate_ups or len({len(xs) for xs in lists}) != 1:
        _fail("gate_ups, downs, route", tuple(type(xs).__name__ for xs in lists), "lists of one equal length k >= 1")
    k = len(gate_ups)
    for i, (g, d) in enumerate(zip(gate_ups, downs)):
        _check_weight(f"gate_ups[{i}]", g)
        _check_weight(f"downs[{i}]", d)
    if not same_format(gate_ups) or not same_format(downs):
        _fail("gate_ups, downs", "mixed", "each list in one format, group size and shape")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        _fail("activation", activation, f"one of {', '.join(map(repr, ACTIVATIONS))}")
    I = downs[0].k
    if gate_ups[0].n != (2 * I if activation == "swiglu" else I) or downs[0].n != gate_ups[0].k:
        _fail("gate_ups, downs", (gate_ups[0].n, gate_ups[0].k, downs[0].n, downs[0].k),
              f"gate_up [{'2I' if activation == 'swiglu' else 'I'}, D] and down [D, I] of one expert")
    if not all(isinstance(r, (int, float)) and math.isfinite(r) for r in route):
        _fail("route", route, "k finite numbers")
    _check_rows("x_1D", x_1D, gate_ups[0].k, rows=1)
    x = _io(x_1D)
    y = torch.empty(1, downs[0].n, dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    gu = (ctypes.c_void_p * k)(*(ctypes.addressof(w.desc) for w in gate_ups))
    dn = (ctypes.c_void_p * k)(*(ctypes.addressof(w.desc) for w in downs))
    r = (ctypes.c_float * k)(*route)
    if build.library().moelab_moe_decode(gu, dn, k, r, x.data_ptr(), bf16, y.data_ptr(), bf16, ACTIVATIONS[activation],
                                    torch.get_num_threads()):
        raise MemoryError("moelab native moe_decode: out of memory for its activation buffers")
    return y






















def route(x_1D: Tensor, weight_ED: Tensor, k: int, renorm: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k softmax routing of one token (`cpu_kernels.c`, route_f32, states it): logits [1, E] float32
    = x·Wᵀ, the k largest [1, k] int64 in decreasing order (ties: the lower index), their weights [1, k] float32
    (softmax over the chosen logits when `renorm`, else the full softmax at the chosen; times `scale`)."""
    _check_tensor("weight_ED", weight_ED, torch.float32, dims=2)
    E, D = weight_ED.shape
    if not isinstance(k, int) or not 1 <= k <= E:
        _fail("k", k, f"an integer in [1, E={E}]")
    _check_number("scale", scale)
    _check_number("renorm", renorm)
    _check_rows("x_1D", x_1D, D, rows=1)
    x = _io(x_1D)
    logits, idx, weight = torch.empty(1, E), torch.empty(1, k, dtype=torch.int64), torch.empty(1, k)
    if build.library().moelab_route(x.data_ptr(), int(x.dtype == torch.bfloat16), weight_ED.data_ptr(), E, D, k,
                               int(renorm), scale, logits.data_ptr(), idx.data_ptr(), weight.data_ptr(),
                               torch.get_num_threads()):
        raise MemoryError("moelab native route: out of memory")
    return logits, idx, weight












