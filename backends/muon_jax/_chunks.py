"""Stacks of same-shape matrices built and transformed in place, a few matrices at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# A stack is transformed in at least this many chunks (fewer only when it has fewer matrices),
# so the scratch of one chunk is a small part of the stack.
CHUNKS = 8


def _typed_like_new(x: jax.Array) -> bool:
    """Whether `x` has the sharding type a new array of its shape gets (not so on explicit
    meshes, where in-place slice updates must match their operand's sharding exactly)."""
    return jax.typeof(x).sharding == jax.typeof(jnp.zeros(x.shape, x.dtype)).sharding


def _zero_after(x: jax.Array) -> jax.Array:
    """A scalar 0 that XLA can compute only from `x`: a comparison no value passes (none exceeds
    infinity, NaN included), which XLA does not fold, on the largest entry of `x`'s first row
    (a reduction, so XLA computes it on its own rather than inside the consumer)."""
    first = jnp.max(x[(0,) * (x.ndim - 1)])
    return jnp.where(first > jnp.inf, first, jnp.zeros((), first.dtype))


def stack_in_place(blocks: Sequence[jax.Array], after: jax.Array | None = None) -> jax.Array:
    """`jnp.concatenate(blocks)`, each block written into the stack in turn, so XLA can
    build it in place instead of keeping every (transposed) block as well. With `after`, the
    stack is begun only once `after` has been computed. Blocks typed with another sharding than
    a new array's (explicit meshes) are concatenated plainly: in-place updates must match it
    exactly."""
    dtype = blocks[0].dtype
    start = jnp.zeros((), dtype) if after is None else _zero_after(after).astype(dtype)
    if not all(_typed_like_new(b) for b in blocks):
        stack = jnp.concatenate(blocks)
        # `start` is 0: the selection keeps every bit and waits for `after`.
        return stack if after is None else jnp.where(start == 0, stack, start)
    stack = jnp.broadcast_to(start, (sum(b.shape[0] for b in blocks), *blocks[0].shape[1:]))
    offset = 0
    for block in blocks:
        stack = lax.dynamic_update_slice_in_dim(stack, block, offset, 0)
        offset += block.shape[0]
    return stack


def chunk_size(batch: int, chunks: int = CHUNKS) -> int:
    """The largest divisor of `batch` that cuts it into at least `chunks` pieces (1 when
    `batch <= chunks`)."""
    most = max(1, batch // chunks)
    return max(d for d in range(1, most + 1) if batch % d == 0)


def in_chunks(fn: Callable[..., jax.Array], stack: jax.Array, *per_matrix: jax.Array,
              chunks: int = CHUNKS) -> jax.Array:
    """`fn(stack, *per_matrix)` for a `fn` that treats each matrix on its own and keeps shape
    and dtype, applied to `chunk_size` matrices at a time (and the matching rows of each
    `per_matrix` array) in a loop that writes each result back into the stack: the scratch
    is one chunk's, not the whole stack's. A stack typed with another sharding than a new
    array's (explicit meshes) goes whole."""
    size = chunk_size(stack.shape[0], chunks)
    if size == stack.shape[0] or not _typed_like_new(stack):
        return fn(stack, *per_matrix)

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        rows = [lax.dynamic_slice_in_dim(a, i * size, size) for a in (x, *per_matrix)]
        return lax.dynamic_update_slice_in_dim(x, fn(*rows), i * size, 0)

    return lax.fori_loop(0, stack.shape[0] // size, body, stack)
