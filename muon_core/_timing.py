"""Side-by-side benchmarks: contenders interleaved round by round, so drift hits all alike,
and the check that a peer optimizer can run a config's settings at all."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from muon_core._ns import NSSchedule, ns_schedule


def interleaved_times(contenders: Mapping[str, Callable[[], object]], rounds: int = 7,
                      warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each contender, calling them in turn for `rounds` rounds."""
    if rounds < 1:
        raise ValueError(f"{rounds=} is invalid: expected at least 1")
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
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
