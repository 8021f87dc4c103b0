"""Typed, explicit reading of a Hugging Face `config.json`: every failure is a ValueError naming the field.

`Fields` wraps one config dict: sizes are read with `int(name)` (required), flags with
`bool(name, default)` where the default is the one `transformers` documents, and each default used
is recorded so the card can say so. `ALIASES` holds the alternative spellings `transformers` accepts
(its config classes' `attribute_map`). `read_config_json` loads a file or a model/run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REQUIRED = object()  # default of a field that must be present

# Alternative spellings transformers accepts for a field (its config classes' `attribute_map`):
# model_type -> {the name we read: other names that mean the same}.
ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"num_local_experts": ("num_experts",)},
    "qwen3_moe": {"num_experts": ("num_local_experts",)},
    "olmoe": {"num_experts": ("num_local_experts",)},
    "gpt_oss": {"num_local_experts": ("num_experts",), "num_experts_per_tok": ("experts_per_token",)},
    "deepseek_v2": {"n_routed_experts": ("num_experts",)},
    "deepseek_v3": {"n_routed_experts": ("num_local_experts",), "num_nextn_predict_layers": ("num_mtp_layers",)},
    "kimi_k2": {"n_routed_experts": ("num_local_experts",), "num_nextn_predict_layers": ("num_mtp_layers",)},
    "glm4_moe": {"n_routed_experts": ("num_local_experts",), "num_nextn_predict_layers": ("num_mtp_layers",)},
    "jetmoe": {"kv_channels": ("head_dim",)},
    "dbrx": {"n_heads": ("num_attention_heads",), "d_model": ("hidden_size",), "n_layers": ("num_hidden_layers",)},
}


class Fields:
    """Typed, explicit access to a config dict; every failure is a ValueError naming the field."""

    def __init__(self, data: dict[str, Any], where: str, model_type: str):
        self.data, self.where, self.model_type = data, where, model_type
        self.defaults_used: list[str] = []

    def error(self, msg: str) -> ValueError:
        return ValueError(f"{self.where} (model_type {self.model_type!r}): {msg}")

    def _get(self, name: str, default: Any) -> Any:
        """The field's value (under its name or an alias); else `default`, recorded; else an error."""
        for key in (name, *ALIASES.get(self.model_type, {}).get(name, ())):
            if key in self.data:
                return self.data[key]
        if default is REQUIRED:
            raise self.error(f"required field {name!r} is missing")
        self.defaults_used.append(f"{name}={default!r}")
        return default

    def int(self, name: str, default: Any = REQUIRED, minimum: int = 1) -> int:
        value = self._get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.error(f"field {name!r}={value!r} is invalid: allowed an integer >= {minimum}")
        return value

    def opt_int(self, name: str, default: Any = REQUIRED, minimum: int = 1) -> int | None:
        """An integer or null (null is meaningful, e.g. q_lora_rank=null: full-rank queries)."""
        value = self._get(name, default)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.error(f"field {name!r}={value!r} is invalid: allowed null or an integer >= {minimum}")
        return value

    def bool(self, name: str, default: Any = REQUIRED) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise self.error(f"field {name!r}={value!r} is invalid: allowed true or false")
        return value

    def int_list(self, name: str, default: Any = REQUIRED) -> list[int]:
        value = self._get(name, default)
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self.error(f"field {name!r}={value!r} is invalid: allowed a list of integers")
        return value

    def str_list(self, name: str, length: int, allowed: tuple[str, ...]) -> list[str] | None:
        """An optional list of per-layer strings (e.g. `layer_types`); None when absent or null."""
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != length or not all(v in allowed for v in value):
            raise self.error(f"field {name!r} is invalid: allowed a list of {length} values from {list(allowed)}")
        return value

    def head_dim(self, hidden: int, heads: int, *, falsy_means_absent: bool = False) -> int:
        """`head_dim` if present, else hidden_size // num_attention_heads (transformers' rule)."""
        value = self.data.get("head_dim")
        if value is None or (falsy_means_absent and not value):
            if hidden % heads:
                raise self.error(f"head_dim is absent and hidden_size={hidden} is not divisible by "
                                f"num_attention_heads={heads}")
            self.defaults_used.append(f"head_dim=hidden_size//num_attention_heads={hidden // heads}")
            return hidden // heads
        return self.int("head_dim")

    def kv_heads_or_mha(self, heads: int) -> int:
        """`num_key_value_heads`, or num_attention_heads when absent/null (transformers' documented rule)."""
        if self.data.get("num_key_value_heads") is None:
            self.defaults_used.append(f"num_key_value_heads=num_attention_heads={heads}")
            return heads
        return self.int("num_key_value_heads")

    def notes(self) -> tuple[str, ...]:
        if not self.defaults_used:
            return ()
        return ("transformers defaults used for absent fields: " + ", ".join(self.defaults_used),)


def sub_fields(f: Fields, key: str) -> Fields:
    """The nested sub-configuration `key` (DBRX's attn_config, Llama 4's text_config) as Fields."""
    value = f.data.get(key)
    if not isinstance(value, dict):
        raise f.error(f"field {key!r} is {'missing' if value is None else 'not an object'}; it must hold "
                     "the sub-configuration")
    return Fields(value, f"{f.where}[{key}]", f.model_type)


def read_config_json(path: Path) -> dict[str, Any]:
    """Read `config.json` (or `<dir>/config.json`) into a dict; ValueError if absent or malformed.

    A moelab run directory (no config.json, but `checkpoints/step_*/config.json`) gives its newest
    checkpoint's config.
    """
    file = path / "config.json" if path.is_dir() else path
    if path.is_dir() and not file.exists():
        steps = sorted(path.glob("checkpoints/step_*/config.json"))
        if steps:
            file = steps[-1]
    if not file.is_file():
        raise ValueError(f"{path}: no config.json found (pass a config.json file or a model directory holding one)")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: a config must be a JSON object, got {type(data).__name__}")
    return data
