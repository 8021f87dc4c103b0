"""moelab's own CPU kernels for decode-time products (`cpu_kernels.c` beside this file), built on first use and
called through ctypes. They exist because torch's weight-only kernels read int8 and int4 weights well below the
machine's memory bandwidth at one activation row, and pay a fixed cost per call that a decode step pays hundreds
of times (docs/BENCHMARKS.md, "Decode"): here one call runs a whole MoE layer's k experts.

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
    build.py    compile, cache and load the library (`why_unavailable`)
    ops.py      NativeWeight, linear, moe_decode, route, `available` (a check against float64 on load)
    blocks.py   a whole attention or MoE block, or every layer of a step, in one call — for one row or for the B
                rows of a continuous batch (`decode_rows`, each row bit-identical to it alone) — (the engine's)
    layout.py   the int4 tile layout and the activation quantizer, in plain torch

Every entry checks what it hands to C first — formats, dtypes, devices, contiguity, shapes, group sizes,
K % 64, k <= E, the rotary width, list lengths — and raises ValueError naming the argument: a bad call never
reaches the C code (tests/test_native.py fuzzes every entry in a subprocess).
"""

from moelab.inference.native.blocks import (
    BlockArgs,
    ExpertTable,
    LayerTable,
    attention_args,
    attention_block,
    decode_layers,
    decode_rows,
    expert_table,
    moe_args,
    moe_block,
)
from moelab.inference.native.build import why_unavailable
from moelab.inference.native.layout import quantize_activations, tile_int4, untile_int4
from moelab.inference.native.ops import (
    ACTIVATIONS,
    BLOCK,
    FORMATS,
    IO_DTYPES,
    NativeWeight,
    available,
    linear,
    moe_decode,
    route,
    same_format,
    supports,
)

__all__ = ["ACTIVATIONS", "BLOCK", "FORMATS", "IO_DTYPES", "BlockArgs", "ExpertTable", "LayerTable", "NativeWeight",
           "attention_args", "attention_block", "available", "decode_layers", "decode_rows", "expert_table",
           "linear", "moe_args", "moe_block", "moe_decode", "quantize_activations", "route", "same_format", "supports",
           "tile_int4", "untile_int4", "why_unavailable"]
