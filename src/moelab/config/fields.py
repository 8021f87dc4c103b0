"""What moelab's config dataclasses share: the field validators (each failure a ValueError naming the field,
the value and what is allowed), the JSON round trip (`_JsonMixin`) and `field_help`, which turns a config's
"Fields:" docstring into the command line's help. No torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{field_name}={value!r} is invalid: allowed {allowed}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(name, value, "an integer >= 1")


def _nonneg_number(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
        _fail(name, value, "a finite number >= 0")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(name, value, "one of " + ", ".join(repr(a) for a in allowed))


class _JsonMixin:
    """`to_dict` / `from_dict` / JSON file helpers shared by the config dataclasses."""

    # fields written to JSON only when they differ from their default: a config that does not use them
    # reads and compares (resume) like one written before they existed
    _OMIT_DEFAULTS: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        for name in self._OMIT_DEFAULTS:
            if d[name] == defaults[name]:
                del d[name]
        for name in d:  # nested configs by their own rule
            if isinstance(getattr(self, name), _JsonMixin):
                d[name] = getattr(self, name).to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; allowed fields: {sorted(names)}")
        return cls(**data)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path):
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data)


def field_help(cls: type) -> dict[str, str]:
    """{field: description} from the "Fields:" section of a config class's docstring (one entry per name;
    a line "a / b: text" describes both a and b), so that the command line's help is the documentation."""
    doc = (cls.__doc__ or "").split("Fields:", 1)
    if len(doc) < 2:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    for line in doc[1].splitlines():
        head = re.match(r"^ {8}([a-z_][a-z0-9_ /]*):\s(.*)$", line)
        if head:
            names = [n.strip() for n in head.group(1).split("/")]
            for n in names:
                out[n] = head.group(2).strip()
        elif line.startswith(" " * 12) and names:
            for n in names:
                out[n] += " " + line.strip()
    return out
