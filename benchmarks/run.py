"""Run the side-by-side benchmarks and print a markdown table for docs/benchmarks.md.

Usage: python benchmarks/run.py [--backend all|torch|jax] [--rounds N] [--threads N]
[--clock wall|cpu]
(the same as `muon bench`). Each backend's contenders are interleaved round by round on one
thread by default; the speed-up column is peer time / our time (above 1: ours is faster).
"""

import sys

from muon_cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
