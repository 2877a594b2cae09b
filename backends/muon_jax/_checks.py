"""Validation of updates, parameters and state: clear errors naming the leaf."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from muon_jax._plan import flatten


def shape_text(shape: tuple[int, ...]) -> str:
    """`4x6`, or `scalar` for shape ()."""
    return "x".join(map(str, shape)) or "scalar"


def check_leaves(names: list[str], leaves: list[Any], what: str) -> None:
    """Refuse leaves that are not of a real floating dtype."""
    for name, leaf in zip(names, leaves):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{what} leaf {name!r} ({shape_text(jnp.shape(leaf))}) has "
                            f"dtype {dtype}: expected a real floating dtype")


def check_params(params: Any, treedef: Any, names: list[str], grads: list[Any]) -> list[Any]:
    """The parameters' leaves, after checking they match the updates in structure and shape."""
    p_names, p_leaves, p_treedef = flatten(params)
    if p_treedef != treedef:
        raise ValueError(f"params and updates differ in structure: params has leaves "
                         f"{p_names}, updates has {names}")
    for name, p, g in zip(names, p_leaves, grads):
        if jnp.shape(p) != jnp.shape(g):
            raise ValueError(f"update of {name!r} has shape {jnp.shape(g)}, expected the "
                             f"parameter's shape {jnp.shape(p)}")
    return p_leaves


def check_state(field: str, stored: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Refuse a state field whose leaves differ from the plan's in names or shapes."""
    if set(stored) != set(expected):
        raise ValueError(f"state.{field} has leaves {sorted(stored)}, but the plan expects "
                         f"{sorted(expected)}: was the state made by init on these parameters?")
    for name, grad in expected.items():
        if jnp.shape(stored[name]) != jnp.shape(grad):
            raise ValueError(f"state.{field}[{name!r}] has shape {jnp.shape(stored[name])}, "
                             f"expected {jnp.shape(grad)}")
