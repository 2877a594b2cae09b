"""The muon_torch step against torch.optim.Muon + torch.optim.AdamW with float32 Newton-Schulz
on both sides, on GPT-2 small, as markdown tables.

    python benchmarks/torch_step.py [--rounds 3] [--n-layer 12] [--clock cpu]

For CPUs that emulate bfloat16, where `ns_dtype="auto"` picks float32 and torch.optim.Muon's
bfloat16 steps take minutes: the rows of `muon_torch.bench.float32_step_rows` (ours at the
peer's settings and at our defaults, the peer as `Float32NSMuon`, interleaved in one process on
one thread), then each contender's orthogonalization accuracy per block shape
(`muon_torch.bench.accuracy_on`). The load average is printed before and after the run.
"""

from __future__ import annotations

import argparse
import os

import torch
from muon_cli.bench_cmd import format_accuracy, format_rows, machine_header
from muon_cli.benchtools import gpt2_shapes, set_clock
from muon_torch import bench


def _load() -> str:
    return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    """Print the timing table, then the accuracy table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    args = parser.parse_args()
    set_clock(args.clock)
    torch.set_num_threads(1)
    print(f"before: {_load()}", flush=True)
    rows = bench.float32_step_rows(gpt2_shapes(n_layer=args.n_layer), args.rounds)
    print(f"after: {_load()}\n")
    print(machine_header(args.rounds, 1) + f"; GPT-2 widths, {args.n_layer} layers\n")
    print(format_rows([r | {"backend": "torch"} for r in rows]) + "\n", flush=True)
    print(format_accuracy(bench.accuracy_on(gpt2_shapes(n_layer=1)), "block"), flush=True)


if __name__ == "__main__":
    main()
