"""Config fields as command-line flags: one flag per field of ModelConfig, MoEConfig (prefixed `moe-`) and
TrainConfig, its help text from the class docstring, its value parsed by the field's annotation; FIELD=VALUE
settings; the training-preset check; the range checks of the commands' own options (--group-size, --max-memory-gb,
--seq-len, ...). Used by `moelab.cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from moelab.config.fields import field_help
from moelab.config.model import ModelConfig, MoEConfig
from moelab.config.train import PRESETS, TrainConfig, preset

_SKIP = {ModelConfig: {"moe"}, MoEConfig: {"d_model"}, TrainConfig: set()}
_PREFIX = {ModelConfig: "", MoEConfig: "moe-", TrainConfig: ""}
_KEY_PREFIX = {ModelConfig: "", MoEConfig: "moe.", TrainConfig: ""}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


class FieldType:
    """argparse `type=` for a config field: parses by the field's annotation ("int", "float | None", ...);
    a bad value becomes "argument --x: 'abc' is not an integer" (argparse prints the message as it is)."""

    def __init__(self, type_name: str) -> None:
        self.optional = "None" in type_name
        self.base = type_name.replace(" | None", "").strip()
        self.__name__ = self.base  # argparse names the type in some messages

    def __call__(self, text: str) -> Any:
        if self.optional and text.lower() in ("none", "null"):
            return None
        try:
            if self.base == "bool":
                return {"1": True, "true": True, "yes": True, "on": True,
                        "0": False, "false": False, "no": False, "off": False}[text.lower()]
            if self.base == "int":
                return int(text)
            if self.base == "float":
                return float(text)
            if self.base == "RopeScaling":
                value = json.loads(text)
                if not isinstance(value, dict):
                    raise ValueError
                return value
        except (KeyError, ValueError):
            want = _TYPE_WORDS.get(self.base, "a JSON object such as '{\"factor\": 4, \"original_max_seq_len\": 256}'")
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}{' (or none)' if self.optional else ''}") from None
        return text


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, its help taken from the config class's docstring, with the default under
    the tiny preset and the allowed values."""
    tiny_model, tiny_train = preset("tiny")
    defaults = {ModelConfig: tiny_model, MoEConfig: tiny_model.moe, TrainConfig: tiny_train}
    for cls in (ModelConfig, MoEConfig, TrainConfig):
        docs = field_help(cls)
        group = parser.add_argument_group(
            f"{cls.__name__} fields (default: the --preset's value; on --resume, the run's value)")
        for f in dataclasses.fields(cls):
            if f.name in _SKIP[cls]:
                continue
            choices = f.metadata.get("choices")
            default = getattr(defaults[cls], f.name)
            shown = json.dumps(default.to_dict()) if hasattr(default, "to_dict") else default
            help_text = docs.get(f.name, "").replace("%", "%%") + f" (default with --preset tiny: {shown}"
            help_text += f"; allowed: {', '.join(choices)})" if choices else ")"
            type_fn = FieldType(str(f.type))
            metavar = None if choices else "JSON" if type_fn.base == "RopeScaling" else type_fn.base.upper()
            group.add_argument(f"--{_PREFIX[cls]}{f.name.replace('_', '-')}", dest=f"cfg:{_KEY_PREFIX[cls]}{f.name}",
                               type=type_fn, default=None, choices=choices, help=help_text, metavar=metavar)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line (flags left out are None)."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}


def check_preset(name: str | None) -> None:
    if name is None or name in PRESETS:
        return
    from moelab.accounting.presets import is_preset

    hint = (f" ({name!r} is a published model's config for `moelab card {name}`, too large to train here: train "
            "a small model of its shape with the field flags, e.g. --moe-n-experts / --moe-top-k)"
            if is_preset(name) else "")
    raise ValueError(f"--preset {name!r} is not a training preset: allowed {', '.join(sorted(PRESETS))}{hint}")


def setting(text: str) -> tuple[str, Any]:
    """`FIELD=VALUE` (a ModelConfig/TrainConfig field, or moe.FIELD) → (key, value parsed by the field's type)."""
    key, sep, value = text.partition("=")
    cls, name = (MoEConfig, key[4:]) if key.startswith("moe.") else (None, key)
    fields = {f.name: f for c in ((cls,) if cls else (ModelConfig, TrainConfig)) for f in dataclasses.fields(c)}
    if not sep or name not in fields:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=VALUE with a config field (e.g. lr=0.01, "
                                         "moe.n_experts=64); see moelab train --help for the fields")
    return key, FieldType(str(fields[name].type))(value)


def group_size_flag(args: argparse.Namespace) -> int:
    """--group-size, which applies to --quant int4 only (given otherwise it would do nothing: refused)."""
    if args.group_size is not None and args.quant != "int4":
        where = "with --quant int8 (per output channel)" if args.quant else "without --quant"
        raise ValueError(f"--group-size {args.group_size} applies with --quant int4 only (groups of 32, 64, 128 or "
                         f"256 weights); {where} it would do nothing: drop it")
    return 32 if args.group_size is None else args.group_size


def check_budget_fits_machine(max_memory_gb: float | None) -> None:
    """ValueError when --max-memory-gb exceeds this machine's physical memory (a budget it cannot keep to: it
    would hold every expert and say nothing). Where the memory size is unknown, no bound."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return
    if max_memory_gb is not None and max_memory_gb > total / 1e9:
        raise ValueError(f"--max-memory-gb {max_memory_gb:g} is more than this machine's memory: allowed a number "
                         f"of GB > 0 and at most {total / 1e9:.2f} (or leave it out: the whole model in memory)")


def at_least(flag: str, value: int | None, low: int, what: str = "") -> None:
    """ValueError naming the flag when an integer option is below `low`."""
    if value is not None and value < low:
        raise ValueError(f"{flag} {value} is invalid: allowed an integer >= {low}{what}")


def seq_len_fits(flag: str, value: int | None, model) -> None:
    """ValueError naming the flag when a sequence length is outside 1..the model's max_seq_len."""
    limit = model.cfg.max_seq_len
    if value is not None and not 1 <= value <= limit:
        raise ValueError(f"{flag} {value} is invalid: allowed 1..{limit} (the model's max_seq_len)")
