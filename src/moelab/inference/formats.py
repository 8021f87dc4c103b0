"""Inference weight formats: weight-only int8 / int4 quantization and decode-packed float weights.

API (`moelab.inference` applies it to a whole model; experts in these formats: `moelab.inference.quantized_experts`):

    w = linear_weight(W_NK, quant=None | "int8" | "int4", group_size=32)  # LinearWeight; w(x_MK) = x·Wᵀ
    w.nbytes, w.dequantize(), w.tensors()                 # bytes read per use; W as float; the on-disk form
    w = load_linear_weight(quant, tensors)                # back from w.tensors(), without re-quantizing

Formats of one linear weight W [N, K] (nn.Linear layout):
- None ("float"): W in its own dtype. On the CPU, in bfloat16 or float32 where oneDNN takes it (detected,
  not assumed), W is prepacked once into oneDNN's blocked layout (`mkldnn._reorder_linear_weight`) and
  multiplied by oneDNN's inner product (`mkldnn._linear_pointwise`); elsewhere `F.linear`.
- "int8": per output channel, symmetric: s_n = max_k |W[n, k]| / 127 (rounded to bfloat16 first), q = round(W / s)
  in [-127, 127]; W ≈ q · s. CPU kernel `aten._weight_int8pack_mm` with bfloat16 activations (float32
  activations are an order of magnitude slower there; x is cast to bfloat16 and the result back).
- "int4": group-wise along K (group size G ∈ GROUP_SIZES), asymmetric: per (row, group) scale
  s = (max − min) / 15 and zero z = min + 8·s (both bfloat16), q = round((W − z) / s + 8) in [0, 15];
  W ≈ (q − 8)·s + z (torch's convention). CPU kernels `aten._convert_weight_to_int4pack_for_cpu` (packing at
  construction) + `aten._weight_int4pack_mm_for_cpu`, bfloat16 activations. Needs K % G == 0 and N % 16 == 0.
  Weight-only quantization with min/max groups as in GPTQ/AWQ-style int4 formats (Frantar et al. 2022, without the
  error correction; Lin et al. 2023, without the activation-aware scaling).
Kernels, chosen in one place (`backend`): on a CPU with AVX-512 VNNI / BF16, moelab's own kernels
(`moelab.inference.native`) run bfloat16, int8 and int4 weights for few rows of x — a decode step — with the activations
of
int8 / int4 products quantized per block of 32 to int8 (llama.cpp's Q8_0 activations); int4 runs on them for every
M (their tiled layout is the only one kept), bfloat16 and int8 hand larger M (prefill) to torch's kernels
(`NATIVE_MAX_ROWS`). Elsewhere torch's kernels above. Off the CPU, or where no kernel runs, a quantized weight is
dequantized to x's dtype and multiplied by `F.linear` on every call: correct everywhere, fast only on the CPU.

On disk (`tensors()`) the forms are portable, never a kernel's private layout: float `weight` [N, K];
int8 `qweight` int8 [N, K] + `scale` [N]; int4 `qweight` uint8 [N, K/2] (q[n, 2i] in the low nibble of byte
[n, i], q[n, 2i+1] in the high one) + `scale_zero` [K/G, N, 2] (scale, zero). They are packed at load.

Legend: N = output features, K = input features, M = rows of x, G = int4 group size, D = model width,
I = expert hidden width, H = width of the first expert projection (2I for SwiGLU), E = experts.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.inference import native
from moelab.inference.backend import INT4_N_MULTIPLE, KERNEL_DTYPE, backend, int8_kernel_runs

QUANTS = (None, "int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # the group sizes torch's int4 CPU kernel takes
NATIVE_MAX_ROWS = {None: 16, "int8": 8}  # rows of x up to which moelab's kernels beat torch's (int4: every M)


def check_quant(quant: str | None, group_size: int = 32) -> None:
    """ValueError naming the value when `quant` or `group_size` is not allowed."""
    if quant not in QUANTS:
        raise ValueError(f"quant={quant!r} is not supported: allowed None (float), 'int8', 'int4'")
    if quant == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not supported for int4: allowed "
                         f"{', '.join(map(str, GROUP_SIZES))}")














# ------------------------------------------------------------------------------------------ formats

class LinearWeight:
    """One linear weight W [N, K] in an inference format: `w(x)` = x·Wᵀ for x [M, K] → [M, N] in x's dtype."""

    quant: str | None = None

    def __init__(self, out_features: int, in_features: int) -> None:
        self.out_features, self.in_features = out_features, in_features

    def __call__(self, x_MK: Tensor) -> Tensor:
        raise NotImplementedError

    def add(self, x_MK: Tensor, y_MN: Tensor) -> Tensor:
        """y + x·Wᵀ (a new tensor; one fused product where the kernel has one)."""
        return self(x_MK).add_(y_MN)

    @property
    def nbytes(self) -> int:
        """Bytes of weight data one product reads."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W [N, K] as this format represents it, in `dtype`."""
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        """The portable on-disk form (module docstring); `load_linear_weight` reads it back."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.out_features}, {self.in_features})"


class FloatWeight(LinearWeight):
    """W in its own dtype: bfloat16 on moelab's kernels (and F.linear for many rows) where they run, else
    prepacked for oneDNN on the CPU where available, else F.linear."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__(*weight.shape)
        weight = weight.detach().contiguous()
        self.dtype = weight.dtype
        self.backend = backend(None, weight.shape, weight.dtype, weight.device)
        self.packed = self.backend == "torch"
        self.native = native.NativeWeight("bf16", weight) if self.backend == "native" else None
        self.w = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.packed else weight

    def __call__(self, x_MK: Tensor) -> Tensor:
        if x_MK.dtype != self.dtype:
            return self(x_MK.to(self.dtype)).to(x_MK.dtype)
        if self.native is not None and x_MK.shape[0] <= NATIVE_MAX_ROWS[None]:
            return _native(self.native, x_MK)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise.default(x_MK, self.w, None, "none", [], "")
        return F.linear(x_MK, self.w)

    def add(self, x_MK: Tensor, y_MN: Tensor) -> Tensor:
        if self.packed and x_MK.dtype == y_MN.dtype == self.dtype:
            return torch.ops.mkldnn._linear_pointwise.binary(x_MK, y_MN, self.w, None, "add")
        return super().add(x_MK, y_MN)

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * self.dtype.itemsize

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.w.to_dense() if self.packed else self.w).to(dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {"weight": self.dequantize(self.dtype)}


def aligned(t: Tensor) -> Tensor:
    """t, or a contiguous copy of it when t is not contiguous or its data does not start on a 64-byte boundary
    (a fresh CPU allocation does). torch 2.13's int8 CPU kernel reads out of bounds (a segmentation fault) on
    misaligned operands from 4 rows of x on, e.g. a slice of a stacked safetensors tensor."""
    return t if t.is_contiguous() and t.data_ptr() % 64 == 0 else t.clone(memory_format=torch.contiguous_format)


class Int8Weight(LinearWeight):
    """Per-output-channel int8: qweight int8 [N, K], scale [N] (bfloat16); W ≈ qweight · scale[:, None]. The CPU
    kernel runs where K % 16 == 0 (it fails on other widths from 4 rows of x on); other widths dequantize."""

    quant = "int8"

    def __init__(self, qweight: Tensor, scale: Tensor) -> None:
        super().__init__(*qweight.shape)
        self.q, self.scale = aligned(qweight), aligned(scale.to(KERNEL_DTYPE))
        self.backend = backend("int8", qweight.shape, KERNEL_DTYPE, qweight.device)
        self.native = native.NativeWeight("int8", self.q, self.scale) if self.backend == "native" else None
        self.kernel = int8_kernel_runs(self.in_features, qweight.device)  # torch's, for more rows than ours take

    @classmethod
    def quantize(cls, w: Tensor) -> Int8Weight:
        def rows(src: Tensor) -> tuple[Tensor, Tensor]:
            w = src.detach().float()
            scale = (w.abs().amax(dim=1).clamp_min(1e-12) / 127).to(KERNEL_DTYPE)
            w = w.clone() if w.data_ptr() == src.data_ptr() else w  # worked in place on a copy of its own
            return w.div_(scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale
        q, scale = _by_rows(rows, w)
        return cls(q, scale)

    def __call__(self, x_MK: Tensor) -> Tensor:
        if self.native is not None and (x_MK.shape[0] <= NATIVE_MAX_ROWS["int8"] or not self.kernel):
            return _native(self.native, x_MK)
        if not self.kernel:
            return F.linear(x_MK, self.dequantize(x_MK.dtype))
        if x_MK.dtype != KERNEL_DTYPE:
            return self(x_MK.to(KERNEL_DTYPE)).to(x_MK.dtype)
        return torch.ops.aten._weight_int8pack_mm.default(aligned(x_MK), self.q, self.scale)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.q.to(dtype) * self.scale.to(dtype)[:, None]

    def tensors(self) -> dict[str, Tensor]:
        return {"qweight": self.q, "scale": self.scale}


class Int4Weight(LinearWeight):
    """Group-wise int4: qweight uint8 [N, K/2] (two codes per byte, portable layout), scale_zero [K/G, N, 2]
    (bfloat16); W[n, k] ≈ (q[n, k] − 8)·scale[k // G, n] + zero[k // G, n]. Held in the layout of the kernel that
    runs it (`backend`): moelab's tiles, torch's pack, or the portable codes."""

    quant = "int4"

    def __init__(self, qweight: Tensor | None, scale_zero: Tensor, codes: Tensor | None = None) -> None:
        """From the portable `qweight` (or, instead, the unpacked `codes` [N, K], which spares a pack and unpack)."""
        N, K = (qweight.shape[0], 2 * qweight.shape[1]) if codes is None else codes.shape
        super().__init__(N, K)
        codes = unpack_nibbles(qweight) if codes is None else codes
        self.group_size = K // scale_zero.shape[0]
        _check_int4_shape(N, K, self.group_size)
        self.backend = backend("int4", (N, K), KERNEL_DTYPE, codes.device)
        self.kernel = self.backend == "torch"
        self.native = None
        scale_zero = scale_zero.to(KERNEL_DTYPE)
        if self.backend == "native":  # the portable codes are not kept: `codes` and `tensors` untile them
            self.w, s, z = native.tile_int4(codes, *scale_zero.transpose(0, 1).unbind(-1))
            self.native = native.NativeWeight("int4", self.w, s, z, self.group_size)
            self.scale_zero = None
        else:
            self.scale_zero = aligned(scale_zero)
            self.w = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
                      if self.kernel else pack_nibbles(codes))

    @classmethod
    def quantize(cls, w: Tensor, group_size: int) -> Int4Weight:
        N, K = w.shape
        _check_int4_shape(N, K, group_size)

        def rows(w: Tensor) -> tuple[Tensor, Tensor]:
            g = w.detach().float().reshape(w.shape[0], K // group_size, group_size)
            lo, hi = g.amin(-1), g.amax(-1)
            scale = ((hi - lo).clamp_min(1e-6) / 15).to(KERNEL_DTYPE).float()  # rounded first: q uses stored values
            zero = (lo + 8 * scale).to(KERNEL_DTYPE).float()
            g = g.clone() if g.data_ptr() == w.data_ptr() else g  # a float32 w: its own copy, worked in place
            q = g.sub_(zero[..., None]).div_(scale[..., None]).add_(8).round_().clamp_(0, 15).to(torch.uint8)
            return q.reshape(w.shape[0], K), torch.stack([scale, zero], -1)
        q, scale_zero = _by_rows(rows, w)
        return cls(None, scale_zero.transpose(0, 1), codes=q)

    def __call__(self, x_MK: Tensor) -> Tensor:
        if self.native is not None:
            return _native(self.native, x_MK)
        if not self.kernel:
            return F.linear(x_MK, self.dequantize(x_MK.dtype))
        if x_MK.dtype != KERNEL_DTYPE:
            return self(x_MK.to(KERNEL_DTYPE)).to(x_MK.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu.default(x_MK, self.w, self.group_size, self.scale_zero)

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features // 2 + self.out_features * (self.in_features // self.group_size) * 4

    def scales_zeros(self) -> Tensor:
        """scale_zero [K/G, N, 2] (bfloat16)."""
        if self.native is None:
            return self.scale_zero
        _, s, z = native.untile_int4(*self.native.tensors)
        return torch.stack([s, z], -1).transpose(0, 1)

    def codes(self) -> Tensor:
        """q [N, K] uint8 in 0..15."""
        if self.native is not None:
            return native.untile_int4(*self.native.tensors)[0]
        if not self.kernel:
            return unpack_nibbles(self.w)
        order = _int4_pack_order(self.out_features, self.in_features)
        q = torch.empty(self.out_features * self.in_features, dtype=torch.uint8)
        q[order] = unpack_nibbles(self.w.reshape(1, -1)).reshape(-1)
        return q.view(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        G = self.group_size
        scale, zero = (t.t().to(dtype).repeat_interleave(G, dim=1) for t in self.scales_zeros().unbind(-1))  # [N, K]
        return (self.codes().to(dtype) - 8) * scale + zero

    def tensors(self) -> dict[str, Tensor]:
        return {"qweight": pack_nibbles(self.codes()), "scale_zero": self.scales_zeros()}


QUANTIZE_ROWS = 4096  # rows quantized at once: bounds the float32 temporaries (a 32k-row head would need ~1 GB)


def _by_rows(fn, w: Tensor) -> tuple[Tensor, Tensor]:
    """fn applied to blocks of QUANTIZE_ROWS rows of w, its two outputs concatenated along the rows."""
    parts = [fn(block) for block in w.split(QUANTIZE_ROWS)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _native(w: native.NativeWeight, x_MK: Tensor) -> Tensor:
    y = native.linear(w, x_MK)
    return y if y.dtype == x_MK.dtype else y.to(x_MK.dtype)


def _check_int4_shape(N: int, K: int, group_size: int) -> None:
    check_quant("int4", group_size)
    if K % group_size:
        raise ValueError(f"int4 needs in_features divisible by group_size: got a [{N}, {K}] weight with "
                         f"group_size={group_size} (use a group size dividing {K}, or int8)")
    if N % INT4_N_MULTIPLE:
        raise ValueError(f"int4 needs out_features divisible by {INT4_N_MULTIPLE}: got a [{N}, {K}] weight "
                         "(use int8 for this model)")


def pack_nibbles(q_NK: Tensor) -> Tensor:
    """Codes 0..15 [N, K] (K even) → uint8 [N, K/2]: q[:, 2i] in the low nibble, q[:, 2i+1] in the high one."""
    q = q_NK.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(b_NJ: Tensor) -> Tensor:
    """The inverse of `pack_nibbles`: uint8 [N, J] → codes [N, 2J] (uint8)."""
    return torch.stack([b_NJ & 15, b_NJ >> 4], dim=-1).reshape(b_NJ.shape[0], -1)


@functools.lru_cache(maxsize=4)
def _int4_pack_order(N: int, K: int) -> Tensor:
    """order [N·K] int32: the flat index n·K + k of the weight whose code the CPU packer puts in nibble j of
    its output (low nibble of byte 0 first). The packer's layout is private to torch, so it is learned from
    the packer itself: pack the 4-bit digits of every element's flat index, one digit per call, and read
    them back (`codes` inverts the pack with it)."""
    flat = torch.arange(N * K, dtype=torch.int32).view(N, K)
    order = torch.zeros(N * K, dtype=torch.int32)
    for d in range(max(1, math.ceil(math.log2(N * K) / 4))):
        digit = (flat >> (4 * d)) & 15
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 2)
        order |= unpack_nibbles(packed.reshape(1, -1)).reshape(-1).to(torch.int32) << (4 * d)
    if not torch.equal(torch.sort(order).values, flat.view(-1)):
        raise RuntimeError(f"torch's int4 CPU pack of a [{N}, {K}] weight is not a permutation of its codes: "
                           "this torch version packs differently; its weights cannot be read back")
    return order.long()


FORMATS: dict[str | None, type[LinearWeight]] = {None: FloatWeight, "int8": Int8Weight, "int4": Int4Weight}


def linear_weight(w_NK: Tensor, quant: str | None = None, group_size: int = 32) -> LinearWeight:
    """W [N, K] (nn.Linear layout, floating point) in the format `quant` (module docstring). ValueError for an
    unsupported quant or group size, or a shape the format cannot take."""
    check_quant(quant, group_size)
    if w_NK.dim() != 2 or not w_NK.is_floating_point():
        raise ValueError(f"a linear weight must be a 2-D floating-point tensor [out, in]; got {w_NK.dtype} "
                         f"of shape {tuple(w_NK.shape)}")
    if quant == "int4":
        return Int4Weight.quantize(w_NK, group_size)
    return Int8Weight.quantize(w_NK) if quant == "int8" else FloatWeight(w_NK)


def load_linear_weight(quant: str | None, tensors: dict[str, Tensor]) -> LinearWeight:
    """A weight from its portable form (`LinearWeight.tensors()`), packed for this machine, not re-quantized."""
    check_quant(quant)
    names = {None: ("weight",), "int8": ("qweight", "scale"), "int4": ("qweight", "scale_zero")}[quant]
    if set(tensors) != set(names):
        raise ValueError(f"a {quant or 'float'} weight is stored as {', '.join(names)}; "
                         f"got {', '.join(sorted(tensors))}")
    q = tensors.get("qweight")
    if quant is not None and q.dim() == 2:  # the scales must fit the codes: [N] for int8, [K/G, N, 2] for int4
        N, K = q.shape[0], q.shape[1] * (2 if quant == "int4" else 1)
        sz = tensors.get("scale_zero")
        ok = (tensors["scale"].shape == (N,) if quant == "int8" else
              sz.dim() == 3 and sz.shape[1:] == (N, 2) and sz.shape[0] > 0 and K % sz.shape[0] == 0)
        if not ok:
            got = tuple((tensors.get("scale") if quant == "int8" else sz).shape)
            raise ValueError(f"an {quant} weight with qweight {tuple(q.shape)} has {names[1]} {got}: they do not fit "
                             f"(expected {'(N,)' if quant == 'int8' else '(K/G, N, 2)'}; a corrupt checkpoint?)")
    elif quant is not None:
        raise ValueError(f"an {quant} weight's qweight must be 2-D; got {tuple(q.shape)} (a corrupt checkpoint?)")
    return FORMATS[quant](*(tensors[n] for n in names))
