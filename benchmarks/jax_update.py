"""The jitted muon_jax update against optax.contrib.muon on GPT-2 small, as markdown tables.

    python benchmarks/jax_update.py [--rounds 3] [--rows 0 1 2 3] [--n-layer 12] [--clock cpu]

Times the rows of `muon_jax.bench.ROWS` chosen by `--rows` (indices) interleaved with the peer
in one process (XLA pinned to one thread, states donated), then prints each contender's
orthogonalization accuracy per matrix shape (`muon_jax.bench.accuracy_on`).
"""

from __future__ import annotations

import argparse

from muon_cli.bench_cmd import format_rows, machine_header
from muon_cli.benchtools import gpt2_shapes, set_clock


def main() -> None:
    """Print the timing table, then the accuracy table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, nargs="+", help="indices into ROWS (default: all)")
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--clock", default="cpu")
    args = parser.parse_args()
    set_clock(args.clock)
    from muon_jax import bench

    bench.pin_threads(1)
    names = list(bench.ROWS)
    chosen = {names[i]: bench.ROWS[names[i]] for i in (args.rows or range(len(names)))}
    shapes = gpt2_shapes(n_layer=args.n_layer)
    rows = bench.compare_on(shapes, args.rounds, 1, chosen)
    print(machine_header(args.rounds, 1) + f"; GPT-2 widths, {args.n_layer} layers\n", flush=True)
    print(format_rows([r | {"backend": "jax"} for r in rows]) + "\n", flush=True)
    print("| shape (out x in) | contender | min sigma | max sigma | spectral distance |")
    print("|---|---|---|---|---|")
    for r in bench.accuracy_on(gpt2_shapes(n_layer=1)):
        print(f"| {r['shape'][0]}x{r['shape'][1]} | {r['what']} | {r['min_sigma']:.3f} | "
              f"{r['max_sigma']:.3f} | {r['distance']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
