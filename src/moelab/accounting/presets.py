"""Presets: the public `config.json` of well-known models, shipped as data in `moelab/presets/`.

Each `<name>.json` holds the model's Hugging Face config (its public hyperparameters) and one extra
key, `_moelab`, with where the config comes from and the vendor's published parameter figures (used
by `moelab card` to show computed vs published, and by the tests). `spec_of_name` also accepts the
names of moelab's training presets (`moelab.config.PRESETS`: the models `moelab train --preset` builds).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from moelab.accounting.spec import ModelSpec, spec_from_model_config
from moelab.config.train import PRESETS, preset


def _files() -> dict[str, Any]:
    root = resources.files("moelab") / "presets"
    return {p.name[: -len(".json")]: p for p in root.iterdir() if p.name.endswith(".json")}


def list_presets() -> list[str]:
    """Names of the shipped presets, sorted."""
    return sorted(_files())


def _normalise(name: str) -> str:
    return name.strip().lower()


def is_preset(name: str) -> bool:
    return _normalise(name) in _files()


def load_preset(name: str) -> dict[str, Any]:
    """The preset's config dict (including its `_moelab` metadata); ValueError if unknown."""
    files = _files()
    key = _normalise(name)
    if key not in files:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(files))}")
    try:
        data = json.loads(files[key].read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"preset {key!r}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"preset {key!r}: a config must be a JSON object")
    return data


def published(name: str) -> dict[str, Any] | None:
    """The vendor's published figures for a preset (`_moelab.published`), or None."""
    return load_preset(name).get("_moelab", {}).get("published")


def load_preset_spec(name: str) -> ModelSpec:
    from moelab.accounting.hf_configs import spec_from_dict

    return spec_from_dict(load_preset(name), name=_normalise(name), where=f"preset {_normalise(name)!r}")


def spec_of_name(name: str) -> ModelSpec:
    """The ModelSpec of a shipped preset (a Hugging Face config) or of a training preset (the
    `ModelConfig` that `moelab.config.preset(name)` builds); ValueError listing both kinds otherwise."""
    if is_preset(name):
        return load_preset_spec(name)
    if name in PRESETS:
        return spec_from_model_config(preset(name)[0], name=name)
    raise ValueError(f"{name!r} is neither an existing config.json / model directory nor a preset name; presets: "
                     f"{', '.join(list_presets())} (Hugging Face configs); training presets: "
                     f"{', '.join(sorted(PRESETS))} (moelab models, as `moelab train --preset` builds them)")
