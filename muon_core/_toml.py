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


def _table(data: dict[str, Any], path: str) -> list[str]:
    """Lines of the table at `path` (dotted; "" for the top level): its scalars, then its
    sub-tables and lists of tables. None values are left out (TOML has no null)."""
    scalars, tables, table_lists = [], [], []
    for key, value in data.items():
        name = f"{path}.{key}" if path else key
        if value is None:
            continue
        if isinstance(value, dict):
            tables += ["", f"[{name}]"] + _table(value, name)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for table in value:
                table_lists += ["", f"[[{name}]]"] + _table(table, name)
        else:
            scalars.append(f"{key} = {_value(value)}")
    return scalars + tables + table_lists


def dumps_toml(data: dict[str, Any]) -> str:
    """Write a mapping whose values are scalars, lists, tables or lists of tables."""
    return "\n".join(_table(data, "")) + "\n"
