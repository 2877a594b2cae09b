"""`muon bench`: our backends against their peers, side by side, as ratios."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from muon_core._registry import INSTALL_HINTS

BENCH_MODULES = {"torch": "muon_torch.bench", "jax": "muon_jax.bench"}


def collect(backends: Sequence[str], rounds: int, threads: int) -> tuple[list[dict], list[str]]:
    """Rows from each backend's `bench.compare`, and a note for each backend that is missing."""
    rows, notes = [], []
    for name in backends:
        try:
            module = importlib.import_module(BENCH_MODULES[name])
        except ImportError as exc:
            notes.append(f"{name}: skipped ({exc}); try: {INSTALL_HINTS[name]}")
            continue
        rows += [row | {"backend": name} for row in module.compare(rounds=rounds, threads=threads)]
    return rows, notes


def format_rows(rows: list[dict]) -> str:
    """A table of median times and the speed ratio `peer time / our time` (above 1: ours faster)."""
    header = ("backend", "what", "peer", "ours", "peer time", "peer/ours")
    table = [header] + [(r["backend"], r["what"], r["peer"], f"{r['ours_s'] * 1e3:.2f} ms",
                         f"{r['peer_s'] * 1e3:.2f} ms", f"{r['peer_s'] / r['ours_s']:.2f}x")
                        for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
