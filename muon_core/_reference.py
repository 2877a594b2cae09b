"""The reference step: the whole optimizer as a pure function on Array API arrays.

It is the executable specification that every backend is checked against; it favours
clarity over speed and never modifies its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from array_api_compat import array_namespace

from muon_core._adaptive import apply_second_moment, init_second_moment
from muon_core._config import MOMENTUM_KINDS, NONFINITE_POLICIES, MuonConfig
from muon_core._ns import _newton_schulz, ns_schedule, resolve_dtype
from muon_core._plan import ParamPlan, Plan, plan as make_plan

State = dict[str, dict[str, Any]]


def _shape_text(x: Any) -> str:
    return "x".join(map(str, x.shape)) or "scalar"


def check_gradients(params: Mapping[str, Any], grads: Mapping[str, Any]) -> list[str]:
    """Validate names and shapes; return the names whose gradient has NaN or Inf."""
    bad = []
    for name, grad in grads.items():
        if grad is None:
            continue
        if name not in params:
            raise KeyError(f"gradient for {name!r} has no matching parameter")
        param = params[name]
        if tuple(grad.shape) != tuple(param.shape):
            raise ValueError(f"gradient of {name!r} has shape {tuple(grad.shape)}, "
                             f"expected the parameter's shape {tuple(param.shape)}")
        xp = array_namespace(grad)
        if not bool(xp.all(xp.isfinite(grad))):
            bad.append(name)
    return bad


def nonfinite_message(names: list[str], shapes: Mapping[str, Any]) -> str:
    """The error text for gradients with NaN or Inf (shared by every backend)."""
    listed = ", ".join(f"{n!r} ({'x'.join(map(str, shapes[n])) or 'scalar'})" for n in names)
    return (f"non-finite gradient (NaN or Inf) in {listed}; nothing was updated. "
            "Set nonfinite='skip' in the config to skip such steps instead")


def init_state(params: Mapping[str, Any], plan: Plan) -> State:
    """Zero state for every parameter: `momentum_buffer` (and `second_moment` when the config
    has one) for Muon, AdamW moments and step else."""
    state: State = {}
    for entry in plan:
        p = params[entry.name]
        xp = array_namespace(p)
        if entry.is_muon:
            state[entry.name] = {"momentum_buffer": xp.zeros_like(p),
                                 **init_second_moment(p, entry, plan.config)}
        else:
            state[entry.name] = {"step": 0, "exp_avg": xp.zeros_like(p),
                                 "exp_avg_sq": xp.zeros_like(p)}
    return state


def momentum_coefficients(beta: Any, kind: str) -> tuple[Any, Any]:
    """`(a, b)` of the momentum step `m <- a m + b g`: EMA `(beta, 1 - beta)`, sum `(beta, 1)`.

    `beta` may be any scalar (a traced array under jit). Nesterov's look-ahead direction is
    `b g + a m` with the new `m`.
    """
    if kind not in MOMENTUM_KINDS:
        raise ValueError(f"momentum_kind={kind!r} is invalid: expected one of {list(MOMENTUM_KINDS)}")
    return beta, (1.0 - beta if kind == "ema" else 1.0)


def momentum_update(grad: Any, buf: Any, beta: Any, kind: str, nesterov: bool,
                    accept: Any = None) -> tuple[Any, Any]:
    """Return (direction to orthogonalize, new momentum buffer).

    EMA: `m = beta m + (1 - beta) g`; sum: `m = beta m + g`. Nesterov looks one step ahead:
    EMA `u = (1 - beta) g + beta m`, sum `u = g + beta m`; without it `u = m`. The arithmetic
    runs in the wider of the two dtypes; the buffer keeps its dtype and the direction the
    gradient's, so low-precision gradients never round a wider buffer. `accept` (a boolean
    scalar array, or None for True) refuses the step where false: the buffer stays as it was,
    and the direction, derived from the kept buffer, is for the caller to discard.
    """
    xp = array_namespace(grad, buf)
    a, b = momentum_coefficients(beta, kind)
    wide = xp.astype(grad, xp.result_type(grad, buf))
    new_buf = xp.astype(a * buf + b * wide, buf.dtype)
    if accept is not None:
        new_buf = xp.where(accept, new_buf, buf)
    direction = b * wide + a * new_buf if nesterov else new_buf
    return xp.astype(direction, grad.dtype), new_buf


def decay_factor(lr: Any, weight_decay: Any) -> Any:
    """The decoupled weight decay's factor: `p <- p * (1 - lr * wd)` before the step."""
    return 1.0 - lr * weight_decay


def decayed_param(param: Any, update: Any, config: MuonConfig) -> Any:
    """The parameter after decoupled weight decay `p * decay_factor(lr, wd)`; with
    `cautious_weight_decay`, only where the update (the descent direction, subtracted) and
    the parameter agree in sign: `u * p >= 0`."""
    decayed = param * decay_factor(config.lr, config.weight_decay)
    if not config.cautious_weight_decay:
        return decayed
    xp = array_namespace(param)
    return xp.where(update * param >= 0, decayed, param)


def step_allowed(bad: Sequence[str], shapes: Mapping[str, Any], policy: str) -> bool:
    """The NaN/Inf decision of every backend, given the names whose gradient is not finite.

    True when there are none; otherwise policy "raise" raises FloatingPointError naming them
    and "skip" returns False (the whole step is skipped: nothing changes).
    """
    if not bad:
        return True
    if policy == "raise":
        raise FloatingPointError(nonfinite_message(list(bad), shapes))
    if policy != "skip":
        raise ValueError(f"nonfinite={policy!r} is invalid: expected one of "
                         f"{list(NONFINITE_POLICIES)}")
    return False


def to_matrices(x: Any, entry: ParamPlan, *, xp: Any = None) -> Any:
    """View a parameter-shaped array as the plan's `(batch, rows, cols)` matrices."""
    xp = xp or array_namespace(x)
    viewed = xp.reshape(x, entry.view_shape) if entry.view_shape else x
    return xp.reshape(xp.permute_dims(viewed, entry.perm), entry.matrix_shape)


def from_matrices(m: Any, entry: ParamPlan, *, xp: Any = None) -> Any:
    """Undo `to_matrices`."""
    xp = xp or array_namespace(m)
    viewed = xp.permute_dims(xp.reshape(m, entry.permuted_shape), entry.inverse_perm)
    return xp.reshape(viewed, entry.shape)


def orthogonalized_blocks(direction: Any, entry: ParamPlan, config: MuonConfig) -> Any:
    """Newton-Schulz of each block of the matrix view, in the direction's dtype, unscaled:
    `(batch, rows, cols)`."""
    xp = array_namespace(direction)
    schedule = ns_schedule(config.ns_coefficients, config.ns_steps, config.ns_algorithm)
    work = to_matrices(xp.astype(direction, resolve_dtype(config.ns_dtype, xp)), entry, xp=xp)
    pieces = []
    for start, rows in zip(entry.block_offsets, entry.blocks):
        block = _newton_schulz(work[:, start:start + rows, :], schedule, config.eps, xp=xp)
        pieces.append(xp.astype(block, direction.dtype))
    return xp.concat(pieces, axis=1)


def scaled_update(matrices: Any, entry: ParamPlan) -> Any:
    """Multiply each block of a matrix view by its LR scale; return it parameter-shaped."""
    xp = array_namespace(matrices)
    pieces = [matrices[:, start:start + rows, :] * scale for start, rows, scale in
              zip(entry.block_offsets, entry.blocks, entry.lr_scales)]
    return from_matrices(xp.concat(pieces, axis=1), entry, xp=xp)


def muon_update(direction: Any, entry: ParamPlan, config: MuonConfig) -> Any:
    """Orthogonalize each block of the matrix view and multiply by its LR scale."""
    return scaled_update(orthogonalized_blocks(direction, entry, config), entry)


def _muon_param(p: Any, g: Any, st: dict, entry: ParamPlan, config: MuonConfig):
    direction, buf = momentum_update(g, st["momentum_buffer"], config.momentum,
                                     config.momentum_kind, config.nesterov)
    matrices, moments = apply_second_moment(orthogonalized_blocks(direction, entry, config), st,
                                            entry, config)
    update = scaled_update(matrices, entry)
    new_p = decayed_param(p, update, config) - config.lr * update
    return new_p, {"momentum_buffer": buf, **moments}


def _adamw_param(p: Any, g: Any, st: dict, config: MuonConfig):
    xp = array_namespace(p)
    hp = config.adamw
    beta1, beta2 = hp.betas
    step = st["step"] + 1
    exp_avg = beta1 * st["exp_avg"] + (1.0 - beta1) * g
    exp_avg_sq = beta2 * st["exp_avg_sq"] + (1.0 - beta2) * (g * g)
    step_size = hp.lr / (1.0 - beta1**step)
    denom = xp.sqrt(exp_avg_sq) / math.sqrt(1.0 - beta2**step) + hp.eps
    new_p = p * decay_factor(hp.lr, hp.weight_decay) - step_size * (exp_avg / denom)
    return new_p, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def reference_step(params: Mapping[str, Any], grads: Mapping[str, Any], state: State | None,
                   config: MuonConfig, plan: Plan | None = None) -> tuple[dict, State]:
    """One optimizer step: `(params, grads, state, config) -> (new params, new state)`.

    Muon parameters: momentum, Newton-Schulz per block in `config.ns_dtype` (float32 where the
    namespace has no bfloat16), then `p <- p (1 - lr wd) - lr * scale * O`. AdamW parameters:
    torch's AdamW with decoupled decay. A parameter whose gradient is None is left alone.
    Non-finite gradients raise (or, with `nonfinite="skip"`, return the inputs unchanged).
    """
    plan = plan or make_plan({n: tuple(p.shape) for n, p in params.items()}, config)
    bad = check_gradients(params, grads)
    if not step_allowed(bad, {n: params[n].shape for n in bad}, config.nonfinite):
        return dict(params), dict(state or {})
    state = dict(state or {})
    state |= init_state(params, Plan(tuple(e for e in plan if e.name not in state), plan.config))
    new_params, new_state = dict(params), state
    for entry in plan:
        grad = grads.get(entry.name)
        if grad is None:
            continue
        p, st = params[entry.name], state[entry.name]
        if entry.is_muon:
            new_params[entry.name], new_state[entry.name] = _muon_param(p, grad, st, entry, config)
        else:
            new_params[entry.name], new_state[entry.name] = _adamw_param(p, grad, st, config)
    return new_params, new_state
