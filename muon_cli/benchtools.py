"""Benchmark helpers: contenders interleaved round by round (so drift hits all alike), the check
that a peer optimizer can run a config's settings at all, and reference model shapes (torch
layout: Linear weights are (out, in))."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from muon_core import NSSchedule, ns_schedule


# "wall": elapsed time; "cpu": this process's CPU time, which on a shared machine leaves out
# the time other processes hold the cores (for one-thread runs it is the compute time).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = ["wall"]


def set_clock(name: str) -> None:
    """Make `interleaved_times` measure with the clock `name` (one of `CLOCKS`)."""
    if name not in CLOCKS:
        raise ValueError(f"clock={name!r} is invalid: expected one of {list(CLOCKS)}")
    _clock[0] = name


def clock_name() -> str:
    """The clock `interleaved_times` uses now."""
    return _clock[0]


def interleaved_times(contenders: Mapping[str, Callable[[], object]], rounds: int = 7,
                      warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each contender, calling them in turn for `rounds` rounds,
    on the clock `set_clock` chose (default: wall)."""
    clock = CLOCKS[_clock[0]]
    if rounds < 1:
        raise ValueError(f"{rounds=} is invalid: expected at least 1")
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def peer_schedule(config: Any, peer: str, choices: Mapping[str, Sequence[Any]]) -> NSSchedule:
    """The NS schedule of `config` for a peer optimizer named `peer` that takes one `(a, b, c)`
    triple with plain normalisation and has only the listed `choices` for some config fields
    (e.g. `{"momentum_kind": ("ema",)}`); raise ValueError naming the first setting it lacks."""
    schedule = ns_schedule(config.ns_coefficients, config.ns_steps)
    if len(set(schedule.coefficients)) != 1 or schedule.norm_scale != 1:
        raise ValueError(f"ns_coefficients={config.ns_coefficients!r}: {peer} takes one "
                         "(a, b, c) triple and plain normalisation")
    for key, expressible in choices.items():
        if getattr(config, key) not in expressible:
            raise ValueError(f"{key}={getattr(config, key)!r}: {peer} only has "
                             f"{list(expressible)}")
    return schedule


def gpt2_shapes(n_layer: int = 12, d_model: int = 768, vocab: int = 50257,
                context: int = 1024) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a GPT-2 model (default: GPT-2 small, 124M parameters)."""
    d, shapes = d_model, {"wte.weight": (vocab, d_model), "wpe.weight": (context, d_model)}
    for i in range(n_layer):
        p = f"h.{i}."
        shapes |= {p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
                   p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
                   p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                   p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
                   p + "mlp.fc.weight": (4 * d, d), p + "mlp.fc.bias": (4 * d,),
                   p + "mlp.proj.weight": (d, 4 * d), p + "mlp.proj.bias": (d,)}
    return shapes | {"ln_f.weight": (d,), "ln_f.bias": (d,), "lm_head.weight": (vocab, d)}


def polar_errors(g: Any, o: Any, floor: float = 1e-2) -> tuple[float, float, float]:
    """How close `o` is to the exact polar factor U V^T of `g` (numpy arrays, float64 SVD), on
    the directions whose singular value is at least `floor` times the Frobenius norm (below
    that no five-step Newton-Schulz converges): (smallest and largest singular value of
    `o V_k`, spectral distance ||(o - U V^T) V_k||_2)."""
    import numpy as np

    u, s, vt = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
    keep = s >= floor * np.linalg.norm(s)
    image = np.asarray(o, np.float64) @ vt[keep].T
    gains = np.linalg.svd(image, compute_uv=False)
    return float(gains.min()), float(gains.max()), float(np.linalg.norm(image - u[:, keep], 2))
