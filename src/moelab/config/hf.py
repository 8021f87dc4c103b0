"""The one reader of a Hugging Face `config.json` (no torch): typed fields, one rule for absent / null / zero.

`moelab.accounting` (config.json → ModelSpec, to count) and `moelab.hf` (config.json → ModelConfig, to
load weights) both read configs through `HFConfig`; what the fields mean for each `model_type` (which
layers are MoE, head width, windows, experts, RoPE) is written once, in `moelab.config.hf_arch`. Every failure
is a ValueError naming the file, the model_type, the field, its value and what is allowed.

Absent, null and zero — what transformers' config classes do with them, as one rule:
- **absent** (the key is missing under its name and under every alias in `ALIASES`): the read's
  `default`. For sizes (widths, layer/head/expert counts) that is `REQUIRED` — an error naming the
  field: transformers' numeric defaults are one released model's sizes, and taking one silently would
  describe another model. Flags transformers documents with a default (`tie_word_embeddings=False`) and
  values it derives from other fields (`head_dim` = hidden // heads) are taken and recorded in
  `defaults_used` (the card lists them).
- **null**: transformers hands None to the config class; its strict classes refuse it and the others
  give it a meaning. A read refuses null unless it names that meaning (`null=`), which it does only
  where transformers has one: `q_lora_rank` (full-rank queries), `sliding_window` (no window),
  `num_key_value_heads` (= num_attention_heads), `head_dim` (= hidden // heads), `mlp_only_layers`
  (none), `rope_interleave` (false), `layer_types` (the architecture's rule) — see `moelab.config.hf_arch`.
- **zero**: an integer like any other, checked against the read's range. Sizes start at 1; a count
  that may be zero says so (`minimum=0`: n_shared_experts, first_k_dense_replace, qk_nope_head_dim...).

Upper bounds keep absurd configs from overflowing floats or building millions of layers: layer counts
up to `MAX_LAYERS`, expert counts up to `MAX_EXPERTS`, any other integer up to `MAX_INT`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

REQUIRED: Any = object()  # `default` of a field that must be present
REFUSED: Any = object()  # `null` of a field whose explicit null is an error

MAX_LAYERS = 10_000  # more than 100x the deepest released model (DeepSeek-V3: 61 layers)
MAX_EXPERTS = 2**20  # routed experts per layer (released models have hundreds)
MAX_INT = 2**31  # any other integer field (widths, vocabulary, heads)
_LAYER_FIELDS = {"num_hidden_layers", "n_layers", "num_nextn_predict_layers"}
_EXPERT_FIELDS = {"num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"}

# Alternative spellings transformers accepts for a field (its config classes' `attribute_map`):
# model_type -> {the name moelab reads: other names that mean the same}.
ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"num_local_experts": ("num_experts",)},
    "qwen2_moe": {"num_experts": ("num_local_experts",)},
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """An int or float (not a bool) that converts to a finite float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer beyond the float range
        return False


def shown(v: Any) -> str:
    """A value for an error message: huge integers as their order of magnitude, long reprs cut."""
    if _is_int(v) and abs(v).bit_length() > 64:
        return f"{'-' if v < 0 else ''}~1e{int(abs(v).bit_length() * math.log10(2))}"
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


class HFConfig:
    """Typed reading of one config dict (or a nested sub-configuration) under the rule above.

    data: the parsed JSON object; where: the file (or preset) it came from, for messages;
    model_type: the architecture whose aliases apply (default: data["model_type"]).
    defaults_used: "field=value" for every absent field a default filled in, and every field derived
    from others (`moelab.config.hf_arch`: head_dim, a null num_key_value_heads); a sub-configuration (`sub`)
    shares its parent's list.
    """

    def __init__(self, data: dict[str, Any], where: str = "config.json", model_type: str | None = None,
                 defaults_used: list[str] | None = None, prefix: str = "") -> None:
        self.data, self.where = data, where
        self.model_type = data.get("model_type") if model_type is None else model_type
        self.defaults_used = [] if defaults_used is None else defaults_used
        self._prefix = prefix  # "attn_config." for a sub-configuration, in recorded defaults

    def error(self, msg: str) -> ValueError:
        return ValueError(f"{self.where} (model_type {self.model_type!r}): {msg}")

    def _key(self, name: str) -> str | None:
        """The key holding `name` (its own or an alias), or None when absent."""
        return next((k for k in (name, *ALIASES.get(self.model_type, {}).get(name, ())) if k in self.data), None)

    def raw(self, name: str, default: Any = None) -> Any:
        """The value as written (null included), or `default` when absent; no check."""
        key = self._key(name)
        return default if key is None else self.data[key]

    def record(self, name: str, value: Any) -> None:
        """Note that `name` took `value` by default or derivation (listed in `notes()`)."""
        self.defaults_used.append(f"{self._prefix}{name}={value}")

    def _read(self, name: str, default: Any, null: Any, allowed: str) -> tuple[Any, bool]:
        """(value, True) when written and not null; (default / null meaning, False) otherwise."""
        key = self._key(name)
        if key is None:
            if default is REQUIRED:
                raise self.error(f"required field {name!r} is missing")
            self.record(name, repr(default))
            return default, False
        if self.data[key] is None:
            if null is REFUSED:
                raise self.error(f"field {name!r}=None is invalid: allowed {allowed}")
            return null, False
        return self.data[key], True

    def int(self, name: str, default: Any = REQUIRED, *, minimum: int = 1, null: Any = REFUSED) -> int:
        """An integer in [minimum, its upper bound] (bounds in the module docstring)."""
        maximum = MAX_LAYERS if name in _LAYER_FIELDS else MAX_EXPERTS if name in _EXPERT_FIELDS else MAX_INT
        allowed = f"an integer >= {minimum} and <= {maximum}"
        value, given = self._read(name, default, null, allowed)
        if given and not (_is_int(value) and minimum <= value <= maximum):
            raise self.error(f"field {name!r}={shown(value)} is invalid: allowed {allowed}")
        return value

    def opt_int(self, name: str, default: Any = REQUIRED, *, minimum: int = 1) -> int | None:
        """An integer, or None for an explicit null (a field whose null has a meaning)."""
        return self.int(name, default, minimum=minimum, null=None)

    def float(self, name: str, default: Any = REQUIRED, *, null: Any = REFUSED) -> float:
        value, given = self._read(name, default, null, "a finite number")
        if given:
            if not is_finite_number(value):
                raise self.error(f"field {name!r}={shown(value)} is invalid: allowed a finite number")
            return float(value)
        return value

    def bool(self, name: str, default: Any = REQUIRED, *, null: Any = REFUSED) -> bool:
        value, given = self._read(name, default, null, "true or false")
        if given and not isinstance(value, bool):
            raise self.error(f"field {name!r}={shown(value)} is invalid: allowed true or false")
        return value

    def int_list(self, name: str, default: Any = REQUIRED, *, null: Any = REFUSED) -> list[int]:
        value, given = self._read(name, default, null, "a list of integers")
        if given and not (isinstance(value, list) and all(_is_int(v) for v in value)):
            raise self.error(f"field {name!r}={shown(value)} is invalid: allowed a list of integers")
        return value

    def str_list(self, name: str, length: int, allowed: tuple[str, ...]) -> list[str] | None:
        """An optional list of `length` per-layer strings (e.g. `layer_types`); None when absent or null."""
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != length or not all(v in allowed for v in value):
            raise self.error(f"field {name!r} is invalid: allowed a list of {length} values from {list(allowed)}")
        return value

    def sub(self, key: str) -> HFConfig:
        """The nested sub-configuration `key` (DBRX's attn_config, Llama 4's text_config)."""
        value = self.data.get(key)
        if not isinstance(value, dict):
            raise self.error(f"field {key!r} is {'missing' if value is None else 'not an object'}; it must hold "
                             "the sub-configuration")
        return HFConfig(value, f"{self.where}[{key}]", self.model_type, self.defaults_used, f"{key}.")

    def require(self, name: str, ok: Any, allowed: str, default: Any = None) -> None:
        """Refuse an option moelab does not implement: ValueError unless `ok(value)` (`default` when absent)."""
        value = self.raw(name, default)
        if not ok(value):
            raise self.error(f"field {name!r}={shown(value)} is not supported by moelab: allowed {allowed}")

    def notes(self) -> tuple[str, ...]:
        if not self.defaults_used:
            return ()
        return ("transformers defaults used for absent (or null) fields: " + ", ".join(self.defaults_used),)


def load_json(file: Path) -> dict[str, Any]:
    """A JSON object from `file`; ValueError naming the file when it is unreadable, not JSON or not an object."""
    try:
        data = json.loads(file.read_text())
    except ValueError as e:  # JSONDecodeError, or an integer of more digits than Python converts
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: a config must be a JSON object, got {type(data).__name__}")
    return data
