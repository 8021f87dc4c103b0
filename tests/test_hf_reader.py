"""The pread-based safetensors reader against safetensors' own reader: every tensor and every row of a
stacked tensor, each dtype; and the named errors for files that are not safetensors."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moelab.hf.reader import Checkpoint, SafetensorsFile


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = {"w.bf16": torch.randn(5, 3, 4, generator=g).bfloat16(), "w.f32": torch.randn(7, 2, generator=g),
         "b.f16": torch.randn(9, generator=g).half(), "i.i64": torch.arange(6).view(2, 3),
         "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    b = {"other": torch.randn(3, 8, generator=g).double()}
    save_file(a, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    save_file(b, str(tmp_path / "b.safetensors"))
    return [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]


def test_every_tensor_and_row_equals_safe_open(files):
    with Checkpoint(files) as ckpt:
        assert sorted(ckpt.names()) == sorted(["w.bf16", "w.f32", "b.f16", "i.i64", "empty", "scalar", "other"])
        for path in files:
            with safe_open(str(path), "pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    expected = f.get_tensor(name)
                    got = ckpt.read(name)
                    assert got.dtype == expected.dtype and torch.equal(got, expected), name
                    for i in range(expected.shape[0] if expected.dim() else 0):
                        assert torch.equal(ckpt.read(name, i), expected[i]), (name, i)
        out = torch.empty(3, 4, dtype=torch.bfloat16)  # a row read into given memory
        assert ckpt.read("w.bf16", 2, out=out).data_ptr() == out.data_ptr()
        with safe_open(str(files[0]), "pt") as f:
            assert torch.equal(out, f.get_tensor("w.bf16")[2])


def test_a_tensor_in_two_files_is_named(files, tmp_path):
    save_file({"other": torch.zeros(1)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match="tensor 'other' is in both .*b.safetensors and .*c.safetensors"):
        Checkpoint([*files, tmp_path / "c.safetensors"])


def _header_file(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("case,why", [
    ("short", "shorter than the 8-byte header length"),
    ("huge", "header length .* exceeds the file"),
    ("not json", "header is not JSON"),
    ("list", "header is not a JSON object"),
    ("dtype", "tensor 'x': entry .* is not a known dtype"),
    ("offsets", r"tensor 'x': data_offsets \[0, 3\] do not hold F32 \[2\]"),
    ("beyond", "tensor 'x' ends at byte"),
])
def test_broken_files_are_named(tmp_path, case, why):
    path = tmp_path / "w.safetensors"
    if case == "short":
        path.write_bytes(b"\x01\x02")
    elif case == "huge":
        path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    elif case == "not json":
        path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    elif case == "list":
        _header_file(path, [1, 2])
    elif case == "dtype":
        _header_file(path, {"x": {"dtype": "Q3", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    elif case == "offsets":
        _header_file(path, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 3]}}, b"\0" * 8)
    else:
        _header_file(path, {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable safetensors file") + ".*" + why):
        SafetensorsFile(path)
