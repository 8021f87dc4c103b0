"""Loading a Hugging Face MoE checkpoint: `load(path, dtype, quant=, max_memory_gb=)` → MoETransformer.

The model is built without initialising its weights (on the meta device, then `to_empty`), and each tensor
is read once, straight into its place (`moelab.hf.streaming`, through `moelab.hf.reader`, which reads the
safetensors files with `pread` instead of mapping them), so peak memory is the loaded model plus one
expert. The routed experts take one of three forms:
- in memory, float: the stacked `Experts` store, filled tensor by tensor (a trainable model);
- in memory, quantized (`quant`): read one expert at a time and converted
  (`moelab.inference.quantized_experts.expert_weights`) into a `QuantizedExperts` store; the other linear layers are
  converted too (`moelab.inference`);
- within a memory budget (`max_memory_gb`): not loaded at all — each MoE layer gets an
  `moelab.inference.offload.OffloadedExperts` store reading them on demand into one cache shared by all layers,
  converted to `quant`'s format as they are read; the other layers are converted for inference.
Loading fixes glibc's mmap threshold for the process (`moelab.inference.offload.return_freed_memory`): weights freed
as they are converted, here or by a later `prepare_inference`, then go back to the system instead of
staying in a fragmented heap (measured in docs/BENCHMARKS.md, "Memory budget").
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moelab.config.hf import HFConfig, load_json
from moelab.config.model import ModelConfig
from moelab.hf.adapters import Adapter, adapter_for
from moelab.hf.reader import Checkpoint
from moelab.hf.streaming import ExpertReader, expert_parts, is_routed_expert, match_tensors, stream_into
from moelab.inference.formats import check_quant
from moelab.inference.offload import check_budget, offload_experts, return_freed_memory
from moelab.inference.prepare import convert_slot, expert_quant, linear_slots, prepare_inference, slot_tensors
from moelab.inference.quantized_experts import QuantizedExperts, expert_weights
from moelab.layer.experts import ExpertStore
from moelab.model.transformer import MoETransformer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    model.set_rope_tables()
    return model


@torch.no_grad()
def load(path: str | Path, dtype: torch.dtype | str | None = None, *, quant: str | None = None,
         group_size: int = 32, max_memory_gb: float | None = None, policy: str = "lru", prefetch: bool = False,
         progress: bool | None = None, for_training: bool = False) -> MoETransformer:
    """A Hugging Face checkpoint directory (an MoE, or a dense Llama / Mistral / Qwen2 / Qwen3) → MoETransformer
    (eval mode), ready to decode on the inference path.

    Reads `config.json` and `model.safetensors` or the shards named in `model.safetensors.index.json`,
    tensor by tensor (module docstring). dtype: of the moelab weights (default: the config's
    `dtype`/`torch_dtype`, else float32).

    quant: None, "int8" or "int4" (`moelab.inference.formats`, int4 groups of `group_size`): the routed experts are
        converted as they are read, and the model for inference (`prepare_inference`: the other linear layers in the
        same format, the inference engine installed). None: float weights in `dtype`, converted the same way.
    for_training: the plain trainable model instead (float parameters, no inference conversion; no quant or
        budget).
    max_memory_gb: a budget in GB (10⁹ bytes) for the weights. The non-expert weights stay resident; the
        routed experts stay in the checkpoint's files and are read on demand into one `ExpertCache` of
        (budget − resident bytes), evicting by `policy` ("lru" or "lfu"), optionally prefetching the next
        layer's predicted experts (`prefetch`); see `moelab.inference.offload`. None: the whole model in memory.
    progress: a progress bar of the bytes read on stderr (None: when stderr is a terminal).

    Raises ValueError naming the field or tensor for an unsupported architecture, option or quant, a
    missing or unexpected tensor, a tensor whose shape disagrees with config.json, a budget below the
    resident weights plus one expert (saying how much is needed), or — with a budget — weights that
    cannot be read lazily (no safetensors files).
    """
    path = Path(path)
    c, adapter, cfg = read_hf_config(path)
    check_quant(quant, group_size)
    check_budget(max_memory_gb, policy)
    if dtype is None:
        dtype = c.data.get("dtype") or c.data.get("torch_dtype") or "float32"
        dtype = dtype if dtype in _DTYPES else "float32"
    if isinstance(dtype, str) and dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: allowed {', '.join(map(repr, _DTYPES))} or a torch.dtype")
    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    budget = max_memory_gb is not None
    if for_training and (quant is not None or budget):
        raise ValueError(f"for_training=True loads the float trainable model: quant={quant!r} and "
                         f"max_memory_gb={max_memory_gb!r} apply to inference only (leave them None)")
    if cfg.moe is not None and cfg.moe.biases and (quant is not None or budget):
        raise ValueError(f"{path}: quant and max_memory_gb are not supported for {adapter.model_type}'s biased "
                         "experts (moe.biases): load it without them (quant=None, max_memory_gb=None)")
    ckpt = Checkpoint(_weight_files(path, lazily=budget))
    try:
        model, load_expert = _stream(ckpt, c, adapter, cfg, dtype, quant, group_size, budget, not for_training,
                                     path.name, progress)
    except BaseException:
        ckpt.close()
        raise
    if not budget:
        ckpt.close()
        return model.eval()
    try:  # experts are read on demand
        offload_experts(model, load_expert, max_memory_gb, policy, prefetch, on_close=ckpt.close)
    except BaseException:
        ckpt.close()
        raise
    return model.eval()


def _stream(ckpt: Checkpoint, c: HFConfig, adapter: Adapter, cfg: ModelConfig, dtype: torch.dtype,
            quant: str | None, group_size: int, budget: bool, inference: bool, name: str, progress: bool | None):
    """The model with every tensor but the budgeted experts read, converted for inference (as read) unless it is
    for training; and the loader of one expert (for the budget's cache), or None."""
    found = match_tensors(ckpt, adapter.entries(cfg, c), cfg, adapter.model_type)
    apart = inference and cfg.moe is not None and not cfg.moe.biases  # routed experts to another store than Experts
    return_freed_memory()  # weights freed as they are converted (here or by prepare_inference) go back to the system
    resident = [e for e in found if not (apart and is_routed_expert(e))]
    model = _empty_model(cfg, dtype, keep_experts=not apart)
    reader = ExpertReader(ckpt, expert_parts(found, cfg.moe.n_experts), dtype) if apart else None
    load_expert = _expert_loader(reader, quant, group_size, cfg.moe.activation) if apart else None
    in_memory = apart and not budget
    total = sum(ckpt.info(e.hf_name).nbytes for e in resident) + (len(reader.parts) * reader.nbytes if in_memory else 0)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {name}",
              disable=not (sys.stderr.isatty() if progress is None else progress)) as bar:
        state = model.state_dict(keep_vars=True)
        if inference:  # converted as read: one slot's float weights at a time are held, not the model's
            by_target: dict[str, list] = {}  # a target may be filled by several tensors (gate and up rows of w_in)
            for e in resident:
                by_target.setdefault(e.target, []).append(e)
            slots = [(slot, slot_tensors(model, slot)) for slot in linear_slots(model)]
            in_slots = {n for _, names in slots for n in names if not n.startswith("embed.")}
            stream_into(ckpt, [e for e in resident if e.target not in in_slots], state, bar.update)
            for slot, names in slots:
                stream_into(ckpt, [e for n in names if n in in_slots for e in by_target.get(n, ())], state,
                            bar.update)
                for n in names:
                    if n in in_slots:
                        state.pop(n)
                convert_slot(model, slot, quant, group_size)
        else:
            stream_into(ckpt, resident, state, bar.update)
        targets = {e.target for e in found}
        for key, t in state.items():
            if key not in targets:
                assert key.endswith("router.bias"), f"no Hugging Face tensor fills {key}"
                t.data.zero_()
        del state  # holds every float weight it still names: converted ones must be freed as they are replaced
        if in_memory:
            for i, block in enumerate(model.blocks):
                if block.is_moe:
                    block.ffn.experts = QuantizedExperts([load_expert((i, e), bar.update)[0]
                                                          for e in range(cfg.moe.n_experts)])
    if inference:
        prepare_inference(model, quant, group_size)
    return model, load_expert


def _expert_loader(reader: ExpertReader, quant: str | None, group_size: int, activation: str):
    """load(key, progress=None) → (ExpertWeights, its bytes, bytes read): one expert read and converted to
    `quant` (int8 where int4 cannot take its shapes, as `moelab.inference` does)."""
    q = expert_quant((reader.H, reader.D), (reader.D, reader.I), quant, group_size)

    def load_expert(key, progress=None):
        w_in, w_out, nread = reader.read(key)
        expert = expert_weights(w_in, w_out, q, group_size, activation)
        if progress is not None:
            progress(nread)
        return expert, expert.nbytes, nread
    return load_expert
