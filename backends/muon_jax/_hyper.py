"""Keyword overrides and the hyper-parameters `optax.inject_hyperparams` may feed as arrays."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from muon_core import MuonConfig

# Hyper-parameters that optax.inject_hyperparams may feed as arrays (tracers under jit).
INJECTABLE = ("lr", "momentum", "weight_decay", "adamw_lr", "adamw_weight_decay")
ADAMW_OVERRIDES = {"adamw_lr": "lr", "adamw_weight_decay": "weight_decay"}
OVERRIDES = tuple(f.name for f in dataclasses.fields(MuonConfig)) + tuple(ADAMW_OVERRIDES)


class Hyper(NamedTuple):
    """The injectable hyper-parameters: Python floats from the config, or scalar arrays."""

    lr: Any
    momentum: Any
    weight_decay: Any
    adamw_lr: Any
    adamw_weight_decay: Any


def is_traced(x: Any) -> bool:
    """Whether `x` is a tracer (a value known only when the compiled step runs)."""
    return isinstance(x, jax.core.Tracer)


def has_decay(weight_decay: Any) -> bool:
    """Whether a decay term is needed: a traced value may be non-zero."""
    return is_traced(weight_decay) or weight_decay != 0


def _injected(name: str, value: Any) -> Any:
    """Check an array-valued injectable: a real scalar; returns it, or a float when concrete."""
    if jnp.ndim(value) != 0 or not jnp.issubdtype(jnp.result_type(value), jnp.number):
        raise TypeError(f"{name} must be a real scalar, got shape {jnp.shape(value)} "
                        f"and dtype {jnp.result_type(value)}")
    return value if is_traced(value) else float(value)


def resolve(config: MuonConfig | None, overrides: Mapping[str, Any]) -> tuple[MuonConfig, Hyper]:
    """Apply keyword overrides to the config; injectable ones may be (traced) jnp scalars.

    Python numbers and concrete arrays are validated by `MuonConfig`; a traced value cannot
    be checked and is used as it is. Merging follows `MuonConfig.with_overrides`, so
    `adamw={"lr": ...}` keeps the other AdamW fields.
    """
    config = MuonConfig() if config is None else config
    if not isinstance(config, MuonConfig):
        raise TypeError(f"config must be a MuonConfig or None, got {type(config).__name__}")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"unknown keyword(s) {unknown}: expected MuonConfig fields or "
                        f"{sorted(ADAMW_OVERRIDES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    traced = {}
    for name, value in list(given.items()):
        is_array = isinstance(value, (jax.Array, np.ndarray, np.generic))
        if is_array and name not in INJECTABLE:
            raise TypeError(f"{name} got an array, but it is static (it shapes the computation): "
                            "put it in the MuonConfig or list it in "
                            f"optax.inject_hyperparams(..., static_args=({name!r},))")
        if is_array:
            given[name] = _injected(name, value)
        if is_traced(given[name]):
            traced[name] = given.pop(name)
    adamw = {ADAMW_OVERRIDES[k]: given.pop(k) for k in list(given) if k in ADAMW_OVERRIDES}
    if adamw:
        prior = given.get("adamw", {})
        prior = dataclasses.asdict(prior) if dataclasses.is_dataclass(prior) else prior
        given["adamw"] = {**prior, **adamw}
    config = config.with_overrides(given, "muon_jax")
    plain = {"lr": config.lr, "momentum": config.momentum, "weight_decay": config.weight_decay,
             "adamw_lr": config.adamw.lr, "adamw_weight_decay": config.adamw.weight_decay}
    return config, Hyper(**{**plain, **traced})


def with_override_keywords(factory: Callable) -> Callable:
    """List every override as a keyword-only parameter in the signature.

    optax.inject_hyperparams reads the signature: each hyper-parameter must be a named
    parameter (not hidden in `**overrides`) for it to be injected.
    """
    fixed = list(inspect.signature(factory).parameters.values())[:-1]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
             for name in OVERRIDES]
    factory.__signature__ = inspect.Signature(
        fixed + extra, return_annotation=optax.GradientTransformationExtraArgs)
    return factory
