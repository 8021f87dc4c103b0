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

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moelab.config import ModelConfig, TrainConfig
from moelab.hf.adapters import CHECKPOINT_ADAPTERS, Adapter, Entry, adapter_for, adapter_matching
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


def _extract(src: torch.Tensor, e: Entry) -> torch.Tensor:
    t = src if e.index is None else src[e.index]
    if e.transpose is not None:
        t = t.transpose(*e.transpose)
    if e.perm is not None:
        t = t[torch.argsort(torch.tensor(e.perm))]
    if e.scale != 1.0:
        t = t * e.scale
    return t.detach().to("cpu").contiguous().clone()


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    """Tensors a loader may skip: multi-token-prediction layers past num_hidden_layers (DeepSeek-V3), and
    rotary tables some exporters store."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= cfg.n_layers


def _load_tensor(f: Any, file: Path, name: str, by_name: dict[str, Entry], state: dict[str, torch.Tensor],
                 cfg: ModelConfig, model_type: str) -> tuple[str, ...]:
    """Copy tensor `name` of the open safetensors file `f` into its place in `state` and return the
    canonical tensor names it fills, or skip it (return ()) when the loader may: `_ignorable`, or empty
    (transformers stores zero-width shared experts for n_shared_experts = 0). ValueError naming the
    tensor when it is unexpected or of the wrong shape."""
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
    _place(state[e.target].data, e, f.get_tensor(name))
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
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    covered.update(_load_tensor(f, file, name, by_name, state, cfg, adapter.model_type))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None
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


def save(model: MoETransformer, out: str | Path, tokenizer_json: str | Path | None = None,
         max_shard_bytes: int = 2 << 30) -> Path:
    """Write `model` as a Hugging Face checkpoint directory that `AutoModelForCausalLM.from_pretrained` loads.

    The architecture is the one the model's config matches (ValueError listing, per architecture, why
    none does). Weights are written per expert (the layout of published checkpoints) in float32 (or the
    model's dtype) as safetensors, sharded with an index above `max_shard_bytes`; `tokenizer_json` is copied
    to `out/tokenizer.json`. When that tokenizer has moelab's end-of-text token, it becomes `eos_token_id`
    (where `moelab generate` stops) and `tokenizer_config.json` names it; bos/pad ids are null, never the
    architecture's defaults (which would be ordinary tokens of a moelab vocabulary).
    """
    cfg = model.cfg
    adapter = adapter_matching(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # weights of an earlier save would be read with the new config
    hf_cfg = adapter.config_to_hf(cfg)
    eos = _end_of_text(tokenizer_json)
    hf_cfg |= {"bos_token_id": None, "eos_token_id": None if eos is None else eos[1], "pad_token_id": None}
    dtype = next(model.parameters()).dtype
    hf_cfg["dtype"] = str(dtype).removeprefix("torch.")
    state = model.state_dict()
    entries = [e for e in adapter.entries(cfg) if not e.covers]
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        n = state[e.target].element_size()
        for d in e.hf_shape:
            n *= d
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for shard, fname in zip(shards, names, strict=True):
        tensors = {e.hf_name: _extract(state[e.target], e) for e in shard}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        del tensors
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, out / "tokenizer.json")
        (out / "tokenizer_config.json").unlink(missing_ok=True)  # an earlier one would describe another tokenizer
        if eos is not None:
            (out / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos[0],
                 "model_max_length": cfg.max_seq_len}, indent=2) + "\n")
    return out


def _end_of_text(tokenizer_json: str | Path | None) -> tuple[str, int] | None:
    """(token, id) of moelab's end-of-text special token in a tokenizer.json, or None."""
    from moelab.data import END_OF_TEXT

    if tokenizer_json is None:
        return None
    added = json.loads(Path(tokenizer_json).read_text()).get("added_tokens") or []
    return next(((t["content"], t["id"]) for t in added if t.get("content") == END_OF_TEXT and t.get("special")), None)


def convert_from_hf(hf_dir: str | Path, out_run_dir: str | Path, dtype: torch.dtype | str | None = None) -> Path:
    """A Hugging Face checkpoint → a moelab run directory (`moelab generate` / `moelab card` read it).

    Writes `config.json` ({"model": ..., "train": defaults}), a step-0 checkpoint (moelab.checkpoint:
    safetensors + JSON, sha256 manifest) and copies `tokenizer.json` when the source has one.
    """
    from moelab import checkpoint as ckpt_io

    hf_dir, run = Path(hf_dir), Path(out_run_dir)
    if run.exists() and any(run.iterdir()):
        raise FileExistsError(f"{run} exists and is not empty; choose another output directory — nothing was written")
    model = load(hf_dir, dtype)
    config = {"model": model.cfg.to_dict(), "train": TrainConfig().to_dict()}
    run.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(model.parameters())  # no state until a step: nothing allocated
    ckpt_io.save_checkpoint(run, 0, model=model, optimizer=optimizer, config=config,
                            trainer={"train_tokens": 0, "train_seconds": 0.0, "converted_from": str(hf_dir)},
                            rng={"torch": torch.get_rng_state(), "data": torch.Generator().get_state()})
    (run / "config.json").write_text(json.dumps(config, indent=2))
    if (hf_dir / "tokenizer.json").is_file():
        shutil.copyfile(hf_dir / "tokenizer.json", run / "tokenizer.json")
    return run


def convert_to_hf(run_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 2 << 30) -> Path:
    """A moelab run (its newest checkpoint) or checkpoint directory → a Hugging Face model directory."""
    from moelab.train import load_run

    model, _ = load_run(run_dir)
    tok = Path(run_dir) / "tokenizer.json"
    return save(model, out_dir, tokenizer_json=tok if tok.is_file() else None, max_shard_bytes=max_shard_bytes)

