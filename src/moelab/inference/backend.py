"""Which kernel an inference weight runs on, decided in one place (`backend`): moelab's own
(`moelab.inference.native`), torch's CPU kernels (oneDNN's prepacked float, the weight-only int8 / int4 kernels),
or dequantize-then-matmul — each probed on this build and CPU, not assumed."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moelab.inference import native

INT4_N_MULTIPLE = 16  # torch's int4 packer's row block
KERNEL_DTYPE = torch.bfloat16  # activations and scales of the int8 / int4 kernels


def _probe(fn) -> bool:
    try:
        return bool(fn())
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


@functools.cache
def packed_float_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN prepacks and multiplies `dtype` weights on this CPU, matching F.linear on a probe."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.bfloat16, torch.float32):
        return False
    if dtype == torch.bfloat16 and not _probe(torch.ops.mkldnn._is_mkldnn_bf16_supported):
        return False
    w = torch.arange(48 * 32, dtype=dtype).view(48, 32) % 7 / 8
    x = torch.arange(64, dtype=dtype).view(2, 32) % 5 / 4
    return _probe(lambda: torch.equal(torch.ops.mkldnn._linear_pointwise(
        x, torch.ops.mkldnn._reorder_linear_weight(w, 1), None, "none", [], ""), F.linear(x, w)))


@functools.cache
def int8_kernel_available() -> bool:
    """Whether `aten._weight_int8pack_mm` runs on the CPU in bfloat16 (and multiplies correctly)."""
    q = (torch.arange(48 * 32) % 9 - 4).to(torch.int8).view(48, 32)
    x, s = torch.ones(1, 32, dtype=KERNEL_DTYPE), torch.full((48,), 0.5, dtype=KERNEL_DTYPE)
    return _probe(lambda: torch.equal(torch.ops.aten._weight_int8pack_mm(x, q, s), F.linear(x, q.to(x.dtype) * 0.5)))


@functools.cache
def int4_kernel_available() -> bool:
    """Whether torch's int4 CPU packer and kernel exist and multiply correctly."""
    q = (torch.arange(16 * 64) % 16).to(torch.int32).view(16, 64)
    sz = torch.stack([torch.ones(2, 16), torch.zeros(2, 16)], -1).to(KERNEL_DTYPE)

    def check() -> bool:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(64, dtype=KERNEL_DTYPE), packed, 32, sz)
        return torch.equal(y.t().float(), q.float() - 8)
    return _probe(check)


def int8_kernel_runs(K: int, device: torch.device) -> bool:
    """Whether torch's int8 kernel multiplies a weight of input width K on `device` (the CPU, K % 16 == 0)."""
    return device.type == "cpu" and K % 16 == 0 and int8_kernel_available()


def backend(quant: str | None, weight_shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> str:
    """Which kernel a [N, K] weight of format `quant` (float weights: of `dtype`) runs on for decode-sized inputs:
    "native" (moelab.inference.native), "torch" (torch's CPU kernels above; float: oneDNN prepacked), or "plain"
    (float: F.linear; int8 / int4: dequantize, then F.linear)."""
    N, K = weight_shape
    cpu = device.type == "cpu"
    if quant is None:
        if dtype == torch.bfloat16 and native.supports(K, device):
            return "native"
        return "torch" if cpu and packed_float_available(dtype) else "plain"
    if native.supports(K, device) and (quant == "int8" or N % INT4_N_MULTIPLE == 0):
        return "native"
    if quant == "int8":
        return "torch" if int8_kernel_runs(K, device) else "plain"
    return "torch" if cpu and int4_kernel_available() else "plain"
