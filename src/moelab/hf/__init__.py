"""Hugging Face interop: MoE checkpoints in (`load`), moelab models out (`save`), and run-directory converters.

    model = moelab.hf.load("path/to/Mixtral-dir")        # config.json + *.safetensors → MoETransformer
    moelab.hf.save(model, "out/", tokenizer_json=...)      # → a directory transformers.from_pretrained loads
    convert_from_hf(hf_dir, run_dir) / convert_to_hf(run_dir, hf_dir)   # `moelab convert`

Loading is lazy: the model is built without initialising its weights (on the meta device, then
`to_empty`), and each tensor is read with `safetensors.safe_open` one at a time and copied straight
into its place — per-expert tensors land in their slice of the stacked `experts.w_in` / `w_out` as
they arrive — so peak memory stays near one copy of the model plus one shard's mapped pages.
Architectures and their tensor tables live in `moelab.hf.adapters`; see docs/HF.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from moelab.config import ModelConfig
from moelab.hf.adapters import CHECKPOINT_ADAPTERS, Adapter, Entry, adapter_for, adapter_matching
from moelab.hf.convert import convert_from_hf, convert_to_hf
from moelab.hf.export import save
from moelab.hf_config import HFConfig, load_json
from moelab.model import MoETransformer, model_rope_tables

__all__ = ["load", "save", "convert_from_hf", "convert_to_hf", "read_hf_config", "CHECKPOINT_ADAPTERS",
           "adapter_matching"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_hf_config(path: str | Path) -> tuple[HFConfig, Adapter, ModelConfig]:
    """config.json of a Hugging Face model directory → (its reader, adapter, moelab ModelConfig)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: pass a Hugging Face model directory holding config.json")
    c = HFConfig(load_json(file), str(file))
    adapter = adapter_for(c)
    return c, adapter, adapter.config_from_hf(c)


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: from model.safetensors.index.json, or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = load_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: field 'weight_map' is missing or not an object")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (pickled .bin checkpoints are not read)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is listed in model.safetensors.index.json but does not exist")
    return files


def _empty_model(cfg: ModelConfig, dtype: torch.dtype) -> MoETransformer:
    """The model with uninitialised CPU storage (no random init, no pages touched until written)."""
    with torch.device("meta"):
        model = MoETransformer(cfg).to(dtype)
        for moe in model.moe_layers():  # the selection bias stays float32, as in DeepSeek-V3
            moe.router.register_buffer("bias", torch.zeros(cfg.moe.n_experts), persistent=True)
    model.to_empty(device="cpu")
    cos, sin = model_rope_tables(cfg)
    model.register_buffer("rope_cos", cos, persistent=False)
    model.register_buffer("rope_sin", sin, persistent=False)
    return model


def _place(dst: torch.Tensor, e: Entry, t: torch.Tensor) -> None:
    if e.perm is not None:
        t = t[list(e.perm)]
    if e.transpose is not None:
        t = t.transpose(*e.transpose)
    if e.scale != 1.0:
        t = t / e.scale
    (dst if e.index is None else dst[e.index]).copy_(t)


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    """Tensors a loader may skip: multi-token-prediction layers past num_hidden_layers (DeepSeek-V3), and
    rotary tables some exporters store."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= cfg.n_layers


def _load_tensor(f: Any, file: Path, name: str, by_name: dict[str, Entry], state: dict[str, torch.Tensor],
                 cfg: ModelConfig, model_type: str, pending: dict[tuple[str, str], dict[str, torch.Tensor]]
                 ) -> tuple[str, ...]:
    """Copy tensor `name` of the open safetensors file `f` into its place in `state` and return the
    canonical tensor names it fills, or skip it (return ()) when the loader may: `_ignorable`, or empty
    (transformers stores zero-width shared experts for n_shared_experts = 0). One of a pair of tensors
    (`Entry.pair`: MXFP4 blocks and scales) waits in `pending` for the other, then both are decoded
    into place. ValueError naming the tensor when it is unexpected or of the wrong shape."""
    shape = tuple(f.get_slice(name).get_shape())
    e = by_name.get(name)
    if e is None:
        if _ignorable(name, cfg) or 0 in shape:
            return ()
        hint = (" (quantized checkpoints are not supported; use a bf16/fp32 one)"
                if "scale" in name.rsplit(".", 1)[-1] else "")
        raise ValueError(f"{file.name}: unexpected tensor {name!r}: not part of a {model_type} model with this "
                         f"config.json{hint}")
    if shape != e.hf_shape:
        raise ValueError(f"{file.name}: tensor {name!r} has shape {shape}, but config.json implies {e.hf_shape} "
                         "(config and weights disagree)")
    t = f.get_tensor(name)
    if e.pair is not None:
        halves = pending.setdefault(e.pair, {})
        halves[name] = t
        if len(halves) < 2:
            return e.covers
        halves = pending.pop(e.pair)
        t = e.decode(*(halves[n] for n in e.pair), dtype=state[e.target].dtype)
    _place(state[e.target].data, e, t)
    return e.covers or (name,)


@torch.no_grad()
def load(path: str | Path, dtype: torch.dtype | str | None = None) -> MoETransformer:
    """A Hugging Face MoE checkpoint directory → MoETransformer (eval mode).

    Reads `config.json` and `model.safetensors` or the shards named in `model.safetensors.index.json`,
    tensor by tensor. dtype: of the moelab weights (default: the config's `dtype`/`torch_dtype`, else
    float32). Raises ValueError naming the field or tensor for an unsupported architecture or option,
    a missing or unexpected tensor, or a tensor whose shape disagrees with config.json.
    """
    path = Path(path)
    c, adapter, cfg = read_hf_config(path)
    if dtype is None:
        dtype = c.data.get("dtype") or c.data.get("torch_dtype") or "float32"
        dtype = dtype if dtype in _DTYPES else "float32"
    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    entries = adapter.entries(cfg, c)
    by_name = {e.hf_name: e for e in entries}
    model = _empty_model(cfg, dtype)
    state = model.state_dict(keep_vars=True)
    covered: set[str] = set()
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    covered.update(_load_tensor(f, file, name, by_name, state, cfg, adapter.model_type, pending))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    for pair, got in pending.items():
        raise ValueError(f"{path}: tensor {next(n for n in pair if n not in got)!r} is missing from the checkpoint "
                         f"(its pair {next(iter(got))!r} is there)")
    missing = [e.hf_name for e in entries if not e.covers and e.hf_name not in covered]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{path}: tensor(s) missing from the checkpoint: {', '.join(missing[:5])}{more}")
    targets = {e.target for e in entries}
    for name, t in state.items():
        if name not in targets:
            assert name.endswith("router.bias"), f"no Hugging Face tensor fills {name}"
            t.data.zero_()
    return model.eval()
