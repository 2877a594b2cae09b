"""Muon as optax gradient transformations: `scale_by_muon` (the primitive) and `muon`."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

import muon_core
from muon_core import (
    MuonConfig, ParamPlan, Plan, from_matrices, nonfinite_message, ns_schedule, to_matrices,
)
from muon_jax._adaptive import (check_second_moments, decay_target, init_second_moments,
                                second_moments)
from muon_jax._ns import ns_dtype, orthogonalize_batch

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


# -- non-finite gradients ----------------------------------------------------------------------
@functools.partial(jax.tree_util.register_dataclass, data_fields=["count", "latest"],
                   meta_fields=["names", "shapes"])
@dataclasses.dataclass(frozen=True)
class NonfiniteRecord:
    """Steps refused for NaN/Inf so far (`count`), and which leaves (`names`, in order) had
    NaN/Inf in the latest step (`latest`, a bool vector); read it with `raise_if_nonfinite`."""

    count: jax.Array
    latest: jax.Array
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]


class ScaleByMuonState(NamedTuple):
    """State of `scale_by_muon`: `momentum_buffer[name]` for each Muon leaf (params' dtype),
    and `second_moment[name]` when the config has one."""

    momentum_buffer: dict[str, jax.Array]
    second_moment: dict[str, jax.Array]
    nonfinite: NonfiniteRecord


class MuonState(NamedTuple):
    """State of `muon`, keyed by leaf name (see `leaf_names`).

    In the core reference's format (`muon_core.reference_step`): a Muon leaf's
    `{"momentum_buffer": b}` is `momentum_buffer[name]`; an AdamW leaf's
    `{"step": s, "exp_avg": m, "exp_avg_sq": v}` is `(count, mu[name], nu[name])`, one
    `count` for every AdamW leaf. A Muon leaf's `second_moment` (when the config has one) is
    `second_moment[name]`. `nonfinite` records the steps refused for NaN/Inf.
    """

    count: jax.Array
    momentum_buffer: dict[str, jax.Array]
    mu: dict[str, jax.Array]
    nu: dict[str, jax.Array]
    second_moment: dict[str, jax.Array]
    nonfinite: NonfiniteRecord


# -- names and routing -----------------------------------------------------------------------
def _key_text(key: Any) -> str:
    if isinstance(key, (DictKey, FlattenedIndexKey)):
        return str(key.key)
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, SequenceKey):
        return str(key.idx)
    return str(key)


def _flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Leaf names, leaves and the tree structure; names must be unique."""
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
    return _flatten(tree)[0]


@functools.lru_cache(maxsize=64)
def _cached_plan(shapes: tuple[tuple[str, tuple[int, ...]], ...], config: MuonConfig,
                 layout: str, algorithms: tuple[tuple[str, str], ...]) -> Plan:
    return muon_core.plan(dict(shapes), config, layout=layout, algorithms=dict(algorithms))


def _plan(names: list[str], leaves: list[Any], config: MuonConfig, layout: str,
          algorithms: Mapping[str, str] | None) -> Plan:
    unknown = sorted(set(algorithms or {}) - set(names))
    if unknown:
        raise ValueError(f"algorithms names {unknown}, which are not leaves of the parameters: "
                         f"expected names from {names[:8]}{' ...' if len(names) > 8 else ''}")
    shapes = tuple((n, tuple(int(s) for s in jnp.shape(x))) for n, x in zip(names, leaves))
    return _cached_plan(shapes, config, layout, tuple(sorted((algorithms or {}).items())))


def plan_for(params: Any, config: MuonConfig | None = None, *, layout: str = "in_out",
             algorithms: Mapping[str, str] | None = None) -> Plan:
    """The routing plan `muon` uses for this pytree of parameters (print it for a table)."""
    names, leaves, _ = _flatten(params)
    return _plan(names, leaves, config or MuonConfig(), layout, algorithms)


# -- hyper-parameters ------------------------------------------------------------------------
def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _injected(name: str, value: Any) -> Any:
    """Check an array-valued injectable: a real scalar; returns it, or a float when concrete."""
    if jnp.ndim(value) != 0 or not jnp.issubdtype(jnp.result_type(value), jnp.number):
        raise TypeError(f"{name} must be a real scalar, got shape {jnp.shape(value)} "
                        f"and dtype {jnp.result_type(value)}")
    return value if _is_traced(value) else float(value)


def resolve(config: MuonConfig | None, overrides: Mapping[str, Any]) -> tuple[MuonConfig, Hyper]:
    """Apply keyword overrides to the config; injectable ones may be (traced) jnp scalars.

    Python numbers and concrete arrays are validated by `MuonConfig`; a traced value cannot
    be checked and is used as it is.
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
        if _is_traced(given[name]):
            traced[name] = given.pop(name)
    adamw = {ADAMW_OVERRIDES[k]: given.pop(k) for k in list(given) if k in ADAMW_OVERRIDES}
    if adamw:
        given["adamw"] = dataclasses.replace(config.adamw, **adamw)
    config = config.replace(**given)
    plain = {"lr": config.lr, "momentum": config.momentum, "weight_decay": config.weight_decay,
             "adamw_lr": config.adamw.lr, "adamw_weight_decay": config.adamw.weight_decay}
    return config, Hyper(**{**plain, **traced})


def _with_override_keywords(factory: Callable) -> Callable:
    """List every override as a keyword-only parameter in the signature.

    optax.inject_hyperparams reads the signature: each hyper-parameter must be a named
    parameter (not hidden in `**overrides`) for it to be injected.
    """
    fixed = list(inspect.signature(factory).parameters.values())[:-1]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
             for name in OVERRIDES]
    factory.__signature__ = inspect.Signature(
        fixed + extra, return_annotation=optax.GradientTransformation)
    return factory


# -- validation ------------------------------------------------------------------------------
def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _check_leaves(names: list[str], leaves: list[Any], what: str) -> None:
    for name, leaf in zip(names, leaves):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{what} leaf {name!r} ({_shape_text(jnp.shape(leaf))}) has "
                            f"dtype {dtype}: expected a real floating dtype")


def _check_params(params: Any, treedef: Any, names: list[str], grads: list[Any]) -> list[Any]:
    p_names, p_leaves, p_treedef = _flatten(params)
    if p_treedef != treedef:
        raise ValueError(f"params and updates differ in structure: params has leaves "
                         f"{p_names}, updates has {names}")
    for name, p, g in zip(names, p_leaves, grads):
        if jnp.shape(p) != jnp.shape(g):
            raise ValueError(f"update of {name!r} has shape {jnp.shape(g)}, expected the "
                             f"parameter's shape {jnp.shape(p)}")
    return p_leaves


def _check_state(field: str, stored: Mapping[str, Any], expected: dict[str, Any]) -> None:
    if set(stored) != set(expected):
        raise ValueError(f"state.{field} has leaves {sorted(stored)}, but the plan expects "
                         f"{sorted(expected)}: was the state made by init on these parameters?")
    for name, grad in expected.items():
        if jnp.shape(stored[name]) != jnp.shape(grad):
            raise ValueError(f"state.{field}[{name!r}] has shape {jnp.shape(stored[name])}, "
                             f"expected {jnp.shape(grad)}")


def _fresh_record(names: list[str], leaves: list[Any]) -> NonfiniteRecord:
    return NonfiniteRecord(jnp.zeros([], jnp.int32), jnp.zeros(len(names), bool), tuple(names),
                           tuple(tuple(jnp.shape(x)) for x in leaves))


def _raise_nonfinite(bad: Any, names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...]):
    listed = [n for n, flag in zip(names, np.asarray(bad)) if flag]
    if listed:
        raise FloatingPointError(nonfinite_message(listed, dict(zip(names, shapes))))


def raise_if_nonfinite(state: Any) -> None:
    """Raise FloatingPointError, naming the leaves, when the latest step was refused for NaN/Inf.

    For jitted steps under `nonfinite="raise"` with several devices, where the step itself
    cannot raise; `state` may be any optax state that contains a muon_jax state.
    """
    records = [r for r in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, NonfiniteRecord))
               if isinstance(r, NonfiniteRecord)]
    for record in records:
        _raise_nonfinite(record.latest, record.names, record.shapes)


def _finite_gate(names: list[str], grads: list[Any], record: NonfiniteRecord,
                 policy: str) -> tuple[Any, NonfiniteRecord]:
    """(all gradients finite, updated record), after applying the `nonfinite` policy.

    Eager, "raise" raises FloatingPointError at once. Under jit a Python raise is impossible:
    on a single device a host callback raises the same message when the step runs (JAX
    reports it as a JaxRuntimeError and returns nothing). With several devices a raising
    callback would leave the other devices waiting in their collectives, so the step is only
    refused and recorded; `raise_if_nonfinite(state)` raises afterwards. A refused step
    returns zero updates and keeps the moments (the whole of the "skip" policy).
    """
    if tuple(names) != record.names:
        raise ValueError(f"state.nonfinite was made for leaves {list(record.names)}, but the "
                         f"updates have {names}: was the state made by init on these parameters?")
    bad = ~jnp.stack([jnp.all(jnp.isfinite(g)) for g in grads]) if grads else record.latest
    if policy == "raise" and not _is_traced(bad):
        _raise_nonfinite(bad, record.names, record.shapes)
    elif policy == "raise" and jax.device_count() == 1:
        jax.debug.callback(functools.partial(_raise_nonfinite, names=record.names,
                                             shapes=record.shapes), bad)
    ok = ~jnp.any(bad)
    return ok, dataclasses.replace(record, count=record.count + (~ok).astype(jnp.int32),
                                   latest=bad)


def _select(ok: Any, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


# -- arithmetic ------------------------------------------------------------------------------
def _momentum(grad: jax.Array, buf: jax.Array, beta: Any, config: MuonConfig):
    """(direction, new buffer): EMA or sum momentum, with or without Nesterov.

    The arithmetic runs in the wider of the gradient's and the buffer's dtypes, and the buffer
    keeps its own (the parameters'), so bfloat16 gradients of float32 parameters do not round it.
    """
    g_weight = 1.0 - beta if config.momentum_kind == "ema" else 1.0
    wide = grad.astype(jnp.promote_types(grad.dtype, buf.dtype))
    new_buf = (beta * buf + g_weight * wide).astype(buf.dtype)
    direction = g_weight * wide + beta * new_buf if config.nesterov else new_buf
    return direction.astype(grad.dtype), new_buf


def _explicit_sharding(x: jax.Array) -> NamedSharding | None:
    """The sharding in `x`'s type under an explicit-axes mesh; None when it carries none."""
    sharding = jax.typeof(x).sharding
    return sharding if any(axis is not None for axis in sharding.spec) else None


def _resharded(x: jax.Array, sharding: NamedSharding | None) -> jax.Array:
    return x if sharding is None else jax.sharding.reshard(x, sharding)


def _whole(x: jax.Array) -> jax.Array:
    """`x` replicated when its type carries a sharding (explicit axes), else `x`."""
    sharding = _explicit_sharding(x)
    return x if sharding is None else jax.sharding.reshard(x, sharding.update(spec=PartitionSpec()))


def _to_blocks(x: jax.Array, entry: ParamPlan) -> list[jax.Array]:
    matrices = to_matrices(x, entry, xp=jnp)
    return [matrices[:, start:start + rows] for start, rows in
            zip(entry.block_offsets, entry.blocks)]


def _from_blocks(blocks: list[jax.Array], entry: ParamPlan) -> jax.Array:
    scaled = [b * scale for b, scale in zip(blocks, entry.lr_scales)]
    return from_matrices(jnp.concatenate(scaled, axis=1), entry, xp=jnp)


def _muon_directions(grads: dict[str, Any], bufs: dict[str, Any], moments: dict[str, Any],
                     plan: Plan, config: MuonConfig, beta: Any) -> tuple[dict, dict, dict]:
    """Momentum, then Newton-Schulz on every block at once, then the second moment:
    (scaled O per leaf, new buffers, new second moments).

    NS needs whole matrices: under an explicit-axes mesh the directions are gathered first
    and the results resharded like the gradients.
    """
    entries = plan.muon
    stepped = {e.name: _momentum(grads[e.name], bufs[e.name], beta, config) for e in entries}
    shardings = {e.name: _explicit_sharding(grads[e.name]) for e in entries}
    blocks = [_to_blocks(_whole(stepped[e.name][0]), e) for e in entries]
    flat = orthogonalize_batch([b for leaf in blocks for b in leaf],
                               ns_schedule(config.ns_coefficients, config.ns_steps),
                               config.eps, ns_dtype(config.ns_dtype))
    flat, moments = second_moments(flat, moments, entries, config)
    directions, start = {}, 0
    for entry, leaf in zip(entries, blocks):
        directions[entry.name] = _resharded(_from_blocks(flat[start:start + len(leaf)], entry),
                                            shardings[entry.name])
        start += len(leaf)
    return directions, {name: buf for name, (_, buf) in stepped.items()}, moments


def _adamw_directions(grads: dict[str, Any], mu: dict, nu: dict, count: jax.Array,
                      config: MuonConfig, lr: Any) -> tuple[dict, dict, dict]:
    """torch's AdamW step without the decay: (step per leaf, new mu, new nu).

    As in `_momentum`, the moments are computed in the wider of the gradient's and their own
    dtype and keep their own (the parameters'), so bfloat16 gradients of float32 parameters
    do not round them.
    """
    beta1, beta2 = config.adamw.betas
    steps, new_mu, new_nu = {}, {}, {}
    for name, grad in grads.items():
        g = grad.astype(jnp.promote_types(grad.dtype, mu[name].dtype))
        t = count.astype(jnp.promote_types(grad.dtype, jnp.float32))
        new_mu[name] = (beta1 * mu[name] + (1.0 - beta1) * g).astype(mu[name].dtype)
        new_nu[name] = (beta2 * nu[name] + (1.0 - beta2) * (g * g)).astype(nu[name].dtype)
        step_size = lr / (1.0 - beta1**t)
        denom = jnp.sqrt(new_nu[name]) / jnp.sqrt(1.0 - beta2**t) + config.adamw.eps
        steps[name] = (step_size * (new_mu[name] / denom)).astype(grad.dtype)
    return steps, new_mu, new_nu


def _has_decay(weight_decay: Any) -> bool:
    return _is_traced(weight_decay) or weight_decay != 0


def _descent(step: jax.Array, param: Any, lr: Any, weight_decay: Any,
             cautious: bool = False) -> jax.Array:
    """The optax update `-step - lr * wd * param` (decoupled decay with the base lr; with
    `cautious`, only where the step and the parameter agree in sign)."""
    update = -step
    if _has_decay(weight_decay):
        update = update - (lr * weight_decay) * decay_target(step, param, cautious)
    return update.astype(step.dtype)


# -- transformations -------------------------------------------------------------------------
class _Context(NamedTuple):
    names: list[str]
    grads: list[Any]
    by_name: dict[str, Any]
    treedef: Any
    plan: Plan
    params: list[Any] | None


def _context(updates: Any, params: Any, momentum_buffer: Mapping[str, Any], config: MuonConfig,
             layout: str, algorithms: Mapping[str, str] | None, needs_params: bool) -> _Context:
    """Flatten and check the updates (and params), plan them and check the momentum buffers."""
    names, grads, treedef = _flatten(updates)
    _check_leaves(names, grads, "update")
    if needs_params and params is None:
        raise ValueError("weight decay needs the parameters: call update(updates, state, params) "
                         "or set weight_decay=0")
    p_leaves = None if params is None else _check_params(params, treedef, names, grads)
    plan = _plan(names, grads, config, layout, algorithms)
    by_name = dict(zip(names, grads))
    _check_state("momentum_buffer", momentum_buffer, {e.name: by_name[e.name] for e in plan.muon})
    return _Context(names, grads, by_name, treedef, plan, p_leaves)


def _init_parts(params: Any, config: MuonConfig, layout: str,
                algorithms: Mapping[str, str] | None) -> tuple[dict, dict, dict, NonfiniteRecord]:
    """Zero momentum buffers and second moments for the Muon leaves, the other leaves by
    name, a fresh record."""
    names, leaves, _ = _flatten(params)
    _check_leaves(names, leaves, "parameter")
    plan = _plan(names, leaves, config, layout, algorithms)
    by_name = dict(zip(names, leaves))
    buffers = {e.name: jnp.zeros_like(by_name[e.name]) for e in plan.muon}
    others = {e.name: by_name[e.name] for e in plan.adamw}
    moments = init_second_moments(by_name, plan.muon, config)
    return buffers, others, moments, _fresh_record(names, leaves)


@_with_override_keywords
def scale_by_muon(config: MuonConfig | None = None, *, layout: str = "in_out",
                  algorithms: Mapping[str, str] | None = None,
                  **overrides: Any) -> optax.GradientTransformation:
    """The Muon direction alone: momentum, then Newton-Schulz times each block's LR scale.

    Leaves the plan routes to Muon become `lr_scale * NS(direction)`; the others pass
    through unchanged. Learning rate, weight decay and sign are left to the transforms
    chained after it (`optax.add_decayed_weights`, `optax.scale_by_learning_rate`).
    Keywords as in `muon`; `momentum` may be injected.
    """
    config, hyper = resolve(config, overrides)

    def init_fn(params: Any) -> ScaleByMuonState:
        buffers, _, moments, record = _init_parts(params, config, layout, algorithms)
        return ScaleByMuonState(buffers, moments, record)

    def update_fn(updates: Any, state: ScaleByMuonState, params: Any = None):
        ctx = _context(updates, params, state.momentum_buffer, config, layout, algorithms,
                       needs_params=False)
        grads = ctx.by_name
        check_second_moments(state.second_moment, ctx.plan.muon, config)
        ok, record = _finite_gate(ctx.names, ctx.grads, state.nonfinite, config.nonfinite)
        directions, bufs, moments = _muon_directions(grads, state.momentum_buffer,
                                                     state.second_moment, ctx.plan, config,
                                                     hyper.momentum)
        out = [directions.get(name, g) for name, g in grads.items()]
        out = _select(ok, out, [jnp.zeros_like(g) for g in ctx.grads])
        kept = _select(ok, (bufs, moments), (state.momentum_buffer, state.second_moment))
        new_state = ScaleByMuonState(*kept, record)
        return ctx.treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


@_with_override_keywords
def muon(config: MuonConfig | None = None, *, layout: str = "in_out",
         algorithms: Mapping[str, str] | None = None,
         **overrides: Any) -> optax.GradientTransformation:
    """Muon for the hidden matrices, AdamW for the rest, as one optax transformation.

    `config` is the `MuonConfig` a torch project uses (or `MuonConfig.from_file`); keyword
    overrides are its field names plus `adamw_lr` and `adamw_weight_decay`. `lr`, `momentum`,
    `weight_decay`, `adamw_lr` and `adamw_weight_decay` may be jnp scalars, so
    `optax.inject_hyperparams(muon_jax.muon)(cfg, lr=...)` can change them between steps;
    every other field shapes the computation and stays static.

    Leaves are named by their key paths (see `leaf_names`) and routed once by
    `muon_core.plan` (see `plan_for`); `layout="in_out"` reads flax kernels (Dense (in, out),
    Conv (kh, kw, in, out)), `layout="out_in"` torch weights. `algorithms` maps leaf names to
    "muon" or "adamw", before the config's rules.

    The updates follow optax's convention (`optax.apply_updates` adds them) and include the
    decoupled weight decay, so `update` needs `params` unless both decays are 0. Gradients
    with NaN or Inf follow `config.nonfinite`: "skip" returns zero updates and keeps the
    state; "raise" raises FloatingPointError naming the leaves. Under jit it raises through a
    host callback on one device (JAX reports a JaxRuntimeError) and, with several devices,
    refuses the step and leaves the error to `raise_if_nonfinite(state)`.
    """
    config, hyper = resolve(config, overrides)
    needs_params = _has_decay(hyper.weight_decay) or _has_decay(hyper.adamw_weight_decay)

    def init_fn(params: Any) -> MuonState:
        buffers, adamw, moments, record = _init_parts(params, config, layout, algorithms)
        return MuonState(jnp.zeros([], jnp.int32), buffers,
                         {n: jnp.zeros_like(x) for n, x in adamw.items()},
                         {n: jnp.zeros_like(x) for n, x in adamw.items()}, moments, record)

    def update_fn(updates: Any, state: MuonState, params: Any = None):
        ctx = _context(updates, params, state.momentum_buffer, config, layout, algorithms,
                       needs_params)
        grads = ctx.by_name
        adamw_grads = {e.name: grads[e.name] for e in ctx.plan.adamw}
        _check_state("mu", state.mu, adamw_grads)
        _check_state("nu", state.nu, adamw_grads)
        check_second_moments(state.second_moment, ctx.plan.muon, config)
        ok, record = _finite_gate(ctx.names, ctx.grads, state.nonfinite, config.nonfinite)
        count = optax.safe_increment(state.count)
        muon_steps, bufs, moments = _muon_directions(grads, state.momentum_buffer,
                                                     state.second_moment, ctx.plan, config,
                                                     hyper.momentum)
        adamw_steps, mu, nu = _adamw_directions(adamw_grads, state.mu, state.nu, count, config,
                                                hyper.adamw_lr)
        params_by_name = dict(zip(ctx.names, ctx.params or [None] * len(ctx.names)))
        out = [_descent(hyper.lr * muon_steps[n], params_by_name[n], hyper.lr,
                        hyper.weight_decay, config.cautious_weight_decay)
               if n in muon_steps else
               _descent(adamw_steps[n], params_by_name[n], hyper.adamw_lr,
                        hyper.adamw_weight_decay)
               for n in ctx.names]
        out = _select(ok, out, [jnp.zeros_like(g) for g in ctx.grads])
        new = (count, bufs, mu, nu, moments)
        old = (state.count, state.momentum_buffer, state.mu, state.nu, state.second_moment)
        kept = _select(ok, new, old)
        return ctx.treedef.unflatten(out), MuonState(*kept, record)

    return optax.GradientTransformation(init_fn, update_fn)
