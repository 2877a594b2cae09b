"""Steps to reach tuned AdamW's validation loss: plain Muon, NorMuon and AdaMuon on CharGPT.

    python benchmarks/adaptive_char_gpt.py [--steps 300] [--seeds 3] [--out results.json]

The project's character model (`muon_cli.torch_models.CharGPT`, made smaller: width 64, two
blocks) learns Python source code (`muon_cli.data`), the last tenth held out for validation.
Every contender gets the same budget: one learning-rate grid of three values (factors of 2)
on seed 0, picked by final validation loss, then the picked value on every seed. AdamW is
tuned first; its mean final validation loss over the seeds is the target, and its tuned lr is
the lr of the AdamW part of every Muon contender. The learning rate decays linearly to a
tenth. float32 Newton-Schulz; each run is single-threaded, several run at once in worker
processes (only steps are compared, never times).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from torch.nn import functional as F

from muon_cli.data import VOCAB, char_windows, encode_chars, python_source_text
from muon_cli.torch_models import CharGPT
from muon_core import AdamWConfig, MuonConfig
from muon_torch import Muon

CONTEXT, BATCH, WIDTH, EVAL_EVERY, EVAL_WINDOWS = 64, 32, 64, 10, 96
WEIGHT_DECAY, BETAS = 0.01, (0.9, 0.95)
ADAMW_GRID = (8e-3, 1.6e-2, 3.2e-2)
MUON_GRID = (0.02, 0.04, 0.08)
VARIANTS = {"muon": "none", "normuon": "normuon", "adamuon": "adamuon"}


def _model(seed: int) -> CharGPT:
    torch.manual_seed(seed)
    return CharGPT(vocab=VOCAB, context=CONTEXT, d_model=WIDTH)


def _optimizer(name: str, model: CharGPT, lr: float, adamw_lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS,
                                 weight_decay=WEIGHT_DECAY)
    config = MuonConfig(lr=lr, weight_decay=WEIGHT_DECAY, ns_dtype="float32",
                        second_moment=VARIANTS[name],
                        adamw=AdamWConfig(lr=adamw_lr, betas=BETAS, weight_decay=WEIGHT_DECAY))
    return Muon.for_model(model, config)


def train(name: str, lr: float, adamw_lr: float, seed: int, steps: int, train_ids: np.ndarray,
          val: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[int, float]]:
    """Validation losses `(step, loss)` every EVAL_EVERY steps of one run."""
    model = _model(seed)
    opt = _optimizer(name, model, lr, adamw_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.9 * s / steps)
    rng, curve = np.random.default_rng(seed), []
    for step in range(1, steps + 1):
        x, y = map(torch.from_numpy, char_windows(train_ids, CONTEXT, BATCH, rng))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % EVAL_EVERY == 0:
            with torch.no_grad():
                curve.append((step, F.cross_entropy(model(val[0]).flatten(0, 1),
                                                    val[1].flatten()).item()))
    return curve


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose validation loss is at most `target` (None: never)."""
    return next((step for step, loss in curve if loss <= target), None)


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4g}" if values else "-"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def _task(args: tuple) -> tuple[tuple, list[tuple[int, float]], float]:
    """One run in a worker process: (its arguments, its curve, its CPU seconds)."""
    name, lr, adamw_lr, seed, steps = args
    torch.set_num_threads(1)
    ids = encode_chars(python_source_text())
    split = int(0.9 * len(ids))
    vx, vy = char_windows(ids[split:], CONTEXT, EVAL_WINDOWS, np.random.default_rng(12345))
    start = time.process_time()
    curve = train(name, lr, adamw_lr, seed, steps, ids[:split],
                  (torch.from_numpy(vx), torch.from_numpy(vy)))
    return args, curve, time.process_time() - start


def run(steps: int, seeds: int, workers: int, log: Callable[[str], None]) -> dict:
    """The sweep and the seeded runs, each run single-threaded in one of `workers` processes;
    returns every curve and the summary."""
    runs: dict[str, dict] = {}
    cpu = []

    def batch(tasks: list[tuple]) -> None:
        with ProcessPoolExecutor(workers) as pool:
            for (name, lr, _, seed, _), curve, seconds in pool.map(_task, tasks):
                runs.setdefault(name, {}).setdefault(str(lr), {})[seed] = curve
                cpu.append(seconds)
                log(f"{name:8s} lr={lr:<7g} seed={seed} final val {curve[-1][1]:.4f} "
                    f"({seconds:.0f} s CPU)")

    def final(name: str, lr: float, seed: int = 0) -> float:
        return runs[name][str(lr)][seed][-1][1]

    batch([("adamw", lr, lr, 0, steps) for lr in ADAMW_GRID])
    tuned = {"adamw": min(ADAMW_GRID, key=lambda lr: final("adamw", lr))}
    adamw_lr = tuned["adamw"]
    batch([(name, lr, adamw_lr, 0, steps) for lr in MUON_GRID for name in VARIANTS]
          + [("adamw", adamw_lr, adamw_lr, seed, steps) for seed in range(1, seeds)])
    tuned |= {name: min(MUON_GRID, key=lambda lr: final(name, lr)) for name in VARIANTS}
    batch([(name, tuned[name], adamw_lr, seed, steps) for seed in range(1, seeds)
           for name in VARIANTS])
    target = statistics.mean(c[-1][1] for c in runs["adamw"][str(adamw_lr)].values())
    summary = {}
    for name, lr in tuned.items():
        curves = runs[name][str(lr)].values()
        summary[name] = {"lr": lr, "final_val": [c[-1][1] for c in curves],
                         "steps_to_target": [steps_to(c, target) for c in curves]}
    return {"steps": steps, "seeds": seeds, "target": target, "tuned": tuned,
            "cpu_seconds": sum(cpu), "summary": summary, "runs": runs}


def table(result: dict) -> str:
    """A markdown table of the summary."""
    lines = ["| optimizer | tuned lr | final validation loss | steps to AdamW's loss "
             f"({result['target']:.4f}) | per seed |", "|---|---|---|---|---|"]
    for name, row in result["summary"].items():
        reached = [s for s in row["steps_to_target"] if s is not None]
        missed = len(row["steps_to_target"]) - len(reached)
        steps = _spread([float(s) for s in reached]) + (f" ({missed} not reached)" if missed
                                                        else "")
        per_seed = ", ".join("-" if s is None else str(s) for s in row["steps_to_target"])
        lines.append(f"| {name} | {row['lr']:g} | {_spread(row['final_val'])} | {steps} | "
                     f"{per_seed} |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run, print the table and optionally write every curve as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="processes, one thread each")
    parser.add_argument("--out", default=None, help="write all curves and the summary here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {time.strftime('%Y-%m-%d')}", flush=True)
    result = run(args.steps, args.seeds, args.workers, lambda line: print(line, flush=True))
    print(table(result))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
