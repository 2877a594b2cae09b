"""Convergence of Newton-Schulz variants on the char model (Gram against standard, or
coefficient schedules), as markdown.

    python benchmarks/convergence.py [--steps 300] [--seeds 0 1 2] [--compare algorithm|schedule]

The char model example (`examples/char_gpt_torch.py`: `CharGPT`, context 64, batches of 32,
`examples/muon.toml`, float32 Newton-Schulz) is trained once per seed and per variant, all from
the same initial weights and batches for a given seed, on the training part of the text.
`--compare algorithm` (default) trains `ns_algorithm="gram"` and `"standard"` at the file's
keller-5 schedule; `--compare schedule` trains keller-5 and quintic-4 with the default
`ns_algorithm`. Reported per variant: the held-out loss after the last step (64 sequences of
the held-out part) and the mean training loss of the last 20 steps, as mean and spread (min to
max, and the sample standard deviation) over the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import numpy as np
import torch
from muon_cli.data import VOCAB, char_split, char_windows
from muon_cli.torch_models import CharGPT
from muon_core import MuonConfig
from muon_torch import Muon
from torch.nn import functional as F

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "muon.toml"
# The config changes each comparison trains, by variant name.
VARIANTS = {
    "algorithm": {"gram": {"ns_algorithm": "gram"}, "standard": {"ns_algorithm": "standard"}},
    "schedule": {"keller-5": {"ns_coefficients": "keller", "ns_steps": 5},
                 "quintic-4": {"ns_coefficients": "quintic", "ns_steps": 4}},
}
CONTEXT, BATCH, HELD_OUT, LAST = 64, 32, 64, 20


def train(config: MuonConfig, steps: int, seed: int) -> dict[str, float]:
    """Held-out loss after `steps` steps and the mean training loss of the last `LAST` steps."""
    train_ids, test_ids = char_split()
    torch.manual_seed(seed)
    model = CharGPT(vocab=VOCAB, context=CONTEXT)
    opt = Muon.for_model(model, config)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        x, y = map(torch.from_numpy, char_windows(train_ids, CONTEXT, BATCH, rng))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    x, y = map(torch.from_numpy, char_windows(test_ids, CONTEXT, HELD_OUT,
                                              np.random.default_rng(1000)))
    with torch.no_grad():
        held_out = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    return {"held-out loss": held_out, f"training loss, last {LAST} steps": float(
        np.mean(losses[-LAST:]))}


def spread(values: list[float]) -> str:
    """`mean ± sample std (min-max)` of `values`."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f} ({min(values):.4f}-{max(values):.4f})"


def main() -> None:
    """Train every (variant, seed) pair and print the per-seed values and a summary table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--compare", choices=list(VARIANTS), default="algorithm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = dataclasses.replace(MuonConfig.from_file(str(CONFIG)), ns_dtype="float32")
    variants = VARIANTS[args.compare]
    results = {name: [train(dataclasses.replace(base, **changes), args.steps, seed)
                      for seed in args.seeds] for name, changes in variants.items()}
    metrics = list(next(iter(results.values()))[0])
    label = "ns_algorithm" if args.compare == "algorithm" else "schedule"
    print(f"{args.steps} steps, seeds {args.seeds}\n")
    print(f"| {label} | seed | " + " | ".join(metrics) + " |")
    print("|---|---|" + "---|" * len(metrics))
    for name, runs in results.items():
        for seed, run in zip(args.seeds, runs):
            print(f"| {name} | {seed} | " + " | ".join(f"{run[m]:.4f}" for m in metrics) + " |")
    print(f"\n| {label} | " + " | ".join(f"{m}: mean ± std (min-max)" for m in metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    for name, runs in results.items():
        print(f"| {name} | " + " | ".join(spread([r[m] for r in runs]) for m in metrics) + " |")

if __name__ == "__main__":
    main()
