"""The jitted muon_jax update against optax.contrib.muon on GPT-2 small, as markdown tables.

    python benchmarks/jax_update.py [--rounds 3] [--rows 0 1 2 3] [--n-layer 12] [--clock cpu]
    python benchmarks/jax_update.py --symmetric [--rounds 3] [--batch 4]

Times the rows of `muon_jax.bench.ROWS` chosen by `--rows` (indices) interleaved with the peer
in one process (XLA pinned to one thread, states donated), then prints each contender's
orthogonalization accuracy per matrix shape (`muon_jax.bench.accuracy_on`). `--symmetric`
instead times Newton-Schulz alone on a stack of `--batch` 768x3072 matrices with plain
symmetric products against blocked ones of several strip heights.
"""

from __future__ import annotations

import argparse

from muon_cli.bench_cmd import format_accuracy, format_rows, machine_header
from muon_cli.benchtools import gpt2_shapes, interleaved_times, set_clock

STRIPS = (128, 192, 256, 384)


def symmetric_table(rounds: int, batch: int) -> None:
    """Print Newton-Schulz times on `batch` 768x3072 float32 matrices: plain symmetric products
    against blocked ones per strip height, interleaved, for three schedules."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from muon_core import ns_schedule
    from muon_jax import _ns

    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, 768, 3072)), jnp.float32)

    def compiled(schedule, symmetric, strip):
        _ns.STRIP_ROWS = strip
        try:
            call = jax.jit(lambda x: _ns._newton_schulz(x, schedule, 1e-7, symmetric))
            done = call.lower(x).compile()
        finally:
            _ns.STRIP_ROWS = None
        return lambda: done(x).block_until_ready()

    print("| schedule | plain ms | " + " | ".join(f"blocked {s} rows ms" for s in STRIPS) + " |")
    print("|---|---|" + "---|" * len(STRIPS))
    for name, (coefficients, steps, algorithm) in {
            "gram keller-5": ("keller", 5, "gram"), "gram quintic-4": ("quintic", 4, "gram"),
            "standard keller-5": ("keller", 5, "standard")}.items():
        schedule = ns_schedule(coefficients, steps, algorithm)
        calls = {"full": compiled(schedule, "full", None)}
        calls |= {s: compiled(schedule, "blocked", s) for s in STRIPS}
        times = interleaved_times(calls, rounds=rounds, warmup=1)
        cells = [f"{1e3 * times[s]:.0f} ({times['full'] / times[s]:.2f}x)" for s in STRIPS]
        print(f"| {name} | {1e3 * times['full']:.0f} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    """Print the timing table, then the accuracy table (or, with --symmetric, the NS table)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, nargs="+", help="indices into ROWS (default: all)")
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--clock", default="cpu")
    parser.add_argument("--symmetric", action="store_true",
                        help="time Newton-Schulz with plain against blocked symmetric products")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    set_clock(args.clock)
    from muon_jax import bench

    bench.pin_threads(1)
    if args.symmetric:
        print(machine_header(args.rounds, 1) + f"; {args.batch} matrices of 768x3072\n")
        symmetric_table(args.rounds, args.batch)
        return
    names = list(bench.ROWS)
    chosen = {names[i]: bench.ROWS[names[i]] for i in (args.rows or range(len(names)))}
    shapes = gpt2_shapes(n_layer=args.n_layer)
    rows = bench.compare_on(shapes, args.rounds, 1, chosen)
    print(machine_header(args.rounds, 1) + f"; GPT-2 widths, {args.n_layer} layers\n", flush=True)
    print(format_rows([r | {"backend": "jax"} for r in rows]) + "\n", flush=True)
    print(format_accuracy(bench.accuracy_on(gpt2_shapes(n_layer=1)), "shape"), flush=True)


if __name__ == "__main__":
    main()
