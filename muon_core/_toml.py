"""A small TOML writer for the config's plain values (the standard library only reads TOML)."""

from __future__ import annotations

import json
from typing import Any


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} value {value!r} as TOML")


def dumps_toml(data: dict[str, Any]) -> str:
    """Write a mapping whose values are scalars, lists, tables or lists of tables."""
    scalars, tables, table_lists = [], [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            table_lists.append((key, value))
        else:
            scalars.append(f"{key} = {_value(value)}")
    lines = scalars
    for key, table in tables:
        lines += ["", f"[{key}]"] + [f"{k} = {_value(v)}" for k, v in table.items()]
    for key, items in table_lists:
        for table in items:
            lines += ["", f"[[{key}]]"] + [f"{k} = {_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
