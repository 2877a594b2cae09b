"""The in-tree adapters: the numpy reference, array-api-strict, torch and JAX.

torch and JAX are imported inside the adapters' methods, so loading this module (or the numpy
adapter) never imports them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from muon_core import MuonConfig, Plan, plan, reference_step
from muon_conformance.adapter import BF16, FLOAT64, BackendUnavailable


def _numpy_copies(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {name: np.array(a, copy=True) for name, a in arrays.items()}


@dataclasses.dataclass
class ReferenceHandle:
    """Parameters, state, config and plan of a reference-step optimizer."""

    params: dict[str, Any]
    state: dict[str, dict[str, Any]] | None
    config: MuonConfig
    plan: Plan


class NumpyAdapter:
    """`muon_core.reference_step` on numpy arrays, in the arrays' own dtype."""

    name = "numpy"
    capabilities = frozenset({FLOAT64})

    def to_native(self, array: np.ndarray) -> Any:
        """A native array holding a copy of `array`."""
        return np.array(array, copy=True)

    def to_numpy(self, array: Any) -> np.ndarray:
        """A numpy copy of a native array."""
        return np.array(array, copy=True)

    def _native(self, arrays: Mapping[str, Any]) -> dict[str, Any]:
        return {name: self.to_native(np.asarray(a)) for name, a in arrays.items()}

    def make(self, params: Mapping[str, Any], config: MuonConfig) -> ReferenceHandle:
        """A handle over native copies of `params` with empty state."""
        shapes = {name: tuple(np.shape(p)) for name, p in params.items()}
        return ReferenceHandle(self._native(params), None, config, plan(shapes, config))

    def step(self, handle: ReferenceHandle, grads: Mapping[str, Any]) -> ReferenceHandle:
        """One `reference_step`."""
        handle.params, handle.state = reference_step(
            handle.params, self._native(grads), handle.state, handle.config, handle.plan)
        return handle

    def params(self, handle: ReferenceHandle) -> dict[str, np.ndarray]:
        """numpy copies of the parameters."""
        return {name: self.to_numpy(p) for name, p in handle.params.items()}

    def state(self, handle: ReferenceHandle) -> dict[str, dict[str, Any]]:
        """The reference state with numpy arrays."""
        return {name: {key: value if key == "step" else self.to_numpy(value)
                       for key, value in entry.items()}
                for name, entry in (handle.state or {}).items()}

    def save(self, handle: ReferenceHandle) -> dict[str, dict[str, Any]]:
        """The state as numpy arrays (picklable)."""
        return self.state(handle)

    def restore(self, params: Mapping[str, Any], config: MuonConfig,
                saved: Mapping[str, Mapping[str, Any]]) -> ReferenceHandle:
        """A handle over `params` with the saved state."""
        handle = self.make(params, config)
        handle.state = {name: {key: value if key == "step" else self.to_native(value)
                               for key, value in entry.items()}
                        for name, entry in copy.deepcopy(dict(saved)).items()}
        return handle


class StrictAdapter(NumpyAdapter):
    """`muon_core.reference_step` on array-api-strict arrays: proves the core uses only the
    Array API standard."""

    name = "array_api_strict"

    def __init__(self) -> None:
        try:
            import array_api_strict
        except ImportError as exc:
            raise BackendUnavailable(f"array-api-strict is not installed ({exc}); "
                                     "try: pip install array-api-strict") from exc
        self.xp = array_api_strict

    def to_native(self, array: np.ndarray) -> Any:
        """An array-api-strict copy of `array`."""
        return self.xp.asarray(np.array(array, copy=True))

    def to_numpy(self, array: Any) -> np.ndarray:
        """A numpy copy through DLPack."""
        return np.array(np.from_dlpack(array), copy=True)
