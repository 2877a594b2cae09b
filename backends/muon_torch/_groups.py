"""User parameter groups: names, tensors, routing and the hyper-parameters of each half."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from muon_core import MuonConfig

NAME_KEYS = ("names", "param_names")
# Muon hyper-parameters kept in a torch param group (read at every step, so they can change);
# lr_scaling, split_qkv and rules act once, through the plan.
MUON_GROUP_KEYS = ("lr", "weight_decay", "momentum", "nesterov", "momentum_kind", "ns_steps",
                   "ns_coefficients", "eps", "ns_dtype", "ns_algorithm", "second_moment",
                   "beta2", "second_moment_eps", "cautious_weight_decay")
ADAMW_GROUP_KEYS = ("lr", "weight_decay", "betas", "eps")
OPTIMIZER_WIDE_KEYS = ("nonfinite",)


@dataclasses.dataclass(frozen=True)
class UserGroup:
    """One group as the user gave it: named tensors, an optional algorithm, and its config."""

    names: tuple[str, ...]
    params: tuple[torch.Tensor, ...]
    algorithm: str | None
    config: MuonConfig


def _split_named(items: list[Any], first_index: int, where: str):
    """(names, tensors) from a list of tensors or of (name, tensor) pairs."""
    named = [isinstance(item, tuple) for item in items]
    if any(named) and not all(named):
        raise ValueError(f"{where}: all optimizer params should be with/without names. Some "
                         "param names are missing: give all parameters names or none")
    if all(named) and items:
        names, tensors = zip(*items)
    else:
        names = tuple(str(first_index + i) for i in range(len(items)))
        tensors = tuple(items)
    for name, tensor in zip(names, tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{where}: parameter {name!r} is a {type(tensor).__name__}, "
                            "expected a torch.Tensor")
        if not isinstance(name, str):
            raise TypeError(f"{where}: parameter name {name!r} is a {type(name).__name__}, "
                            "expected a str")
    return tuple(names), tuple(tensors)


def parse_group(group: Mapping[str, Any], config: MuonConfig, first_index: int,
                where: str) -> UserGroup:
    """Read a user group dict: `params`, optional names, `algorithm` and hyper-parameters.

    In a group with `"algorithm": "adamw"` the keys lr, weight_decay, betas and eps are AdamW's;
    elsewhere top-level keys are MuonConfig fields and AdamW's go under `"adamw"`.
    """
    if not isinstance(group, Mapping) or "params" not in group:
        raise TypeError(f"{where}: expected a dict with a 'params' entry, got {group!r:.80}")
    params = group["params"]
    if isinstance(params, set):
        raise TypeError(f"{where}: params is a set, whose order changes between runs: "
                        "expected a list")
    items = [params] if isinstance(params, torch.Tensor) else list(params)
    names, tensors = _split_named(items, first_index, where)
    given = [k for k in NAME_KEYS if k in group]
    if given:
        names = tuple(group[given[0]])
        if len(names) != len(tensors) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where}: {given[0]} must be {len(tensors)} strings, one per "
                             f"parameter, got {names!r:.80}")
    algorithm = group.get("algorithm")
    if algorithm not in (None, "muon", "adamw"):
        raise ValueError(f"{where}: algorithm={algorithm!r} is invalid: expected 'muon' or 'adamw'")
    keys = {k: v for k, v in group.items() if k not in ("params", "algorithm", *NAME_KEYS)}
    fixed = sorted(set(keys) & set(OPTIMIZER_WIDE_KEYS))
    if fixed:
        raise ValueError(f"{where}: {fixed} apply to the whole optimizer: pass them to Muon(...), "
                         "not in a param group")
    if algorithm == "adamw":
        config = config.replace(adamw=config.adamw.with_overrides(keys, where))
    else:
        config = config.with_overrides(keys, where)
    return UserGroup(names, tensors, algorithm, config)


def muon_hyperparameters(config: MuonConfig) -> dict[str, Any]:
    """The Muon half's torch param-group entries."""
    return {"algorithm": "muon", **{k: getattr(config, k) for k in MUON_GROUP_KEYS}}


def adamw_hyperparameters(config: MuonConfig) -> dict[str, Any]:
    """The AdamW half's torch param-group entries."""
    return {"algorithm": "adamw", **{k: getattr(config.adamw, k) for k in ADAMW_GROUP_KEYS}}
