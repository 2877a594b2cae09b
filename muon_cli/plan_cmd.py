"""`muon plan`: the routing table of a built-in model, a user's model or a shapes file."""

from __future__ import annotations

import importlib
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import muon_core
from muon_core import MuonConfig, Plan

from muon_cli.benchtools import gpt2_shapes

SHAPE_MODELS = {"gpt2": gpt2_shapes}
TORCH_MODELS = ("mlp", "cnn", "gpt-small")


def builtin_names() -> list[str]:
    """Every model name `muon plan` knows without an import path."""
    return sorted([*SHAPE_MODELS, *TORCH_MODELS])


def _torch_plan(model: Any, config: MuonConfig) -> Plan:
    """The plan `muon_torch` makes for a module (module types included), else by names."""
    try:
        from muon_torch import Muon
    except ImportError:
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        return muon_core.plan(shapes, config)
    return Muon.for_model(model, config).plan


def _import_object(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj() if callable(obj) else obj


def plan_for(obj: Any, config: MuonConfig, layout: str = "out_in") -> Plan:
    """Plan a torch module or a mapping of parameter names to shapes."""
    if isinstance(obj, Mapping):
        return muon_core.plan({k: tuple(v) for k, v in obj.items()}, config, layout=layout)
    if hasattr(obj, "named_parameters"):
        return _torch_plan(obj, config)
    raise TypeError(f"cannot plan a {type(obj).__name__}: expected a torch.nn.Module or a "
                    "mapping of parameter names to shapes")


def load_model(model: str) -> Any:
    """A built-in name, `package.module:factory`, or a JSON file of `{name: shape}`."""
    if model in SHAPE_MODELS:
        return SHAPE_MODELS[model]()
    if model in TORCH_MODELS:
        from muon_cli.torch_models import build

        return build(model)
    if model.endswith(".json"):
        return json.loads(Path(model).read_text(encoding="utf-8"))
    if ":" in model:
        return _import_object(model)
    raise ValueError(f"model={model!r} is not known: expected one of {builtin_names()}, "
                     "'package.module:factory', a .json file of shapes, or a .toml file "
                     "with a top-level model = ... key")


def resolve(model_or_config: str, config_path: str | None) -> tuple[str, MuonConfig]:
    """The model spec and the config: a `.toml` argument may name its model (`model = ...`)."""
    config = MuonConfig.from_file(config_path) if config_path else MuonConfig()
    if not model_or_config.endswith(".toml"):
        return model_or_config, config
    data = tomllib.loads(Path(model_or_config).read_text(encoding="utf-8"))
    if "model" not in data:
        raise ValueError(f"{model_or_config} has no top-level model = ... key: name a model "
                         f"({builtin_names()}) or pass the file as --config")
    return data["model"], MuonConfig.from_file(config_path or model_or_config)


def run_plan(model_or_config: str, config_path: str | None = None,
             layout: str = "out_in") -> Plan:
    """Build the plan that `muon plan` prints."""
    model, config = resolve(model_or_config, config_path)
    return plan_for(load_model(model), config, layout)


def owner_report(plan: Plan, world_size: int) -> str:
    """`muon plan --world-size N`: each Muon parameter's owner rank and NS cost, then the load
    per rank (`muon_core.assign_owners`, the table `Muon(process_group=...)` uses)."""
    owners = muon_core.assign_owners(plan, world_size)
    width = max((len(name) for name in owners.owner), default=4)
    lines = [f"{'name'.ljust(width)}  owner  NS GFLOP/step"]
    lines += [f"{name.ljust(width)}  {rank:>5}  {owners.cost[name] / 1e9:>13.3f}"
              for name, rank in owners.owner.items()]
    return "\n".join(lines + ["", owners.table()])
