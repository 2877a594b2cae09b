"""Backends found through the `muon_core.backends` entry point group, loaded lazily."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

GROUP = "muon_core.backends"
# The muon-core extra that installs each optional import.
EXTRAS = {"torch": "torch", "jax": "jax", "jaxlib": "jax", "optax": "jax", "tqdm": "cli",
          "matplotlib": "cli", "numpy": "cli", "pytest": "conformance",
          "hypothesis": "conformance", "array_api_strict": "conformance"}


def install_hint(module: str | None) -> str | None:
    """`pip install "muon-core[EXTRA]"` for an optional module (its top-level name), else None."""
    extra = EXTRAS.get((module or "").partition(".")[0])
    return f'pip install "muon-core[{extra}]"' if extra else None


def available_backends() -> list[str]:
    """Names registered under the `muon_core.backends` entry point group (nothing imported)."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def registered_name(name: str) -> str:
    """The registered spelling of backend `name`: as given, or with dashes as underscores (the
    package index's spelling, `array-api-strict`). Fails with one line listing the names."""
    known = available_backends()
    for candidate in (name, name.replace("-", "_")):
        if candidate in known:
            return candidate
    raise ValueError(f"backend={name!r} is not registered: expected one of {known} "
                     f"(entry point group {GROUP!r})")


def load_backend(name: str) -> Any:
    """Import and return the object registered as backend `name` (see `registered_name`).

    Fails with the list of known names, or with an install hint when the backend's
    framework is missing.
    """
    name = registered_name(name)
    entry = next(ep for ep in entry_points(group=GROUP) if ep.name == name)
    try:
        return entry.load()
    except ImportError as exc:
        hint = install_hint(getattr(exc, "name", None)) or install_hint(name) or \
            f"install the package that provides backend {name!r}"
        raise ImportError(f"backend {name!r} could not be imported ({exc}); try: {hint}") from exc
