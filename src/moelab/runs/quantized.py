"""Quantized models on disk: a converted model's weights as safetensors + JSON, loaded back without re-quantizing.

    tensors = quantized_state(model)               # {name: tensor}: portable forms, for `moelab.runs.checkpoint`
    record = quant_record("int4", 32)              # config.json's "quant": {"format", "group_size", "layout"}
    model = load_quantized(ckpt_dir, config)       # the converted model, packed for this machine (eval mode)

A quantized run is a run directory (`moelab.runs.rundir`) whose config.json carries "quant" and whose checkpoint's
model.safetensors holds, under the float model's state-dict names:
- every linear `prepare_inference` converts (`moelab.inference.prepare.linear_slots`), as its portable form
  (`moelab.inference.formats`): `P.weight` (float), or `P.qweight` + `P.scale` (int8), or `P.qweight` + `P.scale_zero`
  (int4), where P is the float linear's name (`blocks.0.attn.wq`, …, `head` — present also with tied
  embeddings) and `P.bias` where it has one; fused q|k|v is stored as its parts wq, wk and wv (the formats
  quantize rows independently, so the parts of a fused weight are its row blocks);
- every MoE layer's routed experts stacked per projection: `…experts.gate_up.*` [E, H, D …] and
  `…experts.down.*` [E, D, I …] (the same portable forms, with a leading expert dimension);
- everything else (embedding, norms, routers, the shared-expert gate) as in a float checkpoint.
`layout` is the version of this layout (LAYOUT). Nothing is pickled; the kernels' own packed layouts are
never written: int4 codes are packed for the CPU kernel at load.

Legend: E = experts, D = model width, H = first expert projection's width, I = expert hidden width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moelab.config.model import ModelConfig
from moelab.hf.reader import Checkpoint
from moelab.inference.formats import check_quant, load_linear_weight
from moelab.inference.offload import check_budget, offload_experts, return_freed_memory
from moelab.inference.prepare import (
    ROW_DIM,
    InferenceLinear,
    install_linear,
    linear_slots,
    moe_stores,
    prepare_inference,
)
from moelab.inference.quantized_experts import ExpertWeights, QuantizedExperts
from moelab.layer.experts import ExpertStore
from moelab.model.transformer import MoETransformer
from moelab.runs.checkpoint import CheckpointError

LAYOUT = 1
_QUANT_OF = {("weight",): None, ("qweight", "scale"): "int8", ("qweight", "scale_zero"): "int4"}


def quant_record(quant: str, group_size: int) -> dict[str, Any]:
    """The "quant" entry of a quantized run's config.json."""
    check_quant(quant, group_size)
    return {"format": quant, "group_size": group_size, "layout": LAYOUT}


def quantized_state(model: MoETransformer) -> dict[str, Tensor]:
    """The tensors of a model converted by `prepare_inference`, in the layout of the module docstring (its
    `state_dict`, which `prepare_inference` makes portable: `moelab.inference.prepare.portable_state`)."""
    for slot in linear_slots(model):
        if not isinstance(getattr(slot.parent, slot.attr), InferenceLinear):
            raise ValueError(f"{slot.prefix}{slot.attr} is not converted: run moelab.inference.prepare_inference")
    for prefix, moe in moe_stores(model):
        if not isinstance(moe.experts, QuantizedExperts):
            raise ValueError(f"{prefix[:-1]} holds a {type(moe.experts).__name__}: only converted experts are saved")
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _keys(names: set[str], prefix: str) -> dict[str, str]:
    """{key: name} of the tensors named prefix + key, taken out of `names`; CheckpointError when there are none."""
    found = {n[len(prefix):]: n for n in names if n.startswith(prefix) and "." not in n[len(prefix):]}
    if not found:
        raise CheckpointError(f"model.safetensors has no tensors {prefix}*: not a quantized run of this model")
    names.difference_update(found.values())
    return found


def _read(reader: Checkpoint, names: set[str], prefix: str) -> dict[str, Tensor]:
    """The tensors named prefix + key, by key, read (`_keys`)."""
    return {k: reader.read(n) for k, n in _keys(names, prefix).items()}


def _weight(tensors: dict[str, Any], name: str):
    """(format, the entries but the bias) of one weight's tensors (or tensor names) by key; CheckpointError when
    the keys are no weight format."""
    quant = _QUANT_OF.get(tuple(sorted(k for k in tensors if k != "bias")), "?")
    if quant == "?":
        raise CheckpointError(f"{name}: tensors {sorted(tensors)} are no weight format (weight | qweight + scale | "
                              "qweight + scale_zero)")
    return quant, {k: v for k, v in tensors.items() if k != "bias"}


@torch.no_grad()
def load_quantized(ckpt: str | Path, config: dict[str, Any], *, max_memory_gb: float | None = None,
                   policy: str = "lru", prefetch: bool = False) -> MoETransformer:
    """The model of a quantized checkpoint (`config`: its config.json), packed for this machine, in eval mode.

    max_memory_gb, policy, prefetch: a budget for the weights, as `moelab.hf.load` keeps one — the routed
    experts stay in model.safetensors and are read on demand (one row of each stacked expert tensor, already
    quantized) into one `moelab.inference.offload.ExpertCache`. CheckpointError when a tensor is missing,
    unexpected or of an unknown format, or the layout is newer; ValueError naming the option for a budget out
    of range or below the resident weights plus one expert."""
    ckpt = Path(ckpt)
    check_budget(max_memory_gb, policy)
    record = config["quant"]
    if record.get("layout") != LAYOUT:
        raise CheckpointError(f"{ckpt}: quantized layout {record.get('layout')!r} is not readable by this moelab "
                              f"(it reads layout {LAYOUT})")
    with torch.device("meta"):
        model = MoETransformer(ModelConfig.from_dict(config["model"]))
    return_freed_memory()  # the per-tensor temporaries go back to the system, not into glibc's heap
    reader = Checkpoint([ckpt / "model.safetensors"])  # read with pread: no memory map counts against the RSS
    try:
        stores = _fill(model, reader, max_memory_gb is not None)
        model.set_rope_tables()
        if max_memory_gb is not None:
            offload_experts(model, _expert_loader(reader, stores, model.cfg.moe.activation), max_memory_gb, policy,
                            prefetch, on_close=reader.close)
    except BaseException:
        reader.close()
        raise
    if max_memory_gb is None:
        reader.close()
    return prepare_inference(model)  # already converted: its decode engine and portable state_dict, nothing requantized


def _fill(model: MoETransformer, reader: Checkpoint, budget: bool) -> dict[int, list]:
    """Install the file's weights in the meta-device model: the converted linears, the routed experts (or with
    a budget, an empty store per layer and, returned per layer, the names and formats of its stacked expert
    tensors), then everything else; CheckpointError when the file does not fit the model."""
    names, installed, stores = set(reader.names()), [], {}
    for slot in linear_slots(model):
        installed.append(f"{slot.prefix}{slot.attr}.")
        parts = [_read(reader, names, f"{slot.prefix}{part}.") for part in slot.parts]
        quants = {_weight(p, slot.prefix + name)[0] for p, name in zip(parts, slot.parts)}
        if len(quants) != 1 or len({tuple(sorted(p)) for p in parts}) != 1:
            raise CheckpointError(f"{slot.prefix}{'/'.join(slot.parts)}: the parts of one fused weight differ in "
                                  "format or bias")
        cat = {k: torch.cat([p[k] for p in parts], dim=ROW_DIM[k]) for k in parts[0]}
        _, tensors = _weight(cat, slot.prefix + slot.attr)
        install_linear(slot, InferenceLinear(load_linear_weight(quants.pop(), tensors), cat.get("bias")))
    for prefix, moe in moe_stores(model):
        if not budget:
            projs = [_read(reader, names, f"{prefix}{proj}.") for proj in ("gate_up", "down")]
            (q_in, t_in), (q_out, t_out) = (_weight(t, prefix[:-1]) for t in projs)
            experts = [ExpertWeights(load_linear_weight(q_in, {k: v[e] for k, v in t_in.items()}),
                                     load_linear_weight(q_out, {k: v[e] for k, v in t_out.items()}),
                                     moe.cfg.activation) for e in range(moe.cfg.n_experts)]
            moe.experts = QuantizedExperts(experts)
        else:  # left in the file: their names and formats only
            stores[int(prefix.split(".")[1])] = [_weight(_keys(names, f"{prefix}{proj}."), prefix[:-1])
                                                 for proj in ("gate_up", "down")]
            moe.experts = ExpertStore()
    rest = {n: reader.read(n) for n in names}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    missing = [n for n in missing if not n.startswith(tuple(installed))]  # the converted linears' biases: set above
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unexpected or missing or [n for n in still_meta if not n.startswith("rope_")]:
        absent = sorted(set(missing) | set(still_meta))[:5]
        raise CheckpointError(f"{reader.files[0].path} does not fit the quantized model: unexpected "
                              f"{sorted(unexpected)[:5]}, missing {absent}")
    return stores


def _expert_loader(reader: Checkpoint, stores: dict[int, list[tuple[str | None, dict[str, str]]]], activation: str):
    """load((layer, e)) → (ExpertWeights, its bytes, bytes read): expert e's rows of the layer's stacked tensors
    (`stores`: per MoE layer, the format and {key: tensor name} of gate_up and of down), read with one pread
    each and packed for this machine (nothing is quantized again)."""
    def load(key):
        layer, e = key
        (q_in, n_in), (q_out, n_out) = stores[layer]
        nread = sum(reader.info(n, e).nbytes for n in (*n_in.values(), *n_out.values()))
        expert = ExpertWeights(load_linear_weight(q_in, {k: reader.read(n, e) for k, n in n_in.items()}),
                               load_linear_weight(q_out, {k: reader.read(n, e) for k, n in n_out.items()}),
                               activation)
        return expert, expert.nbytes, nread
    return load
