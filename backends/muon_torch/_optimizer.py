"""`Muon`: one torch optimizer, Muon on the matrices the core's plan picks and AdamW on the rest."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import muon_core
import torch
from muon_core import MuonConfig, ParamPlan, Plan
from torch import nn
from torch.optim.adamw import adamw as adamw_functional
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from muon_torch._adaptive import (STATE_KEY, cautious_factor, decay_and_add_,
                                  ensure_second_moment, second_moments, state_shape)
from muon_torch._groups import adamw_hyperparameters, muon_hyperparameters, parse_group
from muon_torch._model import ModuleHints, as_hints, model_hints, sparse_parameters
from muon_torch._newton_schulz import LOW_PRECISION, device_facts, newton_schulz, ns_dtype
from muon_torch._qk_clip import qk_clip as _qk_clip

def _fused_adamw_supported(params: Iterable[torch.Tensor]) -> bool:
    devices = _get_fused_kernels_supported_devices()
    return all(p.device.type in devices and p.is_floating_point() for p in params)


def _has_dtensors(params: Iterable[torch.Tensor]) -> bool:
    """Whether any parameter is a DTensor (none can be before torch.distributed.tensor loads)."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and any(isinstance(p, dtensor) for p in params)


def _refuse_for_muon(entry: ParamPlan, problem: str) -> ValueError:
    return ValueError(f"parameter {entry.name!r} with shape {entry.shape} is routed to muon by "
                      f"{entry.decided_by} ({entry.why}), but {problem}; route it to AdamW with "
                      "a param group {'algorithm': 'adamw'} or a config rule")


def _check_muon_param(entry: ParamPlan, param: torch.Tensor) -> None:
    if param.is_complex():
        raise _refuse_for_muon(entry, f"Muon does not support complex parameters ({param.dtype=})")
    if not param.is_floating_point():
        raise _refuse_for_muon(entry, f"Muon needs a real floating tensor, got {param.dtype=}")
    if param.grad is not None and param.grad.is_sparse:
        raise _refuse_for_muon(entry, "its gradient is sparse and Muon needs dense ones")


def _checked_lr(lr: torch.Tensor) -> torch.Tensor:
    if lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    return lr


def _take_tensor_lrs(spec: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`spec` (keyword overrides or a group dict) with each tensor learning rate replaced by its
    float value, for the config's checks, and the tensors by the half ("muon", "adamw") they set.

    A top-level `lr` is the AdamW half's in a group with `"algorithm": "adamw"`, else Muon's."""
    if not isinstance(spec, Mapping):
        return spec, {}  # parse_group refuses it with a clear message
    spec, tensors = dict(spec), {}
    top = "adamw" if spec.get("algorithm") == "adamw" else "muon"
    if isinstance(spec.get("lr"), torch.Tensor):
        tensors[top] = _checked_lr(spec["lr"])
        spec["lr"] = float(spec["lr"])
    adamw = spec.get("adamw")
    if top == "muon" and isinstance(adamw, Mapping) and isinstance(adamw.get("lr"), torch.Tensor):
        tensors["adamw"] = _checked_lr(adamw["lr"])
        spec["adamw"] = {**adamw, "lr": float(adamw["lr"])}
    return spec, tensors


def _sets_lr(spec: Mapping[str, Any], half: str) -> bool:
    """Whether a group dict gives its own learning rate for `half`."""
    top = "adamw" if spec.get("algorithm") == "adamw" else "muon"
    adamw = spec.get("adamw")
    return (half == top and "lr" in spec) or (
        half == "adamw" and top == "muon" and isinstance(adamw, Mapping) and "lr" in adamw)


def _nonfinite_gradients(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters whose gradient holds NaN or Inf: one reduction and one sync per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        by_device.setdefault(p.grad.device, []).append(p)
    suspects = []
    for group in by_device.values():
        finite = torch.stack(torch._foreach_norm([p.grad for p in group])).isfinite()
        if not bool(finite.all()):
            suspects += [p for p, ok in zip(group, finite.tolist()) if not ok]
    # A 2-norm also overflows on huge finite values: confirm each suspect element by element.
    return [p for p in suspects if not bool(p.grad.isfinite().all())]


def _ns_settings(group: Mapping[str, Any]) -> tuple[str, muon_core.NSSchedule]:
    """Validate a Muon group's step settings; return its NS dtype name and schedule."""
    if group["momentum_kind"] not in ("ema", "sum"):
        raise ValueError(f"momentum_kind={group['momentum_kind']!r} is invalid: expected 'ema' "
                         "or 'sum'")
    schedule = muon_core.ns_schedule(group["ns_coefficients"], group["ns_steps"],
                                     group["ns_algorithm"])
    muon_core.resolve_dtype(group["ns_dtype"], torch)  # validates the name
    return group["ns_dtype"], schedule


def _update_momentum(grads: list[torch.Tensor], bufs: list[torch.Tensor],
                     group: Mapping[str, Any]) -> None:
    """`m = a m + b g` in place, `(a, b)` from `muon_core.momentum_coefficients` (EMA as a lerp)."""
    a, b = muon_core.momentum_coefficients(group["momentum"], group["momentum_kind"])
    if group["momentum_kind"] == "ema":
        torch._foreach_lerp_(bufs, grads, b)
    else:
        for buf in bufs:  # not _foreach_mul_: see _decay
            buf.mul_(a)
        torch._foreach_add_(bufs, grads, alpha=b)


def _decay(params: list[torch.Tensor], group: Mapping[str, Any]) -> None:
    """Decoupled weight decay `p *= 1 - lr wd`, one product per parameter as torch.optim.Muon.

    Not `torch._foreach_mul_`: it rounds a Python-number factor to the parameters' dtype first,
    which in bfloat16 turns 0.998 into 0.99609375 (twice the decay, and then some)."""
    factor = 1 - group["lr"] * group["weight_decay"]
    for p in params:
        p.mul_(factor)


def _round_into(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each updated master weight into its parameter (rounding to nearest)."""
    for param, target in pairs:
        if target is not param:
            param.copy_(target)


def _to_matrices(x: torch.Tensor, entry: ParamPlan) -> torch.Tensor:
    return x.view(entry.view_shape).permute(entry.perm).reshape(entry.matrix_shape)


def _direction(grad: torch.Tensor | None, buf: torch.Tensor, group: Mapping[str, Any],
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The direction to orthogonalize from the updated momentum `m` (into `out` if given):
    Nesterov's look-ahead `b g + a m`, `(a, b)` from `muon_core.momentum_coefficients` (EMA as a
    lerp, sum with `b = 1`); else `m`. Elementwise, so it works on any aligned views."""
    if not group["nesterov"]:
        return buf if out is None else out.copy_(buf)
    a, _ = muon_core.momentum_coefficients(group["momentum"], group["momentum_kind"])
    if group["momentum_kind"] == "ema":
        return torch.lerp(grad, buf, a, out=out)
    return torch.add(grad, buf, alpha=a, out=out)


def _write_direction(out: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, entry: ParamPlan,
                     rows: slice, group: Mapping[str, Any]) -> None:
    """Write the block `rows` of the direction (`_direction`) into `out` (in the NS dtype)."""
    grad_block = _to_matrices(grad, entry)[:, rows] if group["nesterov"] else None
    _direction(grad_block, _to_matrices(buf, entry)[:, rows], group, out=out)


def _add_block(param: torch.Tensor, entry: ParamPlan, rows: slice, update: torch.Tensor,
               alpha: float, decay: float | None = None) -> None:
    """`param += alpha * update` on the block `rows` of the parameter's matrix view (after
    cautious weight decay when `decay` is given)."""
    view = param.view(entry.view_shape).permute(entry.perm)
    if view.is_contiguous():
        decay_and_add_(view.view(entry.matrix_shape)[:, rows], update, alpha, decay)
        return
    matrices = view.reshape(entry.matrix_shape)  # a copy: write it back
    decay_and_add_(matrices[:, rows], update, alpha, decay)
    view.copy_(matrices.view(entry.permuted_shape))


class Muon(torch.optim.Optimizer):
    """Muon for the hidden matrices and AdamW for everything else, in one `torch.optim.Optimizer`.

    `params`: tensors (named "0", "1", ... by position), `(name, tensor)` pairs such as
    `model.named_parameters()`, or group dicts `{"params": [...], "names": [...],
    "algorithm": "muon" | "adamw", <hyper-parameters>}`. `config` (default `MuonConfig()`) and
    keyword `overrides` (MuonConfig field names) set the hyper-parameters; `module_kinds` maps
    names to "embedding", "head", "norm", "other" or "hidden" (or is the `ModuleHints` that
    `Muon.for_model` reads off the modules). `muon_core.plan` routes every parameter
    (`opt.plan` shows the table); each user group becomes two torch groups, its Muon half then
    its AdamW half (possibly empty), each with its own "lr", so schedulers scale both. `lr` (and
    `adamw["lr"]`) may be a 1-element tensor, as in torch.optim. `master_weights=True` keeps a
    float32 copy of every bfloat16/float16 parameter, updated by the step and rounded into the
    parameter.

    `process_group` (a `ProcessGroup` or 1-D `DeviceMesh`; default None: not sharded) shards
    the optimizer over replicated parameters: `shard="layerwise"` (one owner rank per Muon
    parameter) or `"zero1"` (a flat slice per rank); `shard_adamw` shards AdamW moments by
    whole parameters (else replicated). See docs/distributed.md and `reduce_gradients`.

    DTensor parameters (FSDP2's `fully_shard`, `parallelize_module`) need no process group:
    the mesh dimension named `tp_dim` is tensor-parallel (`config.tp_mode`), a sharded other
    dimension data-parallel (each matrix orthogonalized whole by one owner rank).
    """

    def __init__(self, params: Iterable[Any], config: MuonConfig | None = None, *,
                 module_kinds: Mapping[str, str] | ModuleHints | None = None,
                 master_weights: bool = False, process_group: Any = None,
                 shard: str | None = None, shard_adamw: bool = True, tp_dim: str = "tp",
                 **overrides: Any) -> None:
        config = MuonConfig() if config is None else config
        if not isinstance(config, MuonConfig):
            raise TypeError(f"config must be a MuonConfig, got {type(config).__name__}")
        if not isinstance(master_weights, bool):
            raise ValueError(f"master_weights={master_weights!r} is invalid: expected True or "
                             "False")
        self._master_weights = master_weights
        overrides, self._lr_tensors = _take_tensor_lrs(overrides)
        self.config = config.with_overrides(overrides, "Muon")
        self._module_kinds = as_hints(module_kinds)
        # Every parameter's plan entry, in the order the groups were added (the plan's order).
        self._entries: dict[torch.Tensor, ParamPlan] = {}
        self._sharding = self._dtensors = None
        # torch's schedulers read `lr` and, to cycle momentum, `momentum` here; AdamW halves hold
        # `momentum=None` (beta1 from `betas`) until a scheduler writes their beta1 there.
        super().__init__(params, {"lr": self._lr_tensors.get("muon", self.config.lr),
                                  "momentum": self.config.momentum})
        if process_group is not None:
            from muon_torch._distributed import Sharding

            self._sharding = Sharding(self, process_group, shard or "layerwise", shard_adamw)
        elif shard is not None:
            raise ValueError(f"shard={shard!r} needs a process_group: expected "
                             "Muon(..., process_group=pg, shard=...)")
        elif _has_dtensors(self._entries):  # FSDP2 / tensor-parallel parameters
            from muon_torch._dtensor import DTensorSharding

            self._dtensors = DTensorSharding(self, tp_dim)

    @classmethod
    def for_model(cls, model: nn.Module, config: MuonConfig | None = None,
                  **overrides: Any) -> Muon:
        """Build from a module, routing by module type: embeddings, tied weights, the output
        projection and norms go to AdamW, other Linear/Conv weights to Muon (see
        `muon_torch.module_kinds`); GPT-2's Conv1D weights are read (in, out) and fused Q/K/V
        projections split by their attention module's head counts."""
        opt = cls(model.named_parameters(), config, module_kinds=model_hints(model), **overrides)
        sparse = sparse_parameters(model)
        for param, entry in opt._entries.items():
            if entry.is_muon and id(param) in sparse:
                raise _refuse_for_muon(entry, "its embedding has sparse=True and Muon needs "
                                              "dense gradients")
        return opt

    @property
    def plan(self) -> Plan:
        """The routing decision for every parameter (print it for a table)."""
        device = next((p.device for p, e in self._entries.items() if e.is_muon),
                      torch.device("cpu"))
        return Plan(tuple(self._entries.values()), self.config,
                    muon_core.describe_ns_dtype(self.config.ns_dtype, device_facts(device),
                                                self.config.ns_algorithm))

    @property
    def owners(self) -> muon_core.OwnerTable | None:
        """With a process group: each Muon parameter's owner rank and the Newton-Schulz load
        per rank (print it for the table); None when not sharded."""
        return None if self._sharding is None else self._sharding.owners

    def reduce_gradients(self) -> None:
        """With a process group, used instead of DDP after `backward()`: average the gradients
        so that each rank receives exactly those it updates (see docs/distributed.md)."""
        if self._sharding is None:
            raise RuntimeError("reduce_gradients() needs Muon(..., process_group=pg)")
        self._sharding.reduce_gradients()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Route a user group's parameters and append its Muon half and its AdamW half."""
        if getattr(self, "_sharding", None) is not None or \
                getattr(self, "_dtensors", None) is not None:
            raise RuntimeError("add_param_group after construction is not supported with a "
                               "process_group or DTensor parameters: the owner table is fixed "
                               "at construction")
        spec, lr_tensors = _take_tensor_lrs(param_group)
        user = parse_group(spec, self.config, len(self._entries),
                           f"param group {len(self.param_groups) // 2}")
        self._check_new(user.names, user.params)
        shapes = {n: tuple(p.shape) for n, p in zip(user.names, user.params)}
        plan = muon_core.plan(shapes, user.config, layout="out_in",
                              algorithms=dict.fromkeys(user.names, user.algorithm)
                              if user.algorithm else None,
                              **self._module_kinds.plan_keywords(user.names))
        for entry, param in zip(plan, user.params):
            if entry.is_muon:
                _check_muon_param(entry, param)
        halves = {"muon": muon_hyperparameters(user.config),
                  "adamw": adamw_hyperparameters(user.config)}
        for algorithm, hyper in halves.items():
            chosen = [(e, p) for e, p in zip(plan, user.params) if e.algorithm == algorithm]
            params = [p for _, p in chosen]
            hyper["master_weights"] = self._master_weights
            if algorithm == "adamw":
                hyper.update(fused=_fused_adamw_supported(params), momentum=None)
            default_lr = None if _sets_lr(spec, algorithm) else self._lr_tensors.get(algorithm)
            lr = lr_tensors.get(algorithm, default_lr)
            if lr is not None:
                hyper["lr"] = lr
            super().add_param_group({"params": params,
                                     "param_names": [e.name for e, _ in chosen], **hyper})
        self._entries.update(zip(user.params, plan))

    def _check_new(self, names: tuple[str, ...], params: tuple[torch.Tensor, ...]) -> None:
        known_names = {e.name for e in self._entries.values()}
        in_this_group: set[torch.Tensor] = set()  # tensors hash by identity
        for name, param in zip(names, params):
            if name in known_names:
                raise ValueError(f"parameter name {name!r} appears twice: expected unique names "
                                 "(two modules' named_parameters()? give each a prefix: "
                                 "module.named_parameters(prefix='head'))")
            if param in self._entries or param in in_this_group:
                where = ("a parameter group with duplicate parameters" if param in in_this_group
                         else "some parameters appear in more than one parameter group")
                raise ValueError(f"{where}: parameter {name!r} with shape {tuple(param.shape)} "
                                 "is already in this optimizer: each tensor may appear once")
            known_names.add(name)
            in_this_group.add(param)

    def state_dict(self) -> dict[str, Any]:
        """torch's format; with a process group, a name-keyed dict of this rank's whole
        tensors for `torch.distributed.checkpoint` (loads onto any world size)."""
        if self._sharding is not None:
            return self._sharding.state_dict()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by `state_dict()` from an optimizer routed the same way; the
        groups keep this optimizer's parameter names."""
        if self._sharding is not None:
            return self._sharding.load_state_dict(state_dict)
        saved_groups = state_dict["param_groups"]
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if saved.get("algorithm") != group["algorithm"]:
                raise ValueError(f"param group {i} holds {group['algorithm']} parameters but the "
                                 f"state dict's group {i} has algorithm={saved.get('algorithm')!r}"
                                 ": expected a state saved by muon_torch.Muon on the same model")
            for index, param in zip(saved["params"], group["params"]):
                for key, value in state_dict["state"].get(index, {}).items():
                    expected, what = state_shape(key, self._state_entry(param, key), saved)
                    if isinstance(value, torch.Tensor) and value.ndim \
                            and tuple(value.shape) != expected:
                        raise ValueError(f"state {key!r} of parameter "
                                         f"{self._entries[param].name!r} has shape "
                                         f"{tuple(value.shape)}, expected {what} {expected}")
        super().load_state_dict(state_dict)
        for group, saved in zip(self.param_groups, saved_groups):
            # the names this optimizer's plan routed by
            group["param_names"] = [self._entries[p].name for p in group["params"]]
            if group.get("master_weights"):  # torch cast the state to the parameter's dtype
                for index, param in zip(saved["params"], group["params"]):
                    for key, value in state_dict["state"].get(index, {}).items():
                        if key != "step" and param.dtype in LOW_PRECISION:
                            self.state[param][key] = value.to(
                                device=param.device, dtype=torch.float32, copy=True)

    def _state_entry(self, param: torch.Tensor, key: str) -> ParamPlan:
        """The plan entry a state tensor `key` of `param` is shaped by on this rank."""
        if key == STATE_KEY and self._dtensors is not None:
            return self._dtensors.moment_entry(param)
        return self._entries[param]

    def __getstate__(self) -> dict[str, Any]:
        if self._sharding is not None or self._dtensors is not None:
            raise TypeError("a Muon with a process_group or DTensor parameters cannot be "
                            "pickled or deep-copied: "
                            "save state_dict() with torch.distributed.checkpoint instead")
        return {**super().__getstate__(), "config": self.config, "_lr_tensors": self._lr_tensors,
                "_master_weights": self._master_weights, "_module_kinds": self._module_kinds,
                "_entries": self._entries, "_sharding": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also called by `load_state_dict`: an AdamW `step` saved as a Python number (older
        checkpoints) becomes the float32 tensor the step expects, on the parameter's device
        when the group is fused."""
        super().__setstate__(state)
        for group in self.param_groups:
            if group.get("algorithm") != "adamw":
                continue
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(
                        float(p_state["step"]), dtype=torch.float32,
                        device=p.device if group.get("fused") else None)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step on every parameter that has a gradient; returns the closure's loss.

        Gradients with NaN or Inf raise FloatingPointError (or, with `nonfinite="skip"`, skip
        the step) before anything changes.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._sharding is not None or self._dtensors is not None:
            (self._sharding or self._dtensors).step()
            return loss
        work = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        muon = [(g, ps, *_ns_settings(g)) for g, ps in work if g["algorithm"] == "muon" and ps]
        if not self._gradients_usable([p for _, params in work for p in params]):
            return loss
        self._muon_step(muon)
        for group, params in work:
            if group["algorithm"] == "adamw" and params:
                self._adamw_step(group, params)
        return loss

    def qk_clip(self, qk_max: Mapping[str, Any]) -> None:
        """QK-clip after `step()`: scale down in place the query and key rows of each head whose
        logit in `qk_max` (layer name -> per-head maxima, see `record_qk_max`) exceeded
        `config.qk_clip.threshold`."""
        _qk_clip({e.name: p for p, e in self._entries.items()}, qk_max, self.plan, self.config)

    def _gradients_usable(self, params: list[torch.Tensor]) -> bool:
        """Refuse sparse gradients; raise on NaN/Inf, or return False to skip the step."""
        for p in params:
            if p.grad.is_sparse:
                entry = self._entries[p]
                raise ValueError(f"parameter {entry.name!r} with shape {entry.shape} has a sparse "
                                 "gradient: expected dense gradients; nothing was updated")
        bad = [self._entries[p] for p in _nonfinite_gradients(params)]
        return muon_core.step_allowed([e.name for e in bad], {e.name: e.shape for e in bad},
                                      self.config.nonfinite)

    def _targets(self, group: Mapping[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the step updates for each parameter: the parameter, or with `master_weights`
        the float32 copy of a bfloat16/float16 one (state "master_weight")."""
        if not group.get("master_weights"):
            return params
        for p in params:
            if p.dtype in LOW_PRECISION and "master_weight" not in self.state[p]:
                self.state[p]["master_weight"] = p.detach().to(torch.float32, copy=True)
        return [self.state[p]["master_weight"] if p.dtype in LOW_PRECISION else p
                for p in params]

    def _muon_step(self, work: list[tuple]) -> None:
        """Momentum per group, then one Newton-Schulz call per (device, block shape, settings)."""
        batches: dict[tuple, list[tuple]] = {}
        synced = []
        for group, params, dtype_name, schedule in work:
            targets = self._targets(group, params)
            for p, target in zip(params, targets):
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(
                        target, memory_format=torch.preserve_format)
                ensure_second_moment(self.state[p], target, self._entries[p], group)
            grads = [p.grad.to(target.dtype) for p, target in zip(params, targets)]
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            _update_momentum(grads, bufs, group)
            if cautious_factor(group) is None:  # else decayed block by block after NS
                _decay(targets, group)
            synced += zip(params, targets)
            for p, target, grad, buf in zip(params, targets, grads, bufs):
                entry = self._entries[p]
                for start, size, scale in zip(entry.block_offsets, entry.blocks, entry.lr_scales):
                    key = (p.device, size, entry.matrix_shape[2], ns_dtype(dtype_name, p.device),
                           schedule, group["eps"])
                    batches.setdefault(key, []).append(
                        (p, target, entry, slice(start, start + size), grad, buf, group,
                         -group["lr"] * scale))
        for (device, rows, cols, dtype, schedule, eps), blocks in batches.items():
            counts = [block[2].matrix_shape[0] for block in blocks]
            stack = torch.empty((sum(counts), rows, cols), dtype=dtype, device=device)
            for (_, _, entry, rows, grad, buf, group, _), out in zip(blocks, stack.split(counts)):
                _write_direction(out, grad, buf, entry, rows, group)
            updates = second_moments(newton_schulz(stack, schedule, eps, out=stack).split(counts),
                                     [(self.state[p], entry, rows, group)
                                      for p, _, entry, rows, _, _, group, _ in blocks])
            for (_, target, entry, rows, *_, group, alpha), update in zip(blocks, updates):
                _add_block(target, entry, rows, update, alpha, cautious_factor(group))
        _round_into(synced)

    def _adamw_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """torch's AdamW arithmetic (its fused kernel where the device has one)."""
        fused = group.get("fused", False)
        targets = self._targets(group, params)
        for p, target in zip(params, targets):
            state = self.state[p]
            if "step" not in state:
                state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if fused
                                 else torch.tensor(0.0, dtype=torch.float32))
                state["exp_avg"] = torch.zeros_like(target, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(target,
                                                       memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        if group.get("momentum") is not None:  # beta1 written by a momentum-cycling scheduler
            beta1 = group["momentum"]
        adamw_functional(targets, [p.grad.to(t.dtype) for p, t in zip(params, targets)],
                         [s["exp_avg"] for s in states],
                         [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
                         fused=True if fused else None,
                         has_complex=any(torch.is_complex(p) for p in params), amsgrad=False,
                         beta1=beta1, beta2=beta2, lr=group["lr"],
                         weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        _round_into(zip(params, targets))
