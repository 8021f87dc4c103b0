"""moelab models out to Hugging Face: `save` writes a directory `AutoModelForCausalLM.from_pretrained` loads.

The architecture is the one the model's config matches (`adapter_matching`); the adapter's tensor table
(`moelab.hf.adapters`), read backwards, gives each Hugging Face tensor from the moelab state dict. With a
moelab tokenizer, the export keeps moelab's prompt rule: the tokenizer prepends <|endoftext|> (its
post-processor), which is also the config's bos and eos token, so `tokenizer(prompt)` gives the ids
`moelab generate` continues from and generation stops where moelab's does (see `moelab.inference.generate`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moelab.hf.adapters import Entry, adapter_matching

# files an export writes (besides the weight shards), replaced by an export with overwrite=True
_EXPORT_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json")


def _extract(src: torch.Tensor, e: Entry) -> torch.Tensor:
    t = src if e.index is None else src[e.index]
    if e.transpose is not None:
        t = t.transpose(*e.transpose)
    if e.perm is not None:
        t = t[torch.argsort(torch.tensor(e.perm))]
    if e.scale != 1.0:
        t = t * e.scale
    return t.detach().to("cpu").contiguous().clone()


def check_output_dir(out: Path, overwrite: bool) -> None:
    """FileExistsError unless `out` is absent or empty, or `overwrite` allows writing into it."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory — nothing was written")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite (overwrite=True) to replace the files "
                              "the conversion writes, or choose another output directory — nothing was written")


def save(model, out: str | Path, tokenizer_json: str | Path | None = None, max_shard_bytes: int = 2 << 30,
         overwrite: bool = False) -> Path:
    """Write `model` (a `MoETransformer`) as a Hugging Face checkpoint directory.

    The architecture is the one the model's config matches (ValueError listing, per architecture, why
    none does). Weights are written per expert (the layout of published checkpoints) in the model's dtype
    as safetensors, sharded with an index above `max_shard_bytes`. `tokenizer_json` is copied to
    `out/tokenizer.json`; when it has moelab's end-of-text token, that token becomes the config's
    `bos_token_id` and `eos_token_id`, `tokenizer_config.json` names it, and the tokenizer prepends it to
    every text (moelab's prompt rule); pad is null, never the architecture's default (an ordinary token of a
    moelab vocabulary). A non-empty `out` is refused unless `overwrite`, which replaces the export's files
    (weight shards, index, config, tokenizer files) and leaves others. Each file is written under a
    temporary name and renamed into place.
    """
    if getattr(model, "decoder", None) is not None:  # converted by prepare_inference: no float parameters to write
        raise ValueError("this model is converted for inference (hf.load / load_run do so by default): load it with "
                         "for_training=True to export it")
    cfg = model.cfg
    adapter = adapter_matching(cfg)
    out = Path(out)
    check_output_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), *(out / name for name in _EXPORT_FILES)]:
        stale.unlink(missing_ok=True)  # files of an earlier export would describe another model
    hf_cfg = adapter.config_to_hf(cfg)
    eos = _end_of_text(tokenizer_json)
    eos_id = None if eos is None else eos[1]
    hf_cfg |= {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": None,
               "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    state = model.state_dict()
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in (e for e in adapter.entries(cfg) if not e.covers):
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
        tmp = out / f".tmp-{os.getpid()}-{fname}"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / fname)
        weight_map.update({n: fname for n in tensors})
        del tensors
    if len(shards) > 1:
        _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(out / "config.json", hf_cfg)
    if tokenizer_json is not None:
        if eos is None:
            shutil.copyfile(tokenizer_json, out / "tokenizer.json")
        else:
            _write_json(out / "tokenizer.json", _with_prompt_rule(json.loads(Path(tokenizer_json).read_text()), *eos))
            _write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                        "bos_token": eos[0], "eos_token": eos[0],
                                                        "model_max_length": cfg.max_seq_len})
    return out


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _end_of_text(tokenizer_json: str | Path | None) -> tuple[str, int] | None:
    """(token, id) of moelab's end-of-text special token in a tokenizer.json, or None."""
    from moelab.data.tokenizer import END_OF_TEXT

    if tokenizer_json is None:
        return None
    added = json.loads(Path(tokenizer_json).read_text()).get("added_tokens") or []
    return next(((t["content"], t["id"]) for t in added if t.get("content") == END_OF_TEXT and t.get("special")), None)


def _with_prompt_rule(tokenizer: dict[str, Any], token: str, token_id: int) -> dict[str, Any]:
    """A tokenizer.json whose post-processor prepends `token` to every text (`tokenizer(text)` →
    [token] + ids; `add_special_tokens=False` → ids), as moelab encodes a prompt."""
    special = {token: {"id": token, "ids": [token_id], "tokens": [token]}}
    rule = {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": token, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": special}
    return {**tokenizer, "post_processor": rule}
