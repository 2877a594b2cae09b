"""muon_conformance: one suite that checks every Muon backend against the specification.

A backend writes one `BackendAdapter` class and registers it under the `muon_core.backends`
entry point group; `python -m muon_conformance --backend NAME` then runs every check, and
`parametrize_with_checks` runs them inside a project's own tests. Importing this package loads
neither numpy nor any framework; the checks load when first used.
"""

from __future__ import annotations

from typing import Any

from muon_conformance.adapter import (
    BF16, CAPABILITIES, DISTRIBUTED, FLOAT64, BackendAdapter, BackendUnavailable, load_adapter,
)
from muon_conformance.plugin import parametrize_with_checks, read_known_failures

_LAZY = {"run_checks": "checks", "collect": "checks", "check_names": "checks",
         "ConformanceFailure": "oracle", "main": "cli"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"muon_conformance.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'muon_conformance' has no attribute {name!r}")


__all__ = ["BF16", "CAPABILITIES", "DISTRIBUTED", "FLOAT64", "BackendAdapter",
           "BackendUnavailable", "ConformanceFailure", "check_names", "collect", "load_adapter",
           "main", "parametrize_with_checks", "read_known_failures", "run_checks"]
