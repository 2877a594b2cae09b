"""bfloat16 parameters against float32 ones: the char model of examples/char_gpt_torch.py.

Usage: python benchmarks/bf16_params.py [--steps 300] [--seeds 0 1 2] [--variants ...]

Each variant trains the same model from the same initial weights and batches per seed:
`fp32` (float32 parameters), `bf16` (bfloat16 parameters, gradients and optimizer state; each
update rounded to nearest) and `bf16-master` (the same with `master_weights=True`: a float32
copy is updated and rounded into the parameter). The forward and backward passes run in float32
on float32 copies of the parameters (bfloat16 matrix products are very slow on CPUs without
AVX512-BF16), so only storage and the optimizer step differ; Newton-Schulz runs in float32.
Prints, per seed, the mean training loss of the last 20 steps and the loss on 16 fixed batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call
from torch.nn import functional as F

from muon_cli.data import VOCAB, char_windows, encode_chars, python_source_text
from muon_cli.torch_models import CharGPT
from muon_core import MuonConfig
from muon_torch import Muon

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "muon.toml"
VARIANTS = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False),
            "bf16-master": (torch.bfloat16, True)}


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy computed in float32 from float32 copies of the parameters."""
    weights = {n: p.float() for n, p in model.named_parameters()}
    logits = functional_call(model, weights, (x,))
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def train(variant: str, seed: int, steps: int, cfg: MuonConfig) -> tuple[float, float]:
    """(mean training loss of the last 20 steps, loss on fixed evaluation batches)."""
    dtype, master = VARIANTS[variant]
    torch.manual_seed(seed)
    model = CharGPT(vocab=VOCAB, context=64).to(dtype)
    opt = Muon.for_model(model, cfg, master_weights=master)
    ids, rng = encode_chars(python_source_text()), np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        x, y = map(torch.from_numpy, char_windows(ids, 64, 32, rng))
        loss = _loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    eval_rng = np.random.default_rng(10_000)
    with torch.no_grad():
        held = [_loss(model, *map(torch.from_numpy, char_windows(ids, 64, 32, eval_rng))).item()
                for _ in range(16)]
    return statistics.fmean(losses[-20:]), statistics.fmean(held)


def main() -> None:
    """Run every variant for every seed and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = dataclasses.replace(MuonConfig.from_file(CONFIG), ns_dtype="float32")
    print("| variant | seed | train loss (last 20 steps) | eval loss (16 batches) |")
    print("|---|---|---|---|")
    for seed in args.seeds:
        for variant in args.variants:
            train_loss, eval_loss = train(variant, seed, args.steps, cfg)
            print(f"| {variant} | {seed} | {train_loss:.4f} | {eval_loss:.4f} |", flush=True)


if __name__ == "__main__":
    main()
