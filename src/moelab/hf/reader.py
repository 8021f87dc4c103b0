"""Reading a checkpoint's safetensors files tensor by tensor (or one row of a tensor), without mapping them.

The safetensors format (Hugging Face, https://huggingface.co/docs/safetensors): an 8-byte little-endian
header length N, a JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ...},
then the data; a tensor's row-major bytes lie at 8 + N + begin … 8 + N + end of the file.

Why not `safetensors.safe_open`: it maps the file, and every page a read touches stays in the process's
resident set (RssFile) until the file is closed — a whole shard while loading it, and in time the whole
checkpoint when experts are streamed from it during generation. `os.preadv` straight into the destination
tensor's memory goes through the page cache, which the operating system may reclaim and which is not part
of the process's resident set; it needs no intermediate copy, and is safe from several threads.
Row i of a tensor (dim 0: one expert of a stacked expert tensor) is a contiguous range, read alone.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# safetensors dtype names → torch dtypes (the float8 names only where torch has them)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    **{name: getattr(torch, attr) for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
       if hasattr(torch, attr)},
}
_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header (100 MB)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in its file: dtype, shape, absolute byte offset and byte length."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def row(self, i: int) -> TensorInfo:
        """Row i along dim 0 (e.g. expert i of a stacked [E, ...] tensor): a contiguous range."""
        row_bytes = self.nbytes // self.shape[0]
        return TensorInfo(self.dtype, self.shape[1:], self.offset + i * row_bytes, row_bytes)


class SafetensorsFile:
    """One safetensors file: its header parsed once, tensors read with `os.preadv` on a file kept open.

    ValueError "<path>: not a readable safetensors file (truncated or corrupt?): <why>" for a header that
    cannot be parsed, a dtype or shape that does not add up, or data beyond the end of the file."""

    def __init__(self, path: str | Path) -> None:
        self.path, self.fd = Path(path), -1
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            self.tensors = self._parse_header()
        except ValueError as why:
            self.close()
            raise ValueError(f"{self.path}: not a readable safetensors file (truncated or corrupt?): {why}") from None

    def _parse_header(self) -> dict[str, TensorInfo]:
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, 8, 0)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(os.pread(self.fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_start, tensors = 8 + n, {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (begin, end) = DTYPES[spec["dtype"]], tuple(spec["shape"]), spec["data_offsets"]
                valid = all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end))
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"tensor {name!r}: entry {spec!r} is not a known dtype, shape and data_offsets") \
                    from None
            nbytes = math.prod(shape) * dtype.itemsize
            if not valid or end - begin != nbytes:
                raise ValueError(f"tensor {name!r}: data_offsets {spec['data_offsets']} do not hold {spec['dtype']} "
                                 f"{list(shape)}")
            if data_start + end > size:
                raise ValueError(f"tensor {name!r} ends at byte {data_start + end}, beyond the file's {size}")
            tensors[name] = TensorInfo(dtype, shape, data_start + begin, nbytes)
        return tensors

    def read(self, info: TensorInfo, out: Tensor | None = None) -> Tensor:
        """The tensor `info` describes (of this file), read into `out` when given (contiguous, CPU, of its
        dtype and numel), else into a new tensor."""
        if out is None:
            out = torch.empty(info.shape, dtype=info.dtype)
        assert out.is_contiguous() and out.dtype == info.dtype and out.numel() * out.element_size() == info.nbytes
        if info.nbytes:
            buf, done = out.view(-1).view(torch.uint8).numpy(), 0
            while done < info.nbytes:
                got = os.preadv(self.fd, [buf[done:]], info.offset + done)
                if got <= 0:
                    raise ValueError(f"{self.path}: not a readable safetensors file (truncated or corrupt?): "
                                     f"reading {info.nbytes} bytes at {info.offset} stopped at {done}")
                done += got
        return out.view(info.shape)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


class Checkpoint:
    """The tensors of several safetensors files by name: `info(name)`, `read(name, row=None, out=None)`.
    A tensor present in two files is a ValueError naming both."""

    def __init__(self, files: list[Path]) -> None:
        self.files: list[SafetensorsFile] = []
        self.where: dict[str, SafetensorsFile] = {}
        try:
            for path in files:
                f = SafetensorsFile(path)
                self.files.append(f)
                for name in f.tensors:
                    if name in self.where:
                        raise ValueError(f"tensor {name!r} is in both {self.where[name].path} and {path}")
                    self.where[name] = f
        except BaseException:
            self.close()
            raise

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def info(self, name: str, row: int | None = None) -> TensorInfo:
        info = self.where[name].tensors[name]
        return info if row is None else info.row(row)

    def read(self, name: str, row: int | None = None, out: Tensor | None = None) -> Tensor:
        """Tensor `name` (or its row `row` along dim 0), into `out` when given."""
        return self.where[name].read(self.info(name, row), out)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
