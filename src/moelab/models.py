"""Any model a user points moelab at: a moelab run (or one of its checkpoints) or a Hugging Face directory.

    loaded = load_model(path)          # LoadedModel(model, tokenizer, kind, path)
    loaded.model                       # an eval-mode MoETransformer
    loaded.tokenizer                   # the tokenizers.Tokenizer of its tokenizer.json (None when absent)

A run directory is read with `moelab.rundir.load_run` (verified, no pickle); a directory holding a
Hugging Face `config.json` (with `model_type`) and safetensors weights with `moelab.hf.load`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moelab.model import MoETransformer


@dataclass
class LoadedModel:
    model: MoETransformer
    tokenizer: Any  # tokenizers.Tokenizer or None
    kind: str  # "run" or "hf"
    path: Path
    stop_id: int | None = None  # where generation stops: the run's <|endoftext|>, or config.json's eos_token_id

    def prompt_ids(self, text: str) -> list[int]:
        """The ids a text prompt is continued from: a run's rule ([<|endoftext|>] + tokens, `moelab.data`), or
        a Hugging Face tokenizer's own special tokens (its post-processor, e.g. a BOS)."""
        from moelab.data import prompt_ids

        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer.json: a text prompt cannot be encoded")
        if self.kind == "run":
            return prompt_ids(self.tokenizer, text)
        return self.tokenizer.encode(text, add_special_tokens=True).ids


def load_model(path: str | Path, **hf_options: Any) -> LoadedModel:
    """The model (eval mode) and tokenizer of a moelab run or a Hugging Face directory; `hf_options` go to
    `moelab.hf.load` (e.g. dtype), and to a run's `moelab.rundir.load_run` those of a memory budget
    (max_memory_gb, policy, prefetch). ValueError / FileNotFoundError naming the path otherwise."""
    from moelab.data import load_tokenizer
    from moelab.rundir import TOKENIZER, RunDir, is_hf_dir, load_run

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a moelab run directory or a Hugging Face model directory")
    if is_hf_dir(path) and not RunDir(path).checkpoints():
        from moelab import hf

        model, kind, tok_dir = hf.load(path, **hf_options), "hf", path
    else:
        budget = {k: v for k, v in hf_options.items() if k in ("max_memory_gb", "policy", "prefetch")}
        model, kind = load_run(path, **budget)[0], "run"
        tok_dir = path if (path / TOKENIZER).is_file() else path.parent.parent  # a checkpoint dir given directly
    tok_path = tok_dir / TOKENIZER
    tokenizer = load_tokenizer(tok_path) if tok_path.is_file() else None
    if kind == "hf":
        eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
        stop = eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None
    else:
        from moelab.data import END_OF_TEXT

        stop = tokenizer.token_to_id(END_OF_TEXT) if tokenizer is not None else None
    return LoadedModel(model, tokenizer, kind, path, stop)
