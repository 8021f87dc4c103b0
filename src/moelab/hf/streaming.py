"""Streaming a Hugging Face checkpoint into a model: every tensor once, straight into its place, and the
routed experts one at a time (`ExpertReader`) — at load for a quantized store, or on demand for a store
that streams them within a memory budget (`moelab.inference.offload`).

Memory: a tensor the model holds as stored (no transpose, permutation, scale or slice) is read straight
into the model's memory; any other is read into one scratch buffer that is reused — a stacked expert
tensor one expert at a time — so loading holds the model plus the largest single transformed tensor (one
expert). Reads go through `moelab.hf.reader` (`os.preadv`, no mapping of the files).

Legend: E = experts, D = model width, I = expert hidden width, H = 2I (gate rows, then up rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moelab.config.model import ModelConfig
from moelab.hf.adapters import Entry
from moelab.hf.reader import Checkpoint

Key = tuple[int, int]  # (layer, expert)


def is_routed_expert(e: Entry) -> bool:
    """Whether an entry fills a routed expert's weights (`experts.w_in` / `experts.w_out` of an MoE layer)."""
    return e.target.endswith((".experts.w_in", ".experts.w_out"))


def layer_of(e: Entry) -> int:
    return int(e.target.split(".")[1])  # "blocks.{i}.ffn.experts.w_in"


def ignorable(name: str, cfg: ModelConfig) -> bool:
    """Tensors a loader may skip: multi-token-prediction layers past num_hidden_layers (DeepSeek-V3), and
    rotary tables some exporters store."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= cfg.n_layers


def match_tensors(ckpt: Checkpoint, entries: list[Entry], cfg: ModelConfig, model_type: str) -> list[Entry]:
    """The entries of the tensors the checkpoint holds, after checking every one of its tensors: ValueError
    naming an unexpected tensor, one whose shape disagrees with config.json, or tensors missing. Tensors
    a loader may skip (`ignorable`, or empty: transformers' zero-width shared experts) are left out."""
    by_name = {e.hf_name: e for e in entries}
    found, covered = [], set()
    for name in ckpt.names():
        info, e = ckpt.info(name), by_name.get(name)
        file = ckpt.where[name].path.name
        if e is None:
            if ignorable(name, cfg) or 0 in info.shape:
                continue
            hint = (" (quantized checkpoints are not supported; use a bf16/fp32 one)"
                    if "scale" in name.rsplit(".", 1)[-1] else "")
            raise ValueError(f"{file}: unexpected tensor {name!r}: not part of a {model_type} model with this "
                             f"config.json{hint}")
        if info.shape != e.hf_shape:
            raise ValueError(f"{file}: tensor {name!r} has shape {info.shape}, but config.json implies {e.hf_shape} "
                             "(config and weights disagree)")
        found.append(e)
        covered.update(e.covers or (name,))
    names = {e.hf_name for e in found}
    for e in found:
        if e.pair is not None and not set(e.pair) <= names:
            raise ValueError(f"tensor {next(n for n in e.pair if n not in names)!r} is missing from the checkpoint "
                             f"(its pair {e.hf_name!r} is there)")
    missing = [e.hf_name for e in entries if not e.covers and e.hf_name not in covered]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"tensor(s) missing from the checkpoint: {', '.join(missing[:5])}{more}")
    return found


def _transform(t: Tensor, e: Entry, transpose: tuple[int, int] | None) -> Tensor:
    if e.perm is not None:
        t = t[list(e.perm)]
    if transpose is not None:
        t = t.transpose(*transpose)
    if e.scale != 1.0:
        t = t / e.scale
    return t


class Scratch:
    """One reusable byte buffer for reads that must be transformed before they land (grown, never shrunk)."""

    def __init__(self) -> None:
        self.buf = torch.empty(0, dtype=torch.uint8)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        n = dtype.itemsize
        for d in shape:
            n *= d
        if self.buf.numel() < n:
            self.buf = torch.empty(n, dtype=torch.uint8)
        return self.buf[:n].view(dtype).view(shape)


def stream_into(ckpt: Checkpoint, found: list[Entry], state: dict[str, Tensor],
                progress: Callable[[int], object] | None = None) -> None:
    """Read each entry's tensor into its place in `state` (a state dict, keep_vars): straight into the
    target when it lands unchanged, else through a reused scratch buffer, a stacked tensor row by row; the
    two tensors of a pair (`Entry.pair`) are decoded together once both are read. `progress(n)` is called
    with the bytes of each tensor read."""
    scratch = Scratch()
    pending: dict[tuple[str, str], dict[str, Tensor]] = {}
    for e in found:
        info = ckpt.info(e.hf_name)
        dst = state[e.target].data
        if e.index is not None:
            dst = dst[e.index]
        plain = e.perm is None and e.transpose is None and e.scale == 1.0
        if e.pair is not None:  # one of two tensors decoded together (MXFP4 blocks and scales)
            halves = pending.setdefault(e.pair, {})
            halves[e.hf_name] = ckpt.read(e.hf_name)
            if len(halves) == 2:
                halves = pending.pop(e.pair)
                dst.copy_(_transform(e.decode(*(halves[n] for n in e.pair), dtype=dst.dtype), e, e.transpose))
        elif plain and dst.is_contiguous() and dst.dtype == info.dtype:
            ckpt.read(e.hf_name, out=dst)
        elif e.perm is None and e.transpose is not None and 0 not in e.transpose and len(info.shape) > 2:
            inner = (e.transpose[0] - 1, e.transpose[1] - 1)  # a stacked tensor: one row (expert) at a time
            for i in range(info.shape[0]):
                t = ckpt.read(e.hf_name, i, out=scratch.take(info.shape[1:], info.dtype))
                dst[i].copy_(_transform(t, e, inner))
        else:
            t = ckpt.read(e.hf_name, out=scratch.take(info.shape, info.dtype))
            dst.copy_(_transform(t, e, e.transpose))
        if progress is not None:
            progress(info.nbytes)


@dataclass
class ExpertParts:
    """Where one routed expert lies in a checkpoint: the pieces of its w_in [H, D] (name, row of a stacked
    tensor or None, first and stop rows of w_in they fill) and of its w_out [D, I] (name, row or None),
    and the scale its w_out is stored multiplied by."""

    w_in: list[tuple[str, int | None, int, int]] = field(default_factory=list)
    w_out: tuple[str, int | None] | None = None
    scale: float = 1.0


def expert_parts(found: list[Entry], n_experts: int) -> dict[Key, ExpertParts]:
    """(layer, expert) → its `ExpertParts`, from the routed-expert entries the checkpoint holds (per-expert
    tensors — gate [I, D], up [I, D], down [D, I] — or transformers 5's stacked gate_up_proj [E, H, D] and
    down_proj [E, D, I]: in both, expert e's rows are contiguous)."""
    parts: dict[Key, ExpertParts] = {}
    for e in found:
        if not is_routed_expert(e):
            continue
        layer = layer_of(e)
        experts = range(n_experts) if e.index is None else [e.index[0]]
        for x in experts:
            p = parts.setdefault((layer, x), ExpertParts())
            row = x if e.index is None else None
            if e.target.endswith("w_in"):
                first, stop = (0, e.hf_shape[1]) if e.index is None else (e.index[2].start, e.index[2].stop)
                p.w_in.append((e.hf_name, row, first, stop))
            else:
                p.w_out, p.scale = (e.hf_name, row), e.scale
    return parts


class ExpertReader:
    """Reads one routed expert from a checkpoint: `read(key)` → (w_in [H, D], w_out [D, I], bytes read), new
    tensors in `dtype`, w_out divided by its stored scale."""

    def __init__(self, ckpt: Checkpoint, parts: dict[Key, ExpertParts], dtype: torch.dtype) -> None:
        self.ckpt, self.parts, self.dtype = ckpt, parts, dtype
        some = next(iter(parts.values()))
        name, row = some.w_out
        self.D, self.I = ckpt.info(name, row).shape
        self.H = max(stop for _, _, _, stop in some.w_in)
        self.src_dtype = ckpt.info(name, row).dtype

    @property
    def nbytes(self) -> int:
        """Bytes of one expert as stored."""
        return (self.H + self.I) * self.D * self.src_dtype.itemsize

    def read(self, key: Key) -> tuple[Tensor, Tensor, int]:
        p = self.parts[key]
        w_in = torch.empty(self.H, self.D, dtype=self.src_dtype)
        for name, row, first, stop in p.w_in:
            self.ckpt.read(name, row, out=w_in[first:stop])
        w_out = self.ckpt.read(*p.w_out, out=torch.empty(self.D, self.I, dtype=self.src_dtype))
        if p.scale != 1.0:
            w_out = w_out / p.scale  # as the in-memory load divides (`stream_into`): the same rounding
        return w_in.to(self.dtype), w_out.to(self.dtype), self.nbytes
