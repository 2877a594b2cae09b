"""The NaN/Inf policy: detect non-finite gradients, refuse the step, raise or record it."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from muon_core import step_allowed
from muon_jax._hyper import is_traced


@dataclasses.dataclass(frozen=True, eq=False)
class LeafLabels:
    """Names and shapes of the leaves a `NonfiniteRecord` reports on (static metadata).

    Labels with no leaves equal any labels: `optax.tree_utils.tree_map_params` calls `init`
    on a leafless placeholder and matches the resulting state against the real one.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LeafLabels):
            return NotImplemented
        return not self.names or not other.names or (
            (self.names, self.shapes) == (other.names, other.shapes))

    def __hash__(self) -> int:
        return hash(LeafLabels)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["count", "latest"],
                   meta_fields=["labels"])
@dataclasses.dataclass(frozen=True)
class NonfiniteRecord:
    """Steps refused for NaN/Inf so far (`count`), and which leaves (`names`, in order) had
    NaN/Inf in the latest step (`latest`, a bool vector); read it with `raise_if_nonfinite`."""

    count: jax.Array
    latest: jax.Array
    labels: LeafLabels

    @property
    def names(self) -> tuple[str, ...]:
        """The leaf names, in the order of `latest`."""
        return self.labels.names

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """The leaf shapes, in the order of `latest`."""
        return self.labels.shapes


def fresh_record(names: list[str], leaves: list[Any]) -> NonfiniteRecord:
    """A record with no refused step, for these leaves."""
    labels = LeafLabels(tuple(names), tuple(tuple(jnp.shape(x)) for x in leaves))
    return NonfiniteRecord(jnp.zeros([], jnp.int32), jnp.zeros(len(names), bool), labels)


def _raise_nonfinite(bad: Any, names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...]):
    listed = [n for n, flag in zip(names, np.asarray(bad)) if flag]
    step_allowed(listed, dict(zip(names, shapes)), "raise")


def raise_if_nonfinite(state: Any) -> None:
    """Raise FloatingPointError, naming the leaves, when the latest step was refused for NaN/Inf.

    For jitted steps under `nonfinite="raise"` with several devices, where the step itself
    cannot raise; `state` may be any optax state that contains a muon_jax state.
    """
    records = [r for r in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, NonfiniteRecord))
               if isinstance(r, NonfiniteRecord)]
    for record in records:
        _raise_nonfinite(record.latest, record.names, record.shapes)


def all_finite(x: jax.Array) -> jax.Array:
    """Whether every entry of `x` is finite, without a boolean array of `x`'s size: `x * 0`
    is 0 where `x` is finite and NaN elsewhere, and a sum of zeros cannot overflow."""
    return jnp.isfinite(jnp.sum(x * jnp.zeros((), x.dtype)))


def finite_gate(names: list[str], grads: list[Any], record: NonfiniteRecord,
                policy: str) -> tuple[Any, NonfiniteRecord]:
    """(all gradients finite, updated record), after applying the `nonfinite` policy.

    Eager, "raise" raises FloatingPointError at once. Under jit a Python raise is impossible:
    on a single device a host callback raises the same message when the step runs (JAX
    reports it as a JaxRuntimeError and returns nothing). With several devices a raising
    callback would leave the other devices waiting in their collectives, so the step is only
    refused and recorded; `raise_if_nonfinite(state)` raises afterwards. A refused step
    returns zero updates and keeps the moments (the whole of the "skip" policy): the caller
    passes the flag to every stateful transformation, which keeps its own state.
    """
    if tuple(names) != record.names:
        raise ValueError(f"state.nonfinite was made for leaves {list(record.names)}, but the "
                         f"updates have {names}: was the state made by init on these parameters?")
    bad = ~jnp.stack([all_finite(g) for g in grads]) if grads else record.latest
    if policy == "raise" and not is_traced(bad):
        _raise_nonfinite(bad, record.names, record.shapes)
    elif policy == "raise" and jax.device_count() == 1:
        jax.debug.callback(functools.partial(_raise_nonfinite, names=record.names,
                                             shapes=record.shapes), bad)
    ok = ~jnp.any(bad)
    return ok, dataclasses.replace(record, count=record.count + (~ok).astype(jnp.int32),
                                   latest=bad)


def select(ok: Any, new: Any, old: Any) -> Any:
    """`new` where `ok`, else `old`, leaf by leaf."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
