"""Newton-Schulz under a device mesh: each device orthogonalizes its share of the matrices.

`orthogonalize_owned` is the whole of it. The matrices of one oriented shape form a stack,
split evenly over the devices of a mesh axis in the order of `muon_core.pack_by_shape` (the
same owner table as the torch backend); inside `jax.shard_map` one all-to-all (or, for
replicated parameters, a local slice) brings each device its whole matrices, Newton-Schulz runs
there (then the NorMuon/AdaMuon second moment, whose state the owner receives for its own
matrices), and one all-to-all (or all-gather) brings the results back.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from muon_core import (
    MuonConfig, ParamPlan, Plan, ShapeStack, from_matrices, ns_schedule, pack_by_shape, to_matrices,
)
from muon_jax._adaptive import adapt_oriented, second_moments
from muon_jax._ns import ns_dtype, orthogonalize_batch

SHARDED_NS = ("owner", "replicated", "blockwise")


def _explicit_spec(x: jax.Array) -> P | None:
    """The PartitionSpec in `x`'s type under explicit axes; None when it carries none."""
    sharding = jax.typeof(x).sharding
    return sharding.spec if any(a is not None for a in sharding.spec) else None


def _axes_of(spec: P) -> set[str]:
    names: set[str] = set()
    for entry in spec:
        names.update(entry if isinstance(entry, tuple) else () if entry is None else (entry,))
    return names


def find_mesh(leaves: list[jax.Array], mesh: Any, axis: str | None) -> tuple[Any, str] | None:
    """The mesh and its axis to divide Newton-Schulz over, or None for a single device.

    The mesh is `mesh`, else the one set with `jax.set_mesh`, else the one in an explicitly
    sharded leaf's type (under `Auto` axes a traced array does not tell its mesh: pass
    `mesh=`). The axis is `axis`, else the mesh's only axis, else the only mesh axis that
    shards the leaves.
    """
    if mesh is None:
        context = jax.sharding.get_abstract_mesh()
        typed = [jax.typeof(x).sharding.mesh for x in leaves if _explicit_spec(x) is not None]
        mesh = context if context.axis_names else typed[0] if typed else None
    if mesh is None or mesh.size == 1:
        return None
    if axis is None:
        used = set().union(*(_axes_of(_explicit_spec(x) or P()) for x in leaves))
        candidates = list(mesh.axis_names) if len(mesh.axis_names) == 1 else sorted(used)
        if len(candidates) != 1:
            raise ValueError(f"axis=None is ambiguous for a mesh with axes {mesh.axis_names} "
                             f"(leaves sharded over {sorted(used)}): pass axis=<mesh axis name>")
        axis = candidates[0]
    if axis not in mesh.axis_names:
        raise ValueError(f"axis={axis!r} is not an axis of the mesh: expected one of "
                         f"{mesh.axis_names}")
    return mesh, axis


def _oriented_blocks(x: jax.Array, entry: ParamPlan) -> list[jax.Array]:
    """The plan's blocks of `x`, each `(batch, m, n)` with m <= n (tall blocks transposed)."""
    matrices = to_matrices(x, entry, xp=jnp)
    blocks = [matrices[:, start:start + rows] for start, rows in
              zip(entry.block_offsets, entry.blocks)]
    return [b.mT if b.shape[1] > b.shape[2] else b for b in blocks]


def _upright(blocks: list[jax.Array], entry: ParamPlan, dtype: Any) -> list[jax.Array]:
    """Undo `_oriented_blocks`' transposes, in `dtype`."""
    return [(b.mT if rows > entry.matrix_shape[2] else b).astype(dtype)
            for b, rows in zip(blocks, entry.blocks)]


def _joined(blocks: list[jax.Array], entry: ParamPlan, scales: Any = None) -> jax.Array:
    """Upright blocks (each times its LR scale, with `scales`) as one parameter-shaped array."""
    scaled = blocks if scales is None else [b * s for b, s in zip(blocks, scales)]
    return from_matrices(jnp.concatenate(scaled, axis=1), entry, xp=jnp)


def _stack_spec(stack: ShapeStack, axis: str, replicated: bool) -> P:
    """How a stack enters the shard_map: whole on every device for replicated parameters,
    else split along a matrix axis the device count divides (rows, then columns), else
    along the stack axis."""
    n = stack.world_size
    if replicated:
        return P()
    if stack.rows % n == 0:
        return P(None, axis, None)
    if stack.cols % n == 0:
        return P(None, None, axis)
    return P(axis)


def _local_ns(spec: P, axis: str, per_rank: int, ns: Any, adapt: Any = None) -> Any:
    """The per-device function `(stack, moment) -> (stack, new moment)`: gather my whole
    matrices, orthogonalize, apply `adapt(done, *moment)` when given (`moment` holds the
    second-moment state of my own matrices, split over the stack axis), send them back."""
    def owned(whole: jax.Array, moment: tuple) -> tuple[jax.Array, Any]:
        done = ns(whole)
        return (done, ()) if adapt is None else adapt(done, *moment)

    if spec == P():
        def replicated(x: jax.Array, moment: tuple) -> tuple[jax.Array, Any]:
            mine = lax.dynamic_slice_in_dim(x, lax.axis_index(axis) * per_rank, per_rank)
            done, new_moment = owned(mine, moment)
            return lax.all_gather(done, axis, tiled=True, to="invarying"), new_moment
        return replicated
    if spec == P(axis):
        return owned
    split = 1 if spec == P(None, axis, None) else 2

    def sharded(x: jax.Array, moment: tuple) -> tuple[jax.Array, Any]:
        n = lax.axis_size(axis)
        # (n * c, piece) -> (c, whole): each device sends its piece of device j's c matrices
        # to device j and joins the n pieces it receives along the split axis; then back.
        pieces = lax.all_to_all(x.reshape(n, per_rank, *x.shape[1:]), axis, 0, 0, tiled=True)
        done, new_moment = owned(jnp.concatenate(list(pieces), axis=split), moment)
        done = jnp.stack(jnp.split(done, n, axis=split))
        return lax.all_to_all(done, axis, 0, 0, tiled=True).reshape(x.shape), new_moment
    return sharded


def _sharded_matrix_axis(entry: ParamPlan, spec: P | None, axis: str) -> int:
    """Which axis of the plan's `(batch, rows, cols)` view holds the leaf's dimension sharded
    over `axis`: 0, 1 or 2; 1 (the output axis) when the sharding is not known."""
    dims = [i for i, e in enumerate(spec or ()) if axis in (e if isinstance(e, tuple) else (e,))]
    if not dims:
        return 1
    position, sizes = entry.perm.index(dims[0]), entry.permuted_shape
    batch_end = next(k for k in range(len(sizes) + 1)
                     if math.prod(sizes[:k]) == entry.matrix_shape[0])
    rows_end = next(k for k in range(batch_end, len(sizes) + 1)
                    if math.prod(sizes[batch_end:k]) == entry.matrix_shape[1])
    return 0 if position < batch_end else 1 if position < rows_end else 2


def _owner_stacks(plan: Plan, axis: str, n: int, replicated: frozenset[str], ns: Any,
                  adapt: Any):
    """(items, padded size, stack spec, per-device function) of each `pack_by_shape` stack."""
    for stack in pack_by_shape(plan, n):
        spec = _stack_spec(stack, axis, all(name in replicated for name, _, _ in stack.items))
        yield (stack.items, stack.per_rank * n, spec,
               _local_ns(spec, axis, stack.per_rank, ns, adapt))


def _blockwise_stacks(plan: Plan, axis: str, n: int, specs: dict[str, P | None], ns: Any):
    """Stacks of same-shape blocks cut along the same axis into n pieces, each piece
    orthogonalized alone where it lies."""
    groups: dict[tuple[int, int, int], list[tuple[str, int, int]]] = {}
    for entry in plan.muon:
        batch, _, cols = entry.matrix_shape
        along = _sharded_matrix_axis(entry, specs[entry.name], axis)
        for block, rows in enumerate(entry.blocks):
            split = 3 - along if rows > cols and along else along
            shape = (min(rows, cols), max(rows, cols))
            if split and shape[split - 1] % n:
                raise ValueError(f"sharded_ns='blockwise' cannot cut parameter {entry.name!r} "
                                 f"(block {shape[0]}x{shape[1]}) into {n} equal pieces along "
                                 f"its axis {split}: expected a size divisible by {n}")
            groups.setdefault((*shape, split), []).extend(
                (entry.name, block, b) for b in range(batch))
    for (_, _, split), items in groups.items():
        size = len(items) if split else -(-len(items) // n) * n
        yield (items, size, P(*[axis if i == split else None for i in range(3)]),
               lambda x, moment: (ns(x), ()))


def _moment_stack(items: list[tuple[str, int, int]], size: int, held: dict[str, Any],
                  entries: dict[str, ParamPlan], config: MuonConfig
                  ) -> tuple[jax.Array, jax.Array]:
    """The second-moment state of a stack's matrices, oriented like them and padded with
    zeros to `size`, and which of them are transposed (see `adapt_oriented`). `held` is
    AdaMuon's state as `_oriented_blocks`, or NorMuon's `(batch, rows)` state, per leaf."""
    pieces, flags = [], []
    for name, block, b in items:
        entry = entries[name]
        rows, cols = entry.blocks[block], entry.matrix_shape[2]
        if config.second_moment == "adamuon":
            pieces.append(held[name][block][b])
        else:
            start = entry.block_offsets[block]
            pieces.append(jnp.pad(held[name][b, start:start + rows],
                                  (0, max(cols - rows, 0))))
        flags.append(rows > cols)
    pieces += [jnp.zeros_like(pieces[0])] * (size - len(pieces))
    flags += [False] * (size - len(flags))
    return jnp.stack(pieces), jnp.asarray(flags)


def _moment_leaf(pieces: list[list[jax.Array]], entry: ParamPlan,
                 config: MuonConfig) -> jax.Array:
    """A leaf's new second moment from its matrices' oriented state `pieces[block][b]`."""
    if config.second_moment == "adamuon":
        return _joined(_upright([jnp.stack(p) for p in pieces], entry, pieces[0][0].dtype),
                       entry)
    return jnp.concatenate([jnp.stack([v[:rows] for v in per_batch])
                            for per_batch, rows in zip(pieces, entry.blocks)], axis=1)


def _stacked(directions: dict[str, jax.Array], moments: dict[str, jax.Array], plan: Plan,
             config: MuonConfig, mesh: Any, axis: str, mode: str,
             specs: dict[str, P | None]) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """`orthogonalize_owned` on a mesh whose axes are `Auto` (XLA lays out the packing);
    `specs` are the directions' known PartitionSpecs (None when unknown)."""
    entries = {e.name: e for e in plan.muon}
    dtype = ns_dtype(config.ns_dtype)
    schedule = ns_schedule(config.ns_coefficients, config.ns_steps, config.ns_algorithm)

    def ns(x: jax.Array) -> jax.Array:
        return orthogonalize_batch([x], schedule, config.eps, dtype)[0]

    def adapt(done: jax.Array, v: jax.Array, transposed: jax.Array):
        return adapt_oriented(done, v, transposed, config)

    n = mesh.shape[axis]
    owner_moment = mode != "blockwise" and config.second_moment != "none"
    if mode == "blockwise":
        stacks = _blockwise_stacks(plan, axis, n, specs, ns)
    else:
        replicated = frozenset(name for name, spec in specs.items()
                               if spec is not None and axis not in _axes_of(spec))
        stacks = _owner_stacks(plan, axis, n, replicated, ns, adapt if owner_moment else None)
    blocks = {n: _oriented_blocks(directions[n].astype(dtype), e) for n, e in entries.items()}
    held = ({n: _oriented_blocks(moments[n], e) for n, e in entries.items()}
            if owner_moment and config.second_moment == "adamuon" else moments)
    results: dict[str, list[list[Any]]] = {
        n: [[None] * e.matrix_shape[0] for _ in e.blocks] for n, e in entries.items()}
    new_moments = {n: [[None] * e.matrix_shape[0] for _ in e.blocks] for n, e in entries.items()}
    for items, size, spec, local in stacks:
        pieces = [blocks[name][block][b] for name, block, b in items]
        pieces += [jnp.zeros_like(pieces[0])] * (size - len(pieces))
        stacked = lax.with_sharding_constraint(jnp.stack(pieces), NamedSharding(mesh, spec))
        moment = _moment_stack(items, size, held, entries, config) if owner_moment else ()
        done, moment = jax.shard_map(local, mesh=mesh, in_specs=(spec, P(axis)),
                                     out_specs=(spec, P(axis)))(stacked, moment)
        for index, (name, block, b) in enumerate(items):
            results[name][block][b] = done[index]
            if owner_moment:
                new_moments[name][block][b] = moment[index]
    upright = {name: _upright([jnp.stack(per_batch) for per_batch in results[name]], entry,
                              directions[name].dtype) for name, entry in entries.items()}
    if owner_moment:
        moments = {name: _moment_leaf(new_moments[name], entry, config)
                   for name, entry in entries.items()}
    elif config.second_moment != "none":  # blockwise: the core's rule on each plan block
        flat, moments = second_moments([b for e in plan.muon for b in upright[e.name]],
                                       moments, plan.muon, config)
        adapted = iter(flat)
        upright = {e.name: [next(adapted) for _ in e.blocks] for e in plan.muon}
    return ({name: _joined(upright[name], entry, entry.lr_scales)
             for name, entry in entries.items()}, dict(moments))


def orthogonalize_owned(directions: dict[str, jax.Array], plan: Plan, config: MuonConfig,
                        mesh: Any, axis: str, mode: str = "owner",
                        moments: dict[str, jax.Array] | None = None
                        ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """`lr_scale * NS(direction)` of every Muon leaf on the devices of mesh axis `axis`, after
    the config's second moment: (directions, new second moments by leaf name).

    `mode="owner"`: each device orthogonalizes its share of every same-shape stack
    (`muon_core.pack_by_shape`) and applies the second moment to those whole matrices, with
    their state sent to it in the same way; equal to the single-device result.
    `mode="blockwise"`: each matrix is cut into pieces along the axis its leaf is sharded on
    (the output axis when that is unknown) and each piece is orthogonalized alone, a
    different algorithm; the second moment then acts on each block of the plan's matrix view
    as on one device. Results keep the directions' (and moments') dtypes, and their shardings
    under explicit axes.
    """
    moments = dict(moments or {})
    if not any(t == AxisType.Explicit for t in mesh.axis_types):
        return _stacked(directions, moments, plan, config, mesh, axis, mode,
                        dict.fromkeys(directions))
    specs = {n: _explicit_spec(d) or P() for n, d in directions.items()}

    def packed(directions: dict[str, jax.Array], moments: dict[str, jax.Array]):
        return _stacked(directions, moments, plan, config, jax.sharding.get_abstract_mesh(),
                        axis, mode, specs)

    out_sharding = ({n: NamedSharding(mesh, spec) for n, spec in specs.items()},
                    {n: NamedSharding(mesh, _explicit_spec(v) or P())
                     for n, v in moments.items()})
    return jax.sharding.auto_axes(packed, out_sharding=out_sharding)(directions, moments)
