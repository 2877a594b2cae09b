"""Backends found through the `muon_core.backends` entry point group, loaded lazily."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

GROUP = "muon_core.backends"
INSTALL_HINTS = {"torch": 'pip install "muon-core[torch]"', "jax": 'pip install "muon-core[jax]"',
                 "array_api_strict": "pip install array-api-strict", "numpy": "pip install numpy"}


def available_backends() -> list[str]:
    """Names registered under the `muon_core.backends` entry point group (nothing imported)."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def load_backend(name: str) -> Any:
    """Import and return the object registered as backend `name`.

    Fails with the list of known names, or with an install hint when the backend's
    framework is missing.
    """
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not matches:
        raise ValueError(f"backend={name!r} is not registered: expected one of "
                         f"{available_backends()} (entry point group {GROUP!r})")
    try:
        return matches[0].load()
    except ImportError as exc:
        hint = INSTALL_HINTS.get(name, f"install the package that provides backend {name!r}")
        raise ImportError(f"backend {name!r} could not be imported ({exc}); try: {hint}") from exc
