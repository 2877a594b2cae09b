"""NorMuon / AdaMuon second moments and cautious weight decay in jax.numpy.

The semantics are `muon_core.apply_second_moment` and `muon_core.decayed_param`: the second
moment acts on each orthogonalized block before its LR scale, and every matrix of a block
keeps its Frobenius norm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from muon_core import MuonConfig, ParamPlan, from_matrices, second_moment_shape, to_matrices


def init_second_moments(leaves: Mapping[str, Any], entries: Sequence[ParamPlan],
                        config: MuonConfig) -> dict[str, jax.Array]:
    """Zero `second_moment` per Muon leaf, in the leaf's dtype ({} without a second moment)."""
    shapes = {e.name: second_moment_shape(e, config.second_moment) for e in entries}
    return {name: jnp.zeros(shape, jnp.result_type(leaves[name]))
            for name, shape in shapes.items() if shape is not None}


def check_second_moments(stored: Mapping[str, Any], entries: Sequence[ParamPlan],
                         config: MuonConfig) -> None:
    """Raise ValueError unless `stored` has one array of the expected shape per Muon leaf."""
    expected = {e.name: second_moment_shape(e, config.second_moment) for e in entries}
    expected = {name: shape for name, shape in expected.items() if shape is not None}
    if set(stored) != set(expected):
        raise ValueError(f"state.second_moment has leaves {sorted(stored)}, but "
                         f"second_moment={config.second_moment!r} expects {sorted(expected)}: "
                         "was the state made by init with this config?")
    for name, shape in expected.items():
        if tuple(jnp.shape(stored[name])) != tuple(shape):
            raise ValueError(f"state.second_moment[{name!r}] has shape "
                             f"{jnp.shape(stored[name])}, expected {tuple(shape)}")


def _keep_norm(scaled: jax.Array, update: jax.Array) -> jax.Array:
    """`scaled * ||update|| / ||scaled||` per matrix; 0 where `scaled` is all zero."""
    norm = jnp.linalg.norm(update, axis=(-2, -1), keepdims=True)
    new_norm = jnp.linalg.norm(scaled, axis=(-2, -1), keepdims=True)
    safe = jnp.where(new_norm > 0, new_norm, 1.0)
    return scaled * jnp.where(new_norm > 0, norm / safe, 0.0)


def _adapt(block: jax.Array, v: jax.Array, config: MuonConfig,
           transposed: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One block `(batch, rows, cols)` and its state slice: (new block, new state slice).

    With `transposed` (one bool per matrix), `block` is an oriented stack (`rows <= cols`,
    tall matrices transposed) and NorMuon's `v` is `(batch, cols)`: a transposed matrix's
    rows are its columns; the others' `rows` entries come first, then zero padding.
    """
    wide = jnp.promote_types(v.dtype, jnp.float32)
    o = block.astype(wide)
    beta2, eps = config.beta2, config.second_moment_eps
    if config.second_moment == "adamuon":
        new_v = beta2 * v.astype(wide) + (1.0 - beta2) * (o * o)
        denom = jnp.sqrt(new_v) + eps
    elif transposed is None:
        new_v = beta2 * v.astype(wide) + (1.0 - beta2) * jnp.mean(o * o, axis=-1)
        denom = (jnp.sqrt(new_v) + eps)[..., None]
    else:
        rows, cols = o.shape[-2:]
        row_means = jnp.pad(jnp.mean(o * o, axis=-1), ((0, 0), (0, cols - rows)))
        square = jnp.where(transposed[:, None], jnp.mean(o * o, axis=-2), row_means)
        new_v = beta2 * v.astype(wide) + (1.0 - beta2) * square
        root = jnp.sqrt(new_v) + eps
        denom = jnp.where(transposed[:, None, None], root[:, None, :], root[:, :rows, None])
    return _keep_norm(o / denom, o).astype(block.dtype), new_v.astype(v.dtype)


def adapt_oriented(stack: jax.Array, v: jax.Array, transposed: jax.Array,
                   config: MuonConfig) -> tuple[jax.Array, jax.Array]:
    """The second moment on a stack of whole orthogonalized matrices `(c, m, n)`, `m <= n`
    (tall ones transposed, flagged in `transposed`), as the owner of a stack applies it:
    (new stack, new state). `v` is AdaMuon's `(c, m, n)` (oriented like the stack) or
    NorMuon's `(c, n)` (see `_adapt`)."""
    return _adapt(stack, v, config, transposed)


def second_moments(blocks: Sequence[jax.Array], moments: Mapping[str, jax.Array],
                   entries: Sequence[ParamPlan], config: MuonConfig
                   ) -> tuple[list[jax.Array], dict[str, jax.Array]]:
    """The orthogonalized blocks (every entry's blocks in order) after the config's second
    moment, and the new `second_moment` per leaf; unchanged without a second moment."""
    if config.second_moment == "none":
        return list(blocks), dict(moments)
    adamuon = config.second_moment == "adamuon"
    out, new_moments, start = [], {}, 0
    for entry in entries:
        v = moments[entry.name]
        view = to_matrices(v, entry, xp=jnp) if adamuon else v
        pieces = [_adapt(block, view[:, first:first + rows], config) for block, first, rows in
                  zip(blocks[start:start + len(entry.blocks)], entry.block_offsets,
                      entry.blocks)]
        start += len(entry.blocks)
        out += [block for block, _ in pieces]
        new_v = jnp.concatenate([piece for _, piece in pieces], axis=1)
        new_moments[entry.name] = from_matrices(new_v, entry, xp=jnp) if adamuon else new_v
    return out, new_moments


def decay_target(step: jax.Array, param: Any, cautious: bool) -> Any:
    """What weight decay multiplies: the parameter, or with cautious decay only its entries
    whose sign agrees with the step (the descent direction, subtracted): `step * p >= 0`."""
    if not cautious:
        return param
    return jnp.where(step * param >= 0, param, jnp.zeros_like(param))
