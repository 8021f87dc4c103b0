"""Any model a user points moelab at: a moelab run (or one of its checkpoints) or a Hugging Face directory.

    loaded = load_model(path)          # LoadedModel(model, tokenizer, kind, path)
    loaded.model                       # an eval-mode MoETransformer
    loaded.tokenizer                   # the tokenizers.Tokenizer of its tokenizer.json (None when absent)

A run directory is read with `load_run` (verified, no pickle); a directory holding a
Hugging Face `config.json` (with `model_type`) and safetensors weights with `moelab.hf.load`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moelab.config.model import ModelConfig
from moelab.data.tokenizer import END_OF_TEXT, load_tokenizer, prompt_ids
from moelab.inference.prepare import prepare_inference
from moelab.model.transformer import MoETransformer
from moelab.runs import checkpoint as ckpt_io
from moelab.runs.rundir import TOKENIZER, RunDir


@dataclass
class LoadedModel:
    model: MoETransformer
    tokenizer: Any  # tokenizers.Tokenizer or None
    kind: str  # "run" or "hf"
    path: Path
    stop_id: int | None = None  # where generation stops: the run's <|endoftext|>, or config.json's eos_token_id
    prompt_rule: str = "endoftext"  # `moelab.data.tokenizer.prompt_ids`: "endoftext" (trained runs) or "tokenizer"

    def prompt_ids(self, text: str) -> list[int]:
        """The ids a text prompt is continued from, by the checkpoint's rule (`moelab.data.tokenizer.prompt_ids`):
        a trained run's [<|endoftext|>] + tokens, or — for a Hugging Face directory and a run converted from
        one (`moelab convert --from-hf` records the rule) — the tokenizer's own special tokens (its
        post-processor, e.g. a BOS), the ids transformers' `tokenizer(text)` gives."""
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer.json: a text prompt cannot be encoded")
        return prompt_ids(self.tokenizer, text, self.prompt_rule)


def load_model(path: str | Path, **hf_options: Any) -> LoadedModel:
    """The model (eval mode) and tokenizer of a moelab run or a Hugging Face directory; `hf_options` go to
    `moelab.hf.load` (e.g. dtype), and to a run's `moelab.rundir.load_run` those of a memory budget
    (max_memory_gb, policy, prefetch). ValueError / FileNotFoundError naming the path otherwise (a config.json
    or tokenizer.json that is not JSON is named as such)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a moelab run directory or a Hugging Face model directory")
    has_checkpoints = bool(RunDir(path).checkpoints())
    if not has_checkpoints and (path / "config.json").is_file():
        read_json(path / "config.json")  # a config.json that is not JSON: say so, not "holds no checkpoint"
    if is_hf_dir(path) and not has_checkpoints:
        from moelab import hf

        model, kind, tok_dir = hf.load(path, **hf_options), "hf", path
        rule, stop = "tokenizer", hf_stop_id(read_json(path / "config.json"))
    else:
        options = {k: v for k, v in hf_options.items()
                   if k in ("quant", "group_size", "max_memory_gb", "policy", "prefetch", "for_training")}
        model, config = load_run(path, **options)
        kind = "run"
        tok_dir = path if (path / TOKENIZER).is_file() else path.parent.parent  # a checkpoint dir given directly
        recorded = config.get("prompt") or {}  # written by `moelab convert --from-hf`
        started = config.get("init") or {}  # a run started from a Hugging Face checkpoint (`moelab.training.init`)
        if not recorded and started.get("prompt") == "hf":
            recorded = {"rule": "tokenizer", "stop_id": started.get("eos_token_id")}
        rule = recorded.get("rule", "endoftext")
    tok_path = tok_dir / TOKENIZER
    tokenizer = load_tokenizer(tok_path) if tok_path.is_file() else None
    if kind == "run":
        stop = (recorded["stop_id"] if "stop_id" in recorded else
                tokenizer.token_to_id(END_OF_TEXT) if tokenizer is not None else None)
    return LoadedModel(model, tokenizer, kind, path, stop, rule)


def hf_stop_id(config: dict[str, Any]) -> int | None:
    """Where generation stops for a Hugging Face config.json: its eos_token_id (the first of a list), or None."""
    eos = config.get("eos_token_id")
    return eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None


def read_json(path: Path) -> Any:
    """A JSON file's contents; ValueError naming the file when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); restore the file") from None


READ_ATTEMPTS = 8  # checkpoints rotated away while being read, before giving up


def load_run(path: str | Path, *, quant: str | None = None, group_size: int = 32, max_memory_gb: float | None = None,
             policy: str = "lru", prefetch: bool = False, for_training: bool = False):
    """The newest checkpoint of a run (or a checkpoint directory given directly) as a model in eval mode, ready to
    decode on the inference path, and its config dict; the checkpoint is verified against its manifest, nothing is
    unpickled. A float run is converted for inference (`prepare_inference(model, quant, group_size)`: float weights
    for quant None); a quantized run (`moelab convert --quant`) loads in its own format.
    max_memory_gb, policy, prefetch: a quantized run's routed experts stay on disk within that budget
    (`moelab.runs.quantized.load_quantized`). for_training: the plain trainable float model (no conversion).
    ValueError for a budget on a float run, another quant than a quantized run's own, or for_training with either.

    A training may write the run meanwhile (`--keep-checkpoints 1` deletes the older checkpoint once the newer
    one is in place): a checkpoint that fails to read because it was rotated away — it is gone, or a newer
    complete one has appeared — is skipped for the newest one then listed, so the reader gets one consistent
    checkpoint (an error after READ_ATTEMPTS rotations in a row)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run directory {path} does not exist")
    options = dict(quant=quant, group_size=group_size, max_memory_gb=max_memory_gb, policy=policy, prefetch=prefetch,
                   for_training=for_training)
    if (path / "manifest.json").is_file():
        return _load_checkpoint(path, path, **options)
    for _ in range(READ_ATTEMPTS):
        target = RunDir(path).latest_checkpoint()
        if target is None:
            hint = (" — it looks like a Hugging Face model directory (config.json with model_type): convert it with "
                    f"`moelab convert --from-hf {path} RUN`" if is_hf_dir(path) else "")
            raise ValueError(f"{path} is not a moelab run: it holds no checkpoint (checkpoints/step_*, written by "
                             f"`moelab train` or `moelab convert --from-hf`){hint}")
        try:
            return _load_checkpoint(path, target, **options)
        except (ckpt_io.CheckpointError, OSError):
            if target.is_dir() and RunDir(path).latest_checkpoint() == target:
                raise  # still the newest: a damaged checkpoint, not a rotated one
    raise ValueError(f"{path}: its newest checkpoint was deleted while being read {READ_ATTEMPTS} times in a row (a "
                     "training rotating checkpoints faster than they can be read?); try again, or raise that "
                     "training's --keep-checkpoints")


def _load_checkpoint(path: Path, target: Path, *, quant: str | None, group_size: int, max_memory_gb: float | None,
                     policy: str, prefetch: bool, for_training: bool):
    ckpt_io.verify(target)
    config = ckpt_io.read_config(target)
    if "quant" in config:  # a quantized run (`moelab convert --quant`)
        from moelab.runs.quantized import load_quantized

        held = config["quant"]["format"]
        if for_training or (quant is not None and quant != held):
            raise ValueError(f"{path} is already quantized ({held}): it cannot be converted again (quant={quant!r}) "
                             "or trained (convert the original float checkpoint instead)")
        return load_quantized(target, config, max_memory_gb=max_memory_gb, policy=policy, prefetch=prefetch), config
    if for_training and quant is not None:
        raise ValueError(f"for_training=True loads the float trainable model: quant={quant!r} applies to inference "
                         "only")
    if max_memory_gb is not None:
        raise ValueError(f"max_memory_gb applies to a quantized run or a Hugging Face directory; {path} is a float "
                         "run: convert it with `moelab convert --to-hf` (or `--from-hf ... --quant`) first")
    model = MoETransformer(ModelConfig.from_dict(config["model"]))
    if (target / "dcp").is_dir():  # sharded by a mesh run: DCP gathers it into this one-process model
        from moelab.runs.sharded import load_sharded

        load_sharded(target, model, verified=True)
    else:
        ckpt_io.load_model_state(model, target, verified=True)
    if not for_training:
        prepare_inference(model, quant, group_size)
    return model.eval(), config


def is_hf_dir(path: Path) -> bool:
    """A directory holding a Hugging Face config.json (one with a `model_type` string)."""
    try:
        return isinstance(json.loads((path / "config.json").read_text()).get("model_type"), str)
    except (OSError, ValueError, AttributeError):
        return False
