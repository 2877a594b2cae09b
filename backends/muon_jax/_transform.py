"""Muon as optax transformations, built as optax builds its aliases.

`scale_by_muon` is the primitive (momentum, then Newton-Schulz times each block's LR scale);
`muon` chains it with the decoupled decay and the learning rate, and partitions the leaves
against optax's own AdamW chain. Both sit behind the NaN/Inf policy.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from muon_core import (
    MuonConfig, ParamPlan, Plan, from_matrices, momentum_update, ns_schedule, to_matrices,
)
from muon_jax._adam import scale_by_adam
from muon_jax._adaptive import (check_second_moments, decay_target, init_second_moments,
                                second_moments)
from muon_jax._checks import check_leaves, check_params, check_state
from muon_jax._distributed import SHARDED_NS, find_mesh, orthogonalize_owned
from muon_jax._hyper import has_decay, resolve, with_override_keywords
from muon_jax._nonfinite import NonfiniteRecord, finite_gate, fresh_record, select
from muon_jax._ns import ns_dtype, orthogonalize_batch
from muon_jax._plan import algorithm_labels, flatten, plan_leaves
from muon_jax._sharding import explicit_sharding, resharded, whole


class ScaleByMuonState(NamedTuple):
    """The Muon directions' state, shaped like the params: `momentum_buffer` holds an array
    (the params' dtype) at each Muon leaf and `optax.MaskedNode()` at every other leaf;
    `second_moment` maps a Muon leaf's name to its NorMuon/AdaMuon second moment (empty
    without one; NorMuon's is shaped `(batch, rows)`, not like its leaf)."""

    momentum_buffer: Any
    second_moment: Any


class MuonState(NamedTuple):
    """State of `muon` and `scale_by_muon`: the inner optax state and the NaN/Inf record.

    `muon`'s `inner_state` is `optax.partition`'s state: `inner_states["muon"]` holds the
    `ScaleByMuonState`, `inner_states["adamw"]` optax's `ScaleByAdamState` (`count`, `mu`,
    `nu`), each shaped like the params with `optax.MaskedNode()` at the other half's leaves.
    The properties below reach those fields (None where a transformation has none).
    """

    inner_state: Any
    nonfinite: NonfiniteRecord

    @property
    def momentum_buffer(self) -> Any:
        """Muon leaves' momentum, a params-shaped tree."""
        return optax.tree_utils.tree_get(self.inner_state, "momentum_buffer")

    @property
    def second_moment(self) -> Any:
        """Muon leaves' NorMuon/AdaMuon second moments by leaf name (empty without one)."""
        return optax.tree_utils.tree_get(self.inner_state, "second_moment")

    @property
    def count(self) -> Any:
        """AdamW steps taken (int32, one for every AdamW leaf)."""
        return optax.tree_utils.tree_get(self.inner_state, "count")

    @property
    def mu(self) -> Any:
        """AdamW leaves' first moments, a params-shaped tree."""
        return optax.tree_utils.tree_get(self.inner_state, "mu")

    @property
    def nu(self) -> Any:
        """AdamW leaves' second moments, a params-shaped tree."""
        return optax.tree_utils.tree_get(self.inner_state, "nu")


# -- the Muon direction ----------------------------------------------------------------------
def _to_blocks(x: jax.Array, entry: ParamPlan) -> list[jax.Array]:
    matrices = to_matrices(x, entry, xp=jnp)
    return [matrices[:, start:start + rows] for start, rows in
            zip(entry.block_offsets, entry.blocks)]


def _from_blocks(blocks: list[jax.Array], entry: ParamPlan) -> jax.Array:
    scaled = [b * scale for b, scale in zip(blocks, entry.lr_scales)]
    return from_matrices(jnp.concatenate(scaled, axis=1), entry, xp=jnp)


def _muon_directions(grads: Mapping[str, Any], bufs: Mapping[str, Any],
                     moments: Mapping[str, Any], plan: Plan, config: MuonConfig, beta: Any,
                     accept: Any, mesh: Any = None, axis: str | None = None,
                     sharded_ns: str = "owner") -> tuple[dict, dict, dict]:
    """Momentum, Newton-Schulz on every block at once, then the config's second moment:
    (scaled O per leaf, new buffers, new second moments). Where `accept` is false the
    buffers and second moments stay as they were.

    On a mesh with `sharded_ns="owner"` (or "blockwise") each device orthogonalizes its share
    of the matrices (`orthogonalize_owned`). Otherwise NS needs whole matrices: under an
    explicit-axes mesh the directions are gathered first and the results resharded like the
    gradients.
    """
    entries = plan.muon
    stepped = {e.name: momentum_update(grads[e.name], bufs[e.name], beta, config.momentum_kind,
                                       config.nesterov, accept) for e in entries}
    target = find_mesh([d for d, _ in stepped.values()], mesh, axis) if entries else None
    if target is None and sharded_ns == "blockwise" and jax.device_count() > 1:
        raise ValueError("sharded_ns='blockwise' needs the mesh: pass mesh= (and axis=) or use "
                         "explicit axes, so that the blocks are known")
    if target is not None and sharded_ns != "replicated":
        directions, new_moments = orthogonalize_owned({n: d for n, (d, _) in stepped.items()},
                                                      plan, config, *target, mode=sharded_ns,
                                                      moments=moments)
        return (directions, {name: buf for name, (_, buf) in stepped.items()},
                select(accept, new_moments, moments))
    shardings = {e.name: explicit_sharding(grads[e.name]) for e in entries}
    blocks = [_to_blocks(whole(stepped[e.name][0]), e) for e in entries]
    flat = orthogonalize_batch([b for leaf in blocks for b in leaf],
                               ns_schedule(config.ns_coefficients, config.ns_steps,
                                           config.ns_algorithm),
                               config.eps, ns_dtype(config.ns_dtype))
    flat, new_moments = second_moments(flat, moments, entries, config)
    directions, start = {}, 0
    for entry, leaf in zip(entries, blocks):
        directions[entry.name] = resharded(_from_blocks(flat[start:start + len(leaf)], entry),
                                           shardings[entry.name])
        start += len(leaf)
    return (directions, {name: buf for name, (_, buf) in stepped.items()},
            select(accept, new_moments, moments))


def _directions(config: MuonConfig, momentum: Any, layout: str,
                algorithms: Mapping[str, str] | None, route_all: bool,
                sharding: tuple[Any, str | None, str]) -> optax.GradientTransformationExtraArgs:
    """Muon leaves become `lr_scale * NS(momentum direction)`; other leaves pass through.

    `route_all` treats every leaf it is given as Muon (inside `muon`, where `optax.partition`
    has already routed and masks the AdamW leaves out). `sharding` is `(mesh, axis,
    sharded_ns)`, see `_muon_directions`.
    """
    def plan_of(names: list[str], leaves: list[Any]):
        chosen = dict.fromkeys(names, "muon") if route_all else algorithms
        return plan_leaves(names, leaves, config, layout, chosen)

    def init_fn(params: Any) -> ScaleByMuonState:
        names, leaves, treedef = flatten(params)
        entries = plan_of(names, leaves).muon
        muon = {e.name for e in entries}
        buffers = treedef.unflatten(
            [jnp.zeros_like(x) if n in muon else optax.MaskedNode() for n, x in zip(names, leaves)])
        return ScaleByMuonState(buffers,
                                init_second_moments(dict(zip(names, leaves)), entries, config))

    def update_fn(updates: Any, state: ScaleByMuonState, params: Any = None, *,
                  finite_step: Any = True, **extra_args: Any):
        del params, extra_args
        names, grads, treedef = flatten(updates)
        plan = plan_of(names, grads)
        by_name = dict(zip(names, grads))
        buf_names, buf_leaves, buf_treedef = flatten(state.momentum_buffer)
        bufs = dict(zip(buf_names, buf_leaves))
        check_state("momentum_buffer", bufs, {e.name: by_name[e.name] for e in plan.muon})
        check_second_moments(state.second_moment, plan.muon, config)
        directions, new_bufs, moments = _muon_directions(by_name, bufs, state.second_moment, plan,
                                                         config, momentum,
                                                         jnp.asarray(finite_step), *sharding)
        out = treedef.unflatten([directions.get(n, g) for n, g in zip(names, grads)])
        return out, ScaleByMuonState(buf_treedef.unflatten([new_bufs[n] for n in buf_names]),
                                     moments)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -- the NaN/Inf policy around a whole transformation ----------------------------------------
def _guarded(inner: optax.GradientTransformation, policy: str,
             needs_params: bool) -> optax.GradientTransformationExtraArgs:
    """`inner` behind validation and the `nonfinite` policy; updates in the params' dtype.

    `inner.update` gets the keyword `finite_step` (whether every gradient is finite) and keeps
    its own state where it is false; the updates it returns then are replaced by zeros.

    The gradients reach `inner` in the wider of their and the params' dtypes, so low-precision
    gradients never round wider moments; the updates come back in the params' dtype (the
    gradients' without params), as optax's optimizers return them.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> MuonState:
        names, leaves, _ = flatten(params)
        check_leaves(names, leaves, "parameter")
        return MuonState(inner.init(params), fresh_record(names, leaves))

    def update_fn(updates: Any, state: MuonState, params: Any = None, **extra_args: Any):
        names, grads, treedef = flatten(updates)
        check_leaves(names, grads, "update")
        if needs_params and params is None:
            raise ValueError("weight decay needs the parameters: call update(updates, state, "
                             "params) or set weight_decay=0")
        targets = [g.dtype for g in grads] if params is None else [
            jnp.result_type(p) for p in check_params(params, treedef, names, grads)]
        ok, record = finite_gate(names, grads, state.nonfinite, policy)
        wide = [g.astype(jnp.promote_types(g.dtype, t)) for g, t in zip(grads, targets)]
        new_updates, new_inner = inner.update(treedef.unflatten(wide), state.inner_state, params,
                                              finite_step=ok, **extra_args)
        out = [jnp.where(ok, u, jnp.zeros_like(u)).astype(t)
               for u, t in zip(treedef.flatten_up_to(new_updates), targets)]
        return treedef.unflatten(out), MuonState(new_inner, record)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _decayed_weights(weight_decay: Any, cautious: bool = False) -> optax.GradientTransformation:
    """`optax.add_decayed_weights`, left out when the decay is a concrete 0 (no params needed).

    With `cautious`, only the entries where the update (the descent direction, subtracted
    later) and the parameter agree in sign are decayed (`muon_core.decayed_param`).
    """
    if not has_decay(weight_decay):
        return optax.identity()
    if not cautious:
        return optax.add_decayed_weights(weight_decay)

    def update_fn(updates: Any, state: Any, params: Any = None):
        return jax.tree.map(lambda u, p: u + weight_decay * decay_target(u, p, True),
                            updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _check_sharded_ns(sharded_ns: str) -> None:
    if sharded_ns not in SHARDED_NS:
        raise ValueError(f"sharded_ns={sharded_ns!r} is invalid: expected one of {SHARDED_NS}")


# -- the public transformations --------------------------------------------------------------
@with_override_keywords
def scale_by_muon(config: MuonConfig | None = None, *, layout: str = "in_out",
                  algorithms: Mapping[str, str] | None = None, mesh: Any = None,
                  axis: str | None = None, sharded_ns: str = "owner",
                  **overrides: Any) -> optax.GradientTransformationExtraArgs:
    """The Muon direction alone: momentum, then Newton-Schulz times each block's LR scale.

    Leaves the plan routes to Muon become `lr_scale * NS(direction)`; the others pass
    through unchanged. Learning rate, weight decay and sign are left to the transforms
    chained after it (`optax.add_decayed_weights`, `optax.scale_by_learning_rate`).
    Keywords as in `muon`; `momentum` may be injected. The state is a `MuonState` whose
    `inner_state` is a `ScaleByMuonState`.
    """
    config, hyper = resolve(config, overrides)
    _check_sharded_ns(sharded_ns)
    return _guarded(_directions(config, hyper.momentum, layout, algorithms, route_all=False,
                                sharding=(mesh, axis, sharded_ns)),
                    config.nonfinite, needs_params=False)


@with_override_keywords
def muon(config: MuonConfig | None = None, *, layout: str = "in_out",
         algorithms: Mapping[str, str] | None = None, mesh: Any = None,
         axis: str | None = None, sharded_ns: str = "owner",
         **overrides: Any) -> optax.GradientTransformationExtraArgs:
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

    Built from optax's pieces: `optax.partition` sends the Muon leaves through
    `scale_by_muon`'s direction, `optax.add_decayed_weights(wd)` and
    `optax.scale_by_learning_rate(lr)`, and the others through `optax.scale_by_adam` (its
    numbers and state, keeping its moments itself on a refused step), the same decay and
    learning-rate steps with AdamW's values (torch's AdamW, decoupled decay).
    The updates follow optax's convention (`optax.apply_updates` adds them), so `update`
    needs `params` unless both decays are 0. Gradients with NaN or Inf follow
    `config.nonfinite`: "skip" returns zero updates and keeps the state; "raise" raises
    FloatingPointError naming the leaves. Under jit it raises through a host callback on one
    device (JAX reports a JaxRuntimeError) and, with several devices, refuses the step and
    leaves the error to `raise_if_nonfinite(state)`.

    On a mesh (`mesh=` and `axis=`, else `jax.set_mesh`'s, else the explicit shardings of the
    parameters) `sharded_ns="owner"` divides the Newton-Schulz work over `axis` with
    `muon_core.assign_owners`' table; "replicated" runs every Newton-Schulz on every device;
    "blockwise" orthogonalizes each device's local piece alone (a different algorithm, only
    when asked for). See docs/distributed.md.
    """
    config, hyper = resolve(config, overrides)
    _check_sharded_ns(sharded_ns)
    beta1, beta2 = config.adamw.betas
    muon_part = optax.chain(_directions(config, hyper.momentum, layout, None, route_all=True,
                                        sharding=(mesh, axis, sharded_ns)),
                            _decayed_weights(hyper.weight_decay, config.cautious_weight_decay),
                            optax.scale_by_learning_rate(hyper.lr))
    adamw_part = optax.chain(scale_by_adam(beta1, beta2, config.adamw.eps),
                             _decayed_weights(hyper.adamw_weight_decay),
                             optax.scale_by_learning_rate(hyper.adamw_lr))
    labels = functools.partial(algorithm_labels, config=config, layout=layout,
                               algorithms=algorithms)
    routed = optax.partition({"muon": muon_part, "adamw": adamw_part}, labels)
    needs_params = has_decay(hyper.weight_decay) or has_decay(hyper.adamw_weight_decay)
    return _guarded(routed, config.nonfinite, needs_params)
