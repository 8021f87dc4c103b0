"""Hugging Face interop: MoE checkpoints in (`load`), moelab models out (`save`), and run-directory converters.

    model = moelab.hf.load("path/to/Mixtral-dir")        # config.json + *.safetensors → MoETransformer
    model = moelab.hf.load(path, max_memory_gb=8)         # experts read from disk on demand within 8 GB
    moelab.hf.save(model, "out/", tokenizer_json=...)      # → a directory transformers.from_pretrained loads
    convert_from_hf(hf_dir, run_dir) / convert_to_hf(run_dir, hf_dir)   # `moelab convert`

Loading streams: the model is built without initialising its weights (on the meta device, then
`to_empty`), and each tensor is read once, straight into its place (`moelab.hf.streaming`, through
`moelab.hf.reader`, which reads the safetensors files with `pread` instead of mapping them), so peak
memory is the loaded model plus one expert. With a memory budget the routed experts are not loaded at
all: each MoE layer gets an `moelab.offload.OffloadedExperts` store that reads them on demand into one
cache shared by all layers. Architectures and their tensor tables live in `moelab.hf.adapters`; see
docs/HF.md.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moelab.config import ModelConfig
from moelab.experts import ExpertStore
from moelab.hf.adapters import CHECKPOINT_ADAPTERS, Adapter, adapter_for, adapter_matching
from moelab.hf.convert import convert_from_hf, convert_to_hf
from moelab.hf.export import save
from moelab.hf.reader import Checkpoint
from moelab.hf.streaming import ExpertReader, expert_parts, is_routed_expert, match_tensors, stream_into
from moelab.hf_config import HFConfig, load_json
from moelab.model import MoETransformer, model_rope_tables
from moelab.offload import POLICIES, ExpertCache, FloatExpert, OffloadedExperts, enable_prefetch, resident_bytes

__all__ = ["load", "save", "convert_from_hf", "convert_to_hf", "read_hf_config", "CHECKPOINT_ADAPTERS",
           "adapter_matching", "QUANTS"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTS = ("int8", "int4")


def read_hf_config(path: str | Path) -> tuple[HFConfig, Adapter, ModelConfig]:
    """config.json of a Hugging Face model directory → (its reader, adapter, moelab ModelConfig)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: pass a Hugging Face model directory holding config.json")
    c = HFConfig(load_json(file), str(file))
    adapter = adapter_for(c)
    return c, adapter, adapter.config_from_hf(c)


def _weight_files(path: Path, lazily: bool = False) -> list[Path]:
    """The safetensors files of a checkpoint: from model.safetensors.index.json, or model.safetensors.
    Without any: FileNotFoundError, or — `lazily`, for a memory budget — the ValueError saying why."""
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
    if not files and lazily:
        raise ValueError(f"{path}: max_memory_gb needs the experts' weights in *.safetensors files, read lazily; "
                         "there are none (pickled .bin checkpoints cannot be read lazily, nor at all)")
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (pickled .bin checkpoints are not read)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is listed in model.safetensors.index.json but does not exist")
    return files


def _empty_model(cfg: ModelConfig, dtype: torch.dtype, keep_experts: bool = True) -> MoETransformer:
    """The model with uninitialised CPU storage (no random init, no pages touched until written); without
    `keep_experts`, its MoE layers hold an empty placeholder store (no expert weights allocated)."""
    with torch.device("meta"):
        model = MoETransformer(cfg).to(dtype)
        for moe in model.moe_layers():  # the selection bias stays float32, as in DeepSeek-V3
            moe.router.register_buffer("bias", torch.zeros(cfg.moe.n_experts), persistent=True)
            if not keep_experts:
                moe.experts = ExpertStore()
    model.to_empty(device="cpu")
    cos, sin = model_rope_tables(cfg)
    model.register_buffer("rope_cos", cos, persistent=False)
    model.register_buffer("rope_sin", sin, persistent=False)
    return model


@torch.no_grad()
def load(path: str | Path, dtype: torch.dtype | str | None = None, *, quant: str | None = None,
         max_memory_gb: float | None = None, policy: str = "lru", prefetch: bool = False,
         progress: bool | None = None) -> MoETransformer:
    """A Hugging Face MoE checkpoint directory → MoETransformer (eval mode).

    Reads `config.json` and `model.safetensors` or the shards named in `model.safetensors.index.json`,
    tensor by tensor, each straight into its place (`moelab.hf.streaming`): peak memory is the loaded
    model plus one expert. dtype: of the moelab weights (default: the config's `dtype`/`torch_dtype`, else
    float32).

    quant: None (float experts) or one of `QUANTS`; experts are quantized as they are read.
    max_memory_gb: a budget in GB (10⁹ bytes) for the weights. The non-expert weights stay resident; the
        routed experts stay in the checkpoint's files and are read on demand into one `ExpertCache` of
        (budget − resident bytes), evicting by `policy` ("lru" or "lfu"), optionally prefetching the next
        layer's predicted experts (`prefetch`); see `moelab.offload`. None: the whole model in memory.
    progress: a progress bar of the bytes read on stderr (None: when stderr is a terminal).

    Raises ValueError naming the field or tensor for an unsupported architecture, option or quant, a
    missing or unexpected tensor, a tensor whose shape disagrees with config.json, a budget below the
    resident weights plus one expert (saying how much is needed), or — with a budget — weights that
    cannot be read lazily (no safetensors files).
    """
    path = Path(path)
    c, adapter, cfg = read_hf_config(path)
    _check_options(quant, max_memory_gb, policy)
    if dtype is None:
        dtype = c.data.get("dtype") or c.data.get("torch_dtype") or "float32"
        dtype = dtype if dtype in _DTYPES else "float32"
    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    budget = max_memory_gb is not None
    ckpt = Checkpoint(_weight_files(path, lazily=budget))
    try:
        found = match_tensors(ckpt, adapter.entries(cfg, c), cfg, adapter.model_type)
        apart = quant is not None or budget  # the routed experts go to another store than Experts
        resident = [e for e in found if not (apart and is_routed_expert(e))]
        model = _empty_model(cfg, dtype, keep_experts=not apart)
        reader = ExpertReader(ckpt, expert_parts(found, cfg.moe.n_experts), dtype) if apart else None
        load_expert = _expert_loader(reader, quant, cfg.moe.activation) if apart else None
        capacity = _cache_capacity(model, load_expert, max_memory_gb) if budget else 0
        total = sum(ckpt.info(e.hf_name).nbytes for e in resident)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {path.name}",
                  disable=not (sys.stderr.isatty() if progress is None else progress)) as bar:
            state = model.state_dict(keep_vars=True)
            stream_into(ckpt, resident, state, bar.update)
        targets = {e.target for e in found}
        for name, t in state.items():
            if name not in targets:
                assert name.endswith("router.bias"), f"no Hugging Face tensor fills {name}"
                t.data.zero_()
        if quant is not None and not budget:
            raise NotImplementedError("quantized experts held in memory come with moelab.quant")
    except BaseException:
        ckpt.close()
        raise
    if not budget:
        ckpt.close()
        return model.eval()
    cache = ExpertCache(capacity, load_expert, policy)  # keeps ckpt open: experts are read on demand
    for i, block in enumerate(model.blocks):
        if block.is_moe:
            block.ffn.experts = OffloadedExperts(i, cfg.moe.n_experts, cfg.moe.activation, cache)
    enable_prefetch(model, prefetch)
    return model.eval()


def _check_options(quant: str | None, max_memory_gb: float | None, policy: str) -> None:
    """ValueError naming the option when quant, max_memory_gb or policy is out of range."""
    if quant is not None and quant not in QUANTS:
        raise ValueError(f"quant={quant!r} is not supported: allowed None, " + ", ".join(map(repr, QUANTS)))
    number = isinstance(max_memory_gb, (int, float)) and not isinstance(max_memory_gb, bool)
    if max_memory_gb is not None and not (number and 0 < max_memory_gb < math.inf):
        raise ValueError(f"max_memory_gb={max_memory_gb!r} is invalid: allowed a number of GB > 0, or None (the "
                         "whole model in memory)")
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is invalid: allowed " + ", ".join(map(repr, POLICIES)))


def _cache_capacity(model: MoETransformer, load_expert, max_memory_gb: float) -> int:
    """Bytes left for the expert cache: the budget minus the resident weights; ValueError saying how much
    is needed when that is less than one expert (its size measured by loading expert (first MoE layer, 0))."""
    resident = resident_bytes(model)
    first = next(i for i, b in enumerate(model.blocks) if b.is_moe)
    one = load_expert((first, 0))[1]
    budget = int(max_memory_gb * 1e9)
    if budget < resident + one:
        need = math.ceil((resident + one) / 1e6) / 1e3
        raise ValueError(f"max_memory_gb={max_memory_gb!r} is below what this model needs in memory: "
                         f"{resident / 1e9:.3f} GB of non-expert weights + {one / 1e9:.4f} GB for one expert; "
                         f"allowed >= {need:.3f}")
    return budget - resident


def _expert_loader(reader: ExpertReader, quant: str | None, activation: str):
    """load(key, spare) for an `ExpertCache`: one expert read (into the evicted `spare`'s memory when there
    is one) and converted → (weights, resident bytes, bytes read)."""
    def load_expert(key, spare=None):
        w_in, w_out, nread = reader.read(key, *((spare.w_in, spare.w_out) if spare is not None else ()))
        expert = FloatExpert(w_in, w_out, activation)
        return expert, expert.nbytes, nread
    return load_expert
