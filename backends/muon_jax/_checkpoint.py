"""The portable checkpoint (see `muon_core.save_checkpoint`) for `muon` states: `save`, `load`.

With several JAX processes (`jax.distributed`) both are collective: every process calls them
with the same arguments. `save` gathers each array whole and process 0 writes the file; `load`
reads the file on every process, which builds only the shards on its own devices; a failure on
any process raises on every process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from jax.experimental import multihost_utils
from muon_core import MuonConfig
from muon_core import _checkpoint as ckpt

from muon_jax._plan import flatten, plan_leaves

# Checkpoint state key -> (optax state class, field) holding that buffer, params-shaped.
BUFFERS = {"momentum_buffer": ("ScaleByMuonState", "momentum_buffer"),
           "exp_avg": ("ScaleByAdamState", "mu"), "exp_avg_sq": ("ScaleByAdamState", "nu")}
COUNT = ("ScaleByAdamState", "count")
# NorMuon/AdaMuon second moments: a dict, Muon leaf name -> array.
SECOND_MOMENT = ("ScaleByMuonState", "second_moment")
NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
                "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
CODES = {np.dtype(d): code for code, d in NUMPY_DTYPES.items()}
# Bytes of an error message that a failing process shares with the others.
MESSAGE_BYTES = 2048
T = TypeVar("T")


def _where(owner: str):
    return lambda path, _: bool(path) and getattr(path[-1], "tuple_name", None) == owner


def _field(state: Any, owner: str, field: str) -> Any:
    return optax.tree_utils.tree_get(state, field, filtering=_where(owner))


def _plan(params: Any, config: MuonConfig | None, layout: str,
          algorithms: Mapping[str, str] | None, names: Mapping[str, str] | None):
    leaf_names, leaves, _ = flatten(params)
    plan = plan_leaves(leaf_names, leaves, config or MuonConfig(), layout, algorithms)
    saved = ckpt.renamed(plan, names)
    return {e.name: s for e, s in zip(plan, saved)}, saved


def _whole(x: jax.Array) -> np.ndarray:
    """`x` whole in this process's memory. An array spanning several processes is gathered
    from all of them: a collective, which every process calls for the same arrays in order."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _on_every_process(action: Callable[[], T]) -> T:
    """`action()`, raising on every process when it raises on any (a collective with several
    processes): a process that did not fail raises RuntimeError with the failing one's
    message."""
    if jax.process_count() == 1:
        return action()
    result, error = None, None
    try:
        result = action()
    except Exception as caught:  # shared with the other processes, then raised again below
        error = caught
    message = np.zeros(MESSAGE_BYTES + 1, np.uint8)
    if error is not None:
        text = f"{type(error).__name__}: {error}".encode()[:MESSAGE_BYTES]
        message[0], message[1:len(text) + 1] = 1, np.frombuffer(text, np.uint8)
    shared = np.asarray(multihost_utils.process_allgather(message))
    if error is not None:
        raise error
    failed = [process for process, row in enumerate(shared) if row[0]]
    if failed:
        text = bytes(shared[failed[0], 1:]).rstrip(b"\0").decode(errors="replace")
        raise RuntimeError(f"process {failed[0]} failed: {text}")
    return result


def _to_stored(x: Any, entry: Any, layout: str) -> ckpt.Tensor:
    """`x`, gathered whole, in the canonical layout, as bytes."""
    array = _whole(x)
    # np.array, not np.ascontiguousarray, which makes a 0-d array 1-d
    array = np.array(np.transpose(array, ckpt.stored_perm(entry, array.shape, layout)), order="C")
    return ckpt.Tensor(CODES[array.dtype], array.shape, array.tobytes())


def _leaves(state: Any) -> dict[str, dict[str, Any]]:
    """Checkpoint state key -> {leaf name: array} of the buffers `state` has."""
    found = {}
    for key, (owner, field) in BUFFERS.items():
        tree = _field(state, owner, field)
        if tree is not None:
            found[key] = dict(zip(*flatten(tree)[:2]))
    moments = _field(state, *SECOND_MOMENT)
    if moments:
        found["second_moment"] = dict(moments)
    return found


def save(path: str | os.PathLike, state: Any, params: Any, config: MuonConfig | None = None, *,
         layout: str = "in_out", algorithms: Mapping[str, str] | None = None,
         names: Mapping[str, str] | None = None) -> None:
    """Write a `muon` state as a portable checkpoint at `path`.

    `config`, `layout` and `algorithms` are those `muon` was built with (they fix the plan);
    `names` maps leaf names to the names stored, e.g. `{"fc1.kernel": "fc1.weight"}` to
    match a torch model. Stored: `momentum_buffer`, NorMuon/AdaMuon's `second_moment`,
    AdamW's `mu`/`nu` as `exp_avg`/`exp_avg_sq`, and its `count` as each AdamW parameter's
    `step`. Arrays sharded over devices are gathered whole. With several JAX processes every
    process calls `save`: each array spanning processes is gathered (one at a time), process 0
    keeps them and writes `path`, and an error writing it raises on every process.
    """
    entries, plan = _plan(params, config, layout, algorithms, names)
    writer = jax.process_index() == 0  # the others take part in the gathers and keep nothing
    state_out: dict[str, dict[str, ckpt.Tensor]] = {}
    for key, leaves in _leaves(state).items():
        for name, leaf in leaves.items():
            entry = entries[name]
            stored = _to_stored(leaf, entry, layout)
            if writer:
                state_out.setdefault(entry.name, {})[key] = stored
    count = _field(state, *COUNT)
    steps = {}
    if count is not None:
        count = _whole(count)
        for name, saved in state_out.items():
            if "exp_avg" in saved:
                saved["step"] = ckpt.Tensor("F32", (), np.float32(count).tobytes())
        steps = {n: int(count) for n, s in state_out.items() if "step" in s}

    def write() -> None:
        if writer:
            ckpt.save_checkpoint(path, plan, layout, state_out, steps)

    _on_every_process(write)


def _from_stored(t: ckpt.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, NUMPY_DTYPES[t.dtype]).reshape(t.shape)


def load(path: str | os.PathLike, state_template: Any, params: Any,
         config: MuonConfig | None = None, *, layout: str = "in_out",
         algorithms: Mapping[str, str] | None = None,
         names: Mapping[str, str] | None = None) -> Any:
    """A copy of `state_template` (from `tx.init(params)`) holding the checkpoint's state.

    Arguments as in `save`. Refuses, naming the first difference, a checkpoint of another
    format version, for other parameter names or shapes, routed otherwise, or with another
    second moment (one saved without `second_moment` into a state with one, or the reverse).
    Buffers take the template's dtypes and shardings; parameters without stored state keep
    the template's (zero) state. With several JAX processes every process calls `load` and
    reads `path` (a file all of them see), builds only the shards on its own devices, and a
    refusal or error on any process raises on every process.
    """
    return _on_every_process(lambda: _loaded(path, state_template, params, config, layout,
                                             algorithms, names))


def _placed(value: np.ndarray, like: jax.Array) -> jax.Array:
    """`value` in `like`'s dtype, placed as `like` is: with its sharding (each process builds
    only the shards on its own devices) when committed, else uncommitted, as `tx.init` leaves
    the state it creates apart from the parameters (jit moves it where it is used)."""
    value = value.astype(like.dtype)
    if not like.committed:
        return jnp.asarray(value)
    return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])


def _loaded(path: str | os.PathLike, state_template: Any, params: Any,
            config: MuonConfig | None, layout: str, algorithms: Mapping[str, str] | None,
            names: Mapping[str, str] | None) -> Any:
    """`load` on this process alone."""
    checkpoint = ckpt.read_checkpoint(path)
    entries, plan = _plan(params, config, layout, algorithms, names)
    ckpt.check_matches(checkpoint, plan, layout, path)

    def restored(name: str, key: str, leaf: Any) -> Any:
        entry = entries[name]
        stored = checkpoint.state(entry.name).get(key)
        if stored is None:
            return leaf
        value = _from_stored(stored)
        value = np.transpose(value, ckpt.loaded_perm(entry, value.shape, layout))
        return _placed(value, leaf)

    changes = []
    for key, (owner, field) in BUFFERS.items():
        tree = _field(state_template, owner, field)
        if tree is None:
            continue
        leaf_names, leaves, treedef = flatten(tree)
        changes.append((owner, field, treedef.unflatten(
            [restored(name, key, leaf) for name, leaf in zip(leaf_names, leaves)])))
    moments = _field(state_template, *SECOND_MOMENT)
    if moments:
        changes.append((*SECOND_MOMENT, {name: restored(name, "second_moment", leaf)
                                         for name, leaf in moments.items()}))
    count = _field(state_template, *COUNT)
    if count is not None:
        adamw = [r["name"] for r in checkpoint.plan if r["algorithm"] == "adamw"]
        step = ckpt.common_step((checkpoint.steps[n] for n in adamw if n in checkpoint.steps),
                                "the checkpoint's AdamW parameters")
        changes.append((*COUNT, _placed(np.asarray(step), count)))
    for owner, field, value in changes:
        state_template = optax.tree_utils.tree_set(state_template, _where(owner),
                                                   **{field: value})
    return state_template
