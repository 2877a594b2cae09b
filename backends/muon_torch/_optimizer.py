"""`Muon`: one torch optimizer, Muon on the matrices the core's plan picks and AdamW on the rest."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import muon_core
import torch
from muon_core import MuonConfig, ParamPlan, Plan
from torch import nn
from torch.optim.adamw import adamw as adamw_functional
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from muon_torch._adaptive import (cautious_factor, decay_and_add_, ensure_second_moment,
                                  second_moments, state_shape)
from muon_torch._groups import (adamw_hyperparameters, muon_hyperparameters, parse_group,
                                with_overrides)
from muon_torch._model import module_kinds, sparse_parameters
from muon_torch._newton_schulz import newton_schulz

def _fused_adamw_supported(params: Iterable[torch.Tensor]) -> bool:
    devices = _get_fused_kernels_supported_devices()
    return all(p.device.type in devices and p.is_floating_point() for p in params)


def _refuse_for_muon(entry: ParamPlan, problem: str) -> ValueError:
    return ValueError(f"parameter {entry.name!r} with shape {entry.shape} is routed to muon by "
                      f"{entry.decided_by} ({entry.why}), but {problem}; route it to AdamW with "
                      "a param group {'algorithm': 'adamw'} or a config rule")


def _check_muon_param(entry: ParamPlan, param: torch.Tensor) -> None:
    if not param.is_floating_point():
        raise _refuse_for_muon(entry, f"Muon needs a real floating tensor, got {param.dtype=}")
    if param.grad is not None and param.grad.is_sparse:
        raise _refuse_for_muon(entry, "its gradient is sparse and Muon needs dense ones")


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


def _ns_settings(group: Mapping[str, Any]) -> tuple[torch.dtype, muon_core.NSSchedule]:
    """Validate a Muon group's step settings; return its NS dtype and schedule."""
    if group["momentum_kind"] not in ("ema", "sum"):
        raise ValueError(f"momentum_kind={group['momentum_kind']!r} is invalid: expected 'ema' "
                         "or 'sum'")
    schedule = muon_core.ns_schedule(group["ns_coefficients"], group["ns_steps"])
    return muon_core.resolve_dtype(group["ns_dtype"], torch), schedule


def _update_momentum(grads: list[torch.Tensor], bufs: list[torch.Tensor],
                     group: Mapping[str, Any]) -> None:
    """EMA: `m = beta m + (1 - beta) g`; sum: `m = beta m + g` (in place)."""
    beta = group["momentum"]
    if group["momentum_kind"] == "ema":
        torch._foreach_lerp_(bufs, grads, 1.0 - beta)
    else:
        torch._foreach_mul_(bufs, beta)
        torch._foreach_add_(bufs, grads)


def _to_matrices(x: torch.Tensor, entry: ParamPlan) -> torch.Tensor:
    return x.permute(entry.perm).reshape(entry.matrix_shape)


def _write_direction(out: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, entry: ParamPlan,
                     rows: slice, group: Mapping[str, Any]) -> None:
    """Write the block `rows` of the direction to orthogonalize into `out` (in the NS dtype).

    Nesterov looks one step ahead: EMA `(1 - beta) g + beta m`, sum `g + beta m`; else `m`.
    """
    momentum = _to_matrices(buf, entry)[:, rows]
    if not group["nesterov"]:
        out.copy_(momentum)
    elif group["momentum_kind"] == "ema":
        torch.lerp(_to_matrices(grad, entry)[:, rows], momentum, group["momentum"], out=out)
    else:
        torch.add(_to_matrices(grad, entry)[:, rows], momentum, alpha=group["momentum"], out=out)


def _add_block(param: torch.Tensor, entry: ParamPlan, rows: slice, update: torch.Tensor,
               alpha: float, decay: float | None = None) -> None:
    """`param += alpha * update` on the block `rows` of the parameter's matrix view (after
    cautious weight decay when `decay` is given)."""
    view = param.permute(entry.perm)
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
    names to "embedding", "head", "norm" or "hidden" (see `Muon.for_model`). `muon_core.plan`
    routes every parameter (`opt.plan` shows the table); each user group becomes two torch
    groups, its Muon half then its AdamW half (possibly empty), each with its own "lr", so
    schedulers scale both.
    """

    def __init__(self, params: Iterable[Any], config: MuonConfig | None = None, *,
                 module_kinds: Mapping[str, str] | None = None, **overrides: Any) -> None:
        config = MuonConfig() if config is None else config
        if not isinstance(config, MuonConfig):
            raise TypeError(f"config must be a MuonConfig, got {type(config).__name__}")
        self.config = with_overrides(config, overrides, "Muon")
        self._module_kinds = dict(module_kinds or {})
        # Every parameter's plan entry, in the order the groups were added (the plan's order).
        self._entries: dict[torch.Tensor, ParamPlan] = {}
        super().__init__(params, {})

    @classmethod
    def for_model(cls, model: nn.Module, config: MuonConfig | None = None,
                  **overrides: Any) -> Muon:
        """Build from a module, routing by module type: embeddings, tied weights, the output
        projection (last `nn.Linear`) and norms go to AdamW, other Linear/Conv weights to Muon."""
        opt = cls(model.named_parameters(), config, module_kinds=module_kinds(model), **overrides)
        sparse = sparse_parameters(model)
        for param, entry in opt._entries.items():
            if entry.is_muon and id(param) in sparse:
                raise _refuse_for_muon(entry, "its embedding has sparse=True and Muon needs "
                                              "dense gradients")
        return opt

    @property
    def plan(self) -> Plan:
        """The routing decision for every parameter (print it for a table)."""
        return Plan(tuple(self._entries.values()), self.config)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Route a user group's parameters and append its Muon half and its AdamW half."""
        user = parse_group(param_group, self.config, len(self._entries),
                           f"param group {len(self.param_groups) // 2}")
        self._check_new(user.names, user.params)
        shapes = {n: tuple(p.shape) for n, p in zip(user.names, user.params)}
        plan = muon_core.plan(shapes, user.config, layout="out_in",
                              algorithms=dict.fromkeys(user.names, user.algorithm)
                              if user.algorithm else None,
                              module_kinds={n: self._module_kinds[n] for n in user.names
                                            if n in self._module_kinds})
        for entry, param in zip(plan, user.params):
            if entry.is_muon:
                _check_muon_param(entry, param)
        halves = {"muon": muon_hyperparameters(user.config),
                  "adamw": adamw_hyperparameters(user.config)}
        for algorithm, hyper in halves.items():
            chosen = [(e, p) for e, p in zip(plan, user.params) if e.algorithm == algorithm]
            params = [p for _, p in chosen]
            if algorithm == "adamw":
                hyper["fused"] = _fused_adamw_supported(params)
            super().add_param_group({"params": params,
                                     "param_names": [e.name for e, _ in chosen], **hyper})
        self._entries.update(zip(user.params, plan))

    def _check_new(self, names: tuple[str, ...], params: tuple[torch.Tensor, ...]) -> None:
        known_names = {e.name for e in self._entries.values()}
        known_params = set(self._entries)  # tensors hash by identity
        for name, param in zip(names, params):
            if name in known_names:
                raise ValueError(f"parameter name {name!r} appears twice: expected unique names")
            if param in known_params:
                raise ValueError(f"parameter {name!r} with shape {tuple(param.shape)} is already "
                                 "in this optimizer: each tensor may appear once")
            known_names.add(name)
            known_params.add(param)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by `state_dict()` from an optimizer routed the same way."""
        saved_groups = state_dict["param_groups"]
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if saved.get("algorithm") != group["algorithm"]:
                raise ValueError(f"param group {i} holds {group['algorithm']} parameters but the "
                                 f"state dict's group {i} has algorithm={saved.get('algorithm')!r}"
                                 ": expected a state saved by muon_torch.Muon on the same model")
            for index, param in zip(saved["params"], group["params"]):
                for key, value in state_dict["state"].get(index, {}).items():
                    expected, what = state_shape(key, self._entries[param], saved)
                    if value.ndim and tuple(value.shape) != expected:
                        raise ValueError(f"state {key!r} of parameter "
                                         f"{self._entries[param].name!r} has shape "
                                         f"{tuple(value.shape)}, expected {what} {expected}")
        super().load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "config": self.config,
                "_module_kinds": self._module_kinds, "_entries": self._entries}

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
        work = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        muon = [(g, ps, *_ns_settings(g)) for g, ps in work if g["algorithm"] == "muon" and ps]
        if not self._gradients_usable([p for _, params in work for p in params]):
            return loss
        self._muon_step(muon)
        for group, params in work:
            if group["algorithm"] == "adamw" and params:
                self._adamw_step(group, params)
        return loss

    def _gradients_usable(self, params: list[torch.Tensor]) -> bool:
        """Refuse sparse gradients; raise on NaN/Inf, or return False to skip the step."""
        for p in params:
            if p.grad.is_sparse:
                entry = self._entries[p]
                raise ValueError(f"parameter {entry.name!r} with shape {entry.shape} has a sparse "
                                 "gradient: expected dense gradients; nothing was updated")
        bad = _nonfinite_gradients(params)
        if not bad:
            return True
        if self.config.nonfinite == "skip":
            return False
        names = [self._entries[p].name for p in bad]
        shapes = {self._entries[p].name: self._entries[p].shape for p in bad}
        raise FloatingPointError(muon_core.nonfinite_message(names, shapes))

    def _muon_step(self, work: list[tuple]) -> None:
        """Momentum per group, then one Newton-Schulz call per (device, block shape, settings)."""
        batches: dict[tuple, list[tuple]] = {}
        for group, params, dtype, schedule in work:
            for p in params:
                if not self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)
                ensure_second_moment(self.state[p], p, self._entries[p], group)
            grads = [p.grad for p in params]
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            _update_momentum(grads, bufs, group)
            if cautious_factor(group) is None:  # else decayed block by block after NS
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            for p, grad, buf in zip(params, grads, bufs):
                entry = self._entries[p]
                for start, size, scale in zip(entry.block_offsets, entry.blocks, entry.lr_scales):
                    key = (p.device, size, entry.matrix_shape[2], dtype, schedule, group["eps"])
                    batches.setdefault(key, []).append(
                        (p, entry, slice(start, start + size), grad, buf, group,
                         -group["lr"] * scale))
        for (device, rows, cols, dtype, schedule, eps), blocks in batches.items():
            counts = [block[1].matrix_shape[0] for block in blocks]
            stack = torch.empty((sum(counts), rows, cols), dtype=dtype, device=device)
            for (p, entry, rows, grad, buf, group, _), out in zip(blocks, stack.split(counts)):
                _write_direction(out, grad, buf, entry, rows, group)
            updates = second_moments(newton_schulz(stack, schedule, eps, out=stack).split(counts),
                                     [(self.state[p], entry, rows, group)
                                      for p, entry, rows, _, _, group, _ in blocks])
            for (p, entry, rows, grad, buf, group, alpha), update in zip(blocks, updates):
                _add_block(p, entry, rows, update, alpha, cautious_factor(group))

    def _adamw_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """torch's AdamW arithmetic (its fused kernel where the device has one)."""
        fused = group.get("fused", False)
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if fused
                                 else torch.tensor(0.0, dtype=torch.float32))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw_functional(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                         [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
                         fused=True if fused else None,
                         has_complex=any(torch.is_complex(p) for p in params), amsgrad=False,
                         beta1=beta1, beta2=beta2, lr=group["lr"],
                         weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
