"""Side-by-side timing: contenders interleaved round by round, so drift hits all alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


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
