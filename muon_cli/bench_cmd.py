"""`muon bench`: our backends against their peers, side by side, as ratios."""

from __future__ import annotations

import datetime
import importlib
import os
import platform
from collections.abc import Sequence

from muon_core._registry import install_hint

from muon_cli.benchtools import clock_name

BENCH_MODULES = {"torch": "muon_torch.bench", "jax": "muon_jax.bench"}


def collect(backends: Sequence[str], rounds: int, threads: int) -> tuple[list[dict], list[str]]:
    """Rows from each backend's `bench.compare`, and a note for each backend that is missing."""
    rows, notes = [], []
    for name in backends:
        try:
            module = importlib.import_module(BENCH_MODULES[name])
        except ImportError as exc:
            notes.append(f"{name}: skipped ({exc}); try: {install_hint(name)}")
            continue
        rows += [row | {"backend": name} for row in module.compare(rounds=rounds, threads=threads)]
    return rows, notes


def machine_header(rounds: int, threads: int) -> str:
    """Date, processor, core count and framework versions: the context every figure needs."""
    versions = []
    for name in ("torch", "jax", "optax"):
        try:
            versions.append(f"{name} {importlib.import_module(name).__version__}")
        except ImportError:
            continue
    return (f"{datetime.date.today().isoformat()}, {_cpu_name()} ({os.cpu_count()} cores, "
            f"{cpu_capability()}), {', '.join(versions)}; {threads} thread(s), median of "
            f"{rounds} interleaved rounds, {clock_name()} clock")


def cpu_capability() -> str:
    """torch's CPU capability, the bf16 flags of the CPU and what `ns_dtype="auto"` picks here."""
    import muon_core

    flags = sorted(set(muon_core.host_cpu_flags()) & set(muon_core._ns.BF16_CPU_FLAGS))
    try:
        import torch
    except ImportError:
        capability = None
    else:
        capability = torch.backends.cpu.get_cpu_capability()
    facts = muon_core.DeviceFacts("cpu", cpu_capability=capability, cpu_flags=frozenset(flags))
    return (f"capability {capability or 'not reported'}, bf16 flags: {', '.join(flags) or 'none'}"
            f", ns_dtype auto = {muon_core.auto_ns_dtype(facts)[0]}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo
                     if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "unknown CPU"


def format_accuracy(rows: list[dict], first: str = "shape") -> str:
    """A markdown table of `polar_errors` figures, one line per {"shape", "what", "min_sigma",
    "max_sigma", "distance"} dict; `first` names the first column's matrices."""
    lines = [f"| {first} (out x in) | contender | min sigma | max sigma | spectral distance |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['shape'][0]}x{r['shape'][1]} | {r['what']} | {r['min_sigma']:.3f} | "
              f"{r['max_sigma']:.3f} | {r['distance']:.3f} |" for r in rows]
    return "\n".join(lines)


def format_rows(rows: list[dict]) -> str:
    """A markdown table of median times and the speed-up `peer time / our time` (above 1: ours
    faster)."""
    lines = ["| backend | measurement | peer | ours (ms) | peer (ms) | speed-up (peer / ours) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['what']} | {r['peer']} | {r['ours_s'] * 1e3:.1f} | "
              f"{r['peer_s'] * 1e3:.1f} | {r['peer_s'] / r['ours_s']:.2f}x |" for r in rows]
    return "\n".join(lines)
