"""Leaf names from pytree key paths, and the routing plan `muon` uses (`plan_for`)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

import muon_core
from muon_core import MuonConfig, Plan

from muon_jax._routing import module_kinds


def _key_text(key: Any) -> str:
    if isinstance(key, (DictKey, FlattenedIndexKey)):
        return str(key.key)
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, SequenceKey):
        return str(key.idx)
    return str(key)


def flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Leaf names, leaves and the tree structure; names must be unique.

    Empty nodes (`optax.MaskedNode()`, None) hold no leaf and get no name.
    """
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [".".join(_key_text(k) for k in path) for path, _ in pairs]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"two leaves share the name {name!r}: rename one so that key paths "
                             "joined with '.' are unique")
        seen.add(name)
    return names, [leaf for _, leaf in pairs], treedef


def leaf_names(tree: Any) -> list[str]:
    """Leaf names: key path entries joined with "." (`{"blocks": [{"w": x}]}` -> "blocks.0.w")."""
    return flatten(tree)[0]


@functools.lru_cache(maxsize=64)
def _cached_plan(shapes: tuple[tuple[str, tuple[int, ...]], ...], config: MuonConfig,
                 layout: str, algorithms: tuple[tuple[str, str], ...]) -> Plan:
    return muon_core.plan(dict(shapes), config, layout=layout, algorithms=dict(algorithms),
                          module_kinds=module_kinds(dict(shapes)))


def plan_leaves(names: list[str], leaves: list[Any], config: MuonConfig, layout: str,
                algorithms: Mapping[str, str] | None) -> Plan:
    """The plan for named leaves (cached on names and shapes: it runs outside jit's trace)."""
    unknown = sorted(set(algorithms or {}) - set(names))
    if unknown:
        raise ValueError(f"algorithms names {unknown}, which are not leaves of the parameters: "
                         f"expected names from {names[:8]}{' ...' if len(names) > 8 else ''}")
    shapes = tuple((n, tuple(int(s) for s in jnp.shape(x))) for n, x in zip(names, leaves))
    return _cached_plan(shapes, config, layout, tuple(sorted((algorithms or {}).items())))


def plan_for(params: Any, config: MuonConfig | None = None, *, layout: str = "in_out",
             algorithms: Mapping[str, str] | None = None) -> Plan:
    """The routing plan `muon` uses for this pytree of parameters (print it for a table)."""
    names, leaves, _ = flatten(params)
    return plan_leaves(names, leaves, config or MuonConfig(), layout, algorithms)


def algorithm_labels(params: Any, config: MuonConfig, layout: str,
                     algorithms: Mapping[str, str] | None) -> Any:
    """A tree shaped like `params` holding "muon" or "adamw" per leaf (`optax.partition`'s labels)."""
    names, leaves, treedef = flatten(params)
    plan = plan_leaves(names, leaves, config, layout, algorithms)
    return treedef.unflatten([plan[name].algorithm for name in names])
