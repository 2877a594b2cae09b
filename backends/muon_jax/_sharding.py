"""Sharding helpers: Newton-Schulz needs whole matrices, its result goes back to the shards."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec


def explicit_sharding(x: jax.Array) -> NamedSharding | None:
    """The sharding in `x`'s type under an explicit-axes mesh; None when it carries none."""
    sharding = jax.typeof(x).sharding
    return sharding if any(axis is not None for axis in sharding.spec) else None


def resharded(x: jax.Array, sharding: NamedSharding | None) -> jax.Array:
    """`x` placed with `sharding` (unchanged when None)."""
    return x if sharding is None else jax.sharding.reshard(x, sharding)


def whole(x: jax.Array) -> jax.Array:
    """`x` replicated when its type carries a sharding (explicit axes), else `x`."""
    sharding = explicit_sharding(x)
    return x if sharding is None else jax.sharding.reshard(x, sharding.update(spec=PartitionSpec()))
