"""Side-by-side timings of the jitted muon_jax update against optax.contrib.muon (CPU)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import muon_core
import numpy as np
import optax
from muon_cli.benchtools import gpt2_shapes, interleaved_times, peer_schedule
from muon_core import MuonConfig

from muon_jax._plan import plan_for
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


def _timed_update(tx: optax.GradientTransformation, params: dict,
                  grads: dict) -> Callable[[], object]:
    state = tx.init(params)
    compiled = jax.jit(tx.update).lower(grads, state, params).compile()
    return lambda: jax.block_until_ready(compiled(grads, state, params))


def _row(what: str, times: Mapping[str, float]) -> dict:
    return {"what": what, "ours_s": times["ours"], "peer_s": times["peer"],
            "ratio": times["ours"] / times["peer"], "peer": PEER}


def compare_on(shapes: Mapping[str, tuple[int, ...]], rounds: int = 5,
               threads: int | None = 1) -> list[dict]:
    """Timings on the torch-layout parameter set `shapes` (see `compare`)."""
    pin_threads(threads)
    flax_shapes = in_out_shapes(shapes)
    params, grads = _random(flax_shapes, 0), _random(flax_shapes, 1)
    peer = _timed_update(peer_transform(params, SETTINGS), params, grads)
    rows = [("jitted update, fp32 NS, same settings", SETTINGS),
            ("jitted update, fp32 NS, gram", SETTINGS.replace(ns_algorithm="gram")),
            ("jitted update, bf16 NS vs fp32", SETTINGS.replace(ns_dtype="bfloat16")),
            ("jitted update, fp32 NS, our defaults (QKV split, gram)",
             SETTINGS.replace(split_qkv=True, ns_algorithm="gram"))]
    return [_row(what, interleaved_times(
                {"ours": _timed_update(muon(config), params, grads), "peer": peer},
                rounds=rounds, warmup=1))
            for what, config in rows]


def compare(rounds: int = 5, threads: int = 1) -> list[dict]:
    """Median seconds of our jitted update and of optax.contrib.muon's on GPT-2 small
    (`gpt2_shapes()` in flax layout), one dict per measurement:
    {"what", "ours_s", "peer_s", "ratio" (ours / peer), "peer"}."""
    return compare_on(gpt2_shapes(), rounds, threads)
