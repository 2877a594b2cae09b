"""Side-by-side timings of the jitted muon_jax update against optax.contrib.muon (CPU)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import muon_core
import numpy as np
import optax
from optax.contrib._muon import orthogonalize_via_newton_schulz
from muon_cli.benchtools import gpt2_shapes, interleaved_times, peer_schedule, polar_errors
from muon_core import MuonConfig

from muon_jax import _ns
from muon_jax._plan import plan_for
from muon_jax._ns import orthogonalize
from muon_jax._transform import muon

PEER = "optax.contrib.muon"
# Choices optax.contrib.muon has (EMA momentum, NS in the parameters' dtype, whole matrices,
# Keller's LR scale): it would ignore another choice without a word, so the peer refuses it.
PEER_CHOICES = {"momentum_kind": ("ema",), "ns_dtype": ("float32",), "split_qkv": (False,),
                "lr_scaling": ("original",)}
# Settings both optimizers can express: Keller's coefficients, EMA Nesterov momentum, float32 NS
# (optax runs NS in the parameters' dtype), no QKV split (optax orthogonalizes whole matrices).
SETTINGS = MuonConfig(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                      ns_coefficients="keller", ns_steps=5, eps=1e-7, ns_dtype="float32",
                      ns_algorithm="standard", lr_scaling="original", split_qkv=False,
                      adamw=dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1))


def pin_threads(threads: int | None) -> None:
    """Ask XLA's CPU client for `threads` threads (heard only before JAX's first computation)."""
    if threads is None:
        return
    flags = f"--xla_cpu_multi_thread_eigen={str(threads > 1).lower()} " \
            f"intra_op_parallelism_threads={threads}"
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        if flags not in os.environ.get("XLA_FLAGS", ""):
            warnings.warn(f"JAX already started, so threads={threads} cannot be applied: set "
                          f'XLA_FLAGS="{flags}" before the first JAX computation', stacklevel=2)
        return
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()


def in_out_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """torch-layout shapes in flax's layout: matrices transposed to (in, out)."""
    return {n: tuple(reversed(s)) if len(s) == 2 else tuple(s) for n, s in shapes.items()}


def peer_transform(params: Mapping[str, jax.Array],
                   config: MuonConfig) -> optax.GradientTransformation:
    """optax.contrib.muon at `config`'s settings (refused where it cannot express them), sending
    exactly the leaves our plan routes to Muon there (through `muon_weight_dimension_numbers`,
    None for the AdamW leaves)."""
    schedule = peer_schedule(config, PEER, PEER_CHOICES)
    dims = {e.name: optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)
            if e.is_muon else None for e in plan_for(params, config)}
    beta1, beta2 = config.adamw.betas
    return optax.contrib.muon(
        learning_rate=config.lr, ns_coeffs=schedule.coefficients[0],
        ns_steps=config.ns_steps, beta=config.momentum, eps=config.eps,
        weight_decay=config.weight_decay, nesterov=config.nesterov, adam_b1=beta1,
        adam_b2=beta2, adam_weight_decay=config.adamw.weight_decay,
        adam_learning_rate=config.adamw.lr, muon_weight_dimension_numbers=dims)


def _random(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {n: jnp.asarray(rng.standard_normal(s, np.float32) / np.sqrt(s[-1]))
            for n, s in shapes.items()}


def _timed_update(tx: optax.GradientTransformation, params: dict, grads: dict,
                  symmetric: str | None = None) -> Callable[[], object]:
    """A call of `tx`'s compiled update that donates its state and keeps the new one, as a
    training loop does: no second copy of the state is alive during the update. `symmetric`:
    how its Newton-Schulz computes symmetric products (None: `muon_jax`'s default)."""
    state = [tx.init(params)]
    saved, _ns.SYMMETRIC_DEFAULT = _ns.SYMMETRIC_DEFAULT, symmetric
    try:
        compiled = jax.jit(tx.update, donate_argnums=1).lower(grads, state[0], params).compile()
    finally:
        _ns.SYMMETRIC_DEFAULT = saved

    def call() -> None:
        updates, state[0] = compiled(grads, state[0], params)
        jax.block_until_ready((updates, state[0]))

    return call


def _row(what: str, times: Mapping[str, float]) -> dict:
    return {"what": what, "ours_s": times["ours"], "peer_s": times["peer"],
            "ratio": times["ours"] / times["peer"], "peer": PEER}


class Contender(NamedTuple):
    """One of our rows: the config timed against the peer, and how Newton-Schulz computes its
    symmetric products (`muon_jax._ns.SYMMETRIC`; None: the device's default, "blocked" on CPU)."""

    config: MuonConfig
    symmetric: str | None = None


_GRAM = SETTINGS.replace(ns_algorithm="gram")
_QUINTIC_4 = _GRAM.replace(ns_coefficients="quintic", ns_steps=4)
# Our rows, each timed against the peer at SETTINGS. quintic x4 is closer to the polar factor
# than keller x5 on every shape (see `accuracy_on`), so it is no loss of accuracy.
ROWS = {"jitted update, fp32 NS, same settings": Contender(SETTINGS),
        "jitted update, fp32 NS, gram": Contender(_GRAM),
        "jitted update, fp32 NS, gram, quintic x4": Contender(_QUINTIC_4),
        "jitted update, fp32 NS, our defaults (QKV split, gram)":
            Contender(SETTINGS.replace(split_qkv=True, ns_algorithm="gram")),
        "jitted update, fp32 NS, gram, plain products": Contender(_GRAM, "full"),
        "jitted update, fp32 NS, gram, quintic x4, plain products": Contender(_QUINTIC_4, "full")}


def compare_on(shapes: Mapping[str, tuple[int, ...]], rounds: int = 5,
               threads: int | None = 1, rows: Mapping[str, Contender] = ROWS) -> list[dict]:
    """Timings on the torch-layout parameter set `shapes` (see `compare`): the peer and every
    row of `rows` (default `ROWS`) interleaved in one run, so each ratio uses the same peer
    samples."""
    pin_threads(threads)
    flax_shapes = in_out_shapes(shapes)
    params, grads = _random(flax_shapes, 0), _random(flax_shapes, 1)
    contenders = {"peer": _timed_update(peer_transform(params, SETTINGS), params, grads)}
    contenders |= {what: _timed_update(muon(row.config), params, grads, row.symmetric)
                   for what, row in rows.items()}
    times = interleaved_times(contenders, rounds=rounds, warmup=1)
    return [_row(what, {"ours": times[what], "peer": times["peer"]}) for what in rows]


def _peer_orthogonalize(x: jax.Array, config: MuonConfig) -> jax.Array:
    schedule = peer_schedule(config, PEER, PEER_CHOICES)
    return orthogonalize_via_newton_schulz(
        x, jnp.asarray(schedule.coefficients[0]), config.ns_steps, eps=config.eps)


def accuracy_on(shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> list[dict]:
    """Orthogonalization accuracy per Muon matrix shape of `shapes` (torch layout), on a
    Gaussian matrix of each: the peer at SETTINGS and every row of `ROWS`, as
    `muon_cli.benchtools.polar_errors` against the float64 polar factor, one dict per
    (shape, contender): {"shape", "what", "min_sigma", "max_sigma", "distance"}."""
    rng = np.random.default_rng(seed)
    plan = plan_for({n: jax.ShapeDtypeStruct(s, jnp.float32)
                     for n, s in in_out_shapes(shapes).items()}, SETTINGS)
    matrix_shapes = sorted({(e.matrix_shape[1], e.matrix_shape[2]) for e in plan.muon})
    # Compiled whole, as in the update: eager, each strip of the blocked products is its own op.
    ours = jax.jit(orthogonalize, static_argnums=(1, 2, 3, 4, 5, 6))
    rows = []
    for shape in matrix_shapes:
        g = rng.standard_normal(shape)
        results = {PEER: _peer_orthogonalize(jnp.asarray(g, jnp.float32), SETTINGS)}
        results |= {what: ours(jnp.asarray(g, jnp.float32), c.ns_steps, c.ns_coefficients,
                               c.eps, "float32", c.ns_algorithm, symmetric)
                    for what, (c, symmetric) in ROWS.items() if not c.split_qkv}
        for what, o in results.items():
            low, high, distance = polar_errors(g, np.asarray(o, np.float64))
            rows.append({"shape": shape, "what": what, "min_sigma": low, "max_sigma": high,
                         "distance": distance})
    return rows


def compare(rounds: int = 5, threads: int = 1) -> list[dict]:
    """Median seconds of our jitted update and of optax.contrib.muon's on GPT-2 small
    (`gpt2_shapes()` in flax layout), one dict per measurement:
    {"what", "ours_s", "peer_s", "ratio" (ours / peer), "peer"}."""
    return compare_on(gpt2_shapes(), rounds, threads)
