"""Building and loading moelab's CPU kernels: compiled on first use with the system C compiler into a cache keyed
by the source, the flags and the CPU, and loaded with ctypes."""

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

SOURCE = Path(__file__).parent / "cpu_kernels.c"


FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=c11")


CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")


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
def library() -> ctypes.CDLL | None:
    """The loaded kernels (compiled on first use), or None where they cannot be built here (`why_unavailable`)."""
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
    lib.moelab_decode_layers.argtypes = [ptr, i, ptr, ptr, ptr, i, ptr, i]
    lib.moelab_decode_rows.argtypes = [ptr, i, i, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i]
    return lib
