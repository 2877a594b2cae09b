"""The `BackendAdapter` protocol: the one class a backend writes to be checked by the suite.

Everything crosses the boundary as numpy arrays in torch layout `(out, in, ...)`, so the suite
never imports a framework; the adapter converts to and from its native arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

# Capabilities an adapter may declare; checks that need one are skipped without it.
BF16 = "bf16"                 # Newton-Schulz with ns_dtype="bfloat16"
FLOAT64 = "float64"           # float64 parameters and ns_dtype="float64"
DISTRIBUTED = "distributed"   # `run_distributed` (processes or devices) equals one process
QK_CLIP = "qk_clip"           # `qk_clip(handle, qk_max, config)` rescales as muon_core.qk_clip
QK_MAX = "qk_max"             # `qk_max(q, k, scale, mask)` measures as muon_core.max_logits
LR_SCHEDULE = "lr_schedule"   # `make_scheduled(params, config, lrs)`: learning rates per step
PARAM_GROUPS = "param_groups"  # `make_groups(params, config, groups, lrs)`: options per group
LEGACY_STATE = "legacy_state"  # `save_legacy(handle)`: a snapshot in an older format
PORTABLE = "portable_checkpoint"  # `save_portable(handle, path)`, `restore_portable(...)`
OWNERS = "owners"             # `owners(params, config, world_size)`: each matrix's rank
TENSOR_PARALLEL = "tensor_parallel"  # `run_tensor_parallel(...)`: cut matrices, each tp_mode
CAPABILITIES = frozenset({BF16, FLOAT64, DISTRIBUTED, QK_CLIP, QK_MAX, LR_SCHEDULE,
                          PARAM_GROUPS, LEGACY_STATE, PORTABLE, OWNERS, TENSOR_PARALLEL})


@runtime_checkable
class BackendAdapter(Protocol):
    """How the conformance suite drives one backend.

    `params` and `grads` map parameter names to numpy arrays (float32, or float64 with the
    "float64" capability); the adapter must copy what it keeps and never modify them. A handle
    is whatever the adapter needs between calls (an optimizer, a pytree and its state, ...).
    Optional: `run_distributed(params, config, grads, world_size) -> params` for the
    "distributed" capability, the final parameters after all steps on `world_size` workers
    (an adapter with several ways to distribute lists their names in `distributed_modes` and
    takes `mode=NAME`; the check runs each);
    `qk_clip(handle, qk_max, config) -> handle` for the "qk_clip" capability, QK-clip with
    `qk_max` (attention layer name -> numpy per-head maxima) as `muon_core.qk_clip` does it;
    `qk_max(q, k, scale=None, mask=None) -> numpy (heads,)` for "qk_max", the backend's own
    measurement of the largest logit per query head, `q` `(..., heads, queries, dim)` and `k`
    `(..., kv_heads, keys, dim)` as torch's attention takes them (any number of leading axes,
    none included);
    `make_scheduled(params, config, lrs) -> handle` for "lr_schedule", a handle whose step `i`
    uses the Muon and AdamW learning rates `lrs[i]` (a pair), set the way the backend's
    schedulers set them;
    `make_groups(params, config, groups, lrs=None) -> handle` for "param_groups": `groups` is a
    list of `(names, overrides)`, overrides in `MuonConfig.with_overrides`' form applied to
    those parameters; with `lrs` the config's two learning rates follow `lrs` per step and a
    group that sets its own keeps it;
    `save_legacy(handle)` for "legacy_state", a snapshot as an older release of the backend
    wrote it, which `restore` must accept;
    `save_portable(handle, path)` and `restore_portable(params, config, path) -> handle` for
    "portable_checkpoint", the `muon_core` checkpoint file (layout `"out_in"`);
    `owners(params, config, world_size) -> {name: rank}` for "owners", the rank that
    orthogonalizes each Muon matrix when the step is distributed;
    `run_tensor_parallel(params, grads, world_size, runs) -> [params, ...]` for
    "tensor_parallel": for each run `(config, cuts)` the final parameters after all steps on
    `world_size` tensor-parallel ranks, each parameter named in `cuts` (`{name: axis}`) cut into
    contiguous pieces along that axis (`muon_core.chunk_sizes`), one piece per rank, the others
    whole on every rank, stepped in `config.tp_mode` (an adapter supporting only some
    `tp_mode`s lists them in `tp_modes`).
    """

    name: str
    capabilities: frozenset[str]

    def make(self, params: Mapping[str, Any], config: Any) -> Any:
        """A fresh optimizer over copies of `params` for `config` (a `muon_core.MuonConfig`)."""

    def step(self, handle: Any, grads: Mapping[str, Any]) -> Any:
        """Apply one step with `grads`; return the handle to use next (the same or a new one)."""

    def params(self, handle: Any) -> dict[str, Any]:
        """The current parameters as numpy arrays (copies)."""

    def state(self, handle: Any) -> dict[str, dict[str, Any]]:
        """The state in the reference's format: `{name: {"momentum_buffer": array}}` for Muon,
        `{name: {"step": int, "exp_avg": array, "exp_avg_sq": array}}` for AdamW."""

    def save(self, handle: Any) -> Any:
        """A picklable snapshot of the optimizer state (the backend's own checkpoint format)."""

    def restore(self, params: Mapping[str, Any], config: Any, saved: Any) -> Any:
        """A handle over copies of `params` whose optimizer state is loaded from `saved`."""


def missing_methods(adapter: Any) -> list[str]:
    """Names of protocol attributes that `adapter` lacks."""
    needed = ("name", "capabilities", "make", "step", "params", "state", "save", "restore")
    return [attr for attr in needed if not hasattr(adapter, attr)]


def unknown_capabilities(capabilities: Sequence[str]) -> list[str]:
    """Declared capabilities the suite does not know (probably misspelt)."""
    return sorted(set(capabilities) - CAPABILITIES)


class BackendUnavailable(ImportError):
    """The backend's framework or API is missing; the suite skips with this message."""


def load_adapter(spec: Any) -> Any:
    """An adapter instance from a registered backend name, a `"module:attribute"` path, an
    adapter class or an adapter instance."""
    if isinstance(spec, str):
        spec = _import_target(spec)
    adapter = spec() if isinstance(spec, type) else spec
    missing = missing_methods(adapter)
    if missing:
        raise TypeError(f"{adapter!r} is not a BackendAdapter: it lacks {missing}")
    return adapter


def _import_target(spec: str) -> Any:
    if ":" in spec:
        import importlib

        module, _, attr = spec.partition(":")
        return getattr(importlib.import_module(module), attr)
    from muon_core import load_backend

    try:
        return load_backend(spec)
    except ImportError as exc:
        raise BackendUnavailable(str(exc)) from exc
