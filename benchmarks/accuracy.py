"""Orthogonalization accuracy of each Newton-Schulz schedule and algorithm, as a markdown table.

    python benchmarks/accuracy.py [--steps 50] [--width 768]

Matrices: momentum buffers of a character transformer (width `--width`, one block) after
`--steps` Muon steps on the bundled text, and Gaussian random matrices of the same shapes. For
each, the result O of Newton-Schulz (float32, muon_torch) is compared with the exact polar
factor U V^T (float64 SVD) on the directions whose singular value is at least `FLOOR` times
the Frobenius norm (below that no five-step schedule converges, and momentum matrices are
nearly low-rank): the smallest and largest singular value of O there (`O v_i` for those right
singular vectors v_i) and the spectral distance ||(O - U V^T) V_k||_2, worst case over the
matrices of each kind.
"""

from __future__ import annotations

import argparse

import muon_core
import numpy as np
import torch
from muon_cli.benchtools import polar_errors
from muon_cli.data import VOCAB, char_windows, encode_chars, python_source_text
from muon_cli.torch_models import CharGPT
from muon_torch import Muon
from muon_torch._newton_schulz import newton_schulz
from torch.nn import functional as F

# (label, coefficients, steps)
FLOOR = 1e-2
SCHEDULES = [("keller-5", "keller", 5),
             ("quintic-5", "quintic", 5), ("quintic-4", "quintic", 4),
             ("quintic-3", "quintic", 3),
             ("polar_express-5", "polar_express", 5), ("polar_express-4", "polar_express", 4)]


def momentum_matrices(steps: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The Muon momentum buffers (as matrices) of a char model after `steps` steps."""
    torch.manual_seed(seed)
    model = CharGPT(vocab=VOCAB, context=64, d_model=width, n_layer=1, n_head=width // 64)
    opt = Muon.for_model(model, lr=0.02, ns_dtype="float32")
    ids, rng = encode_chars(python_source_text()), np.random.default_rng(seed)
    for _ in range(steps):
        x, y = map(torch.from_numpy, char_windows(ids, 64, 8, rng))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out = {}
    for param, entry in opt._entries.items():
        if entry.is_muon:
            buf = opt.state[param]["momentum_buffer"].reshape(entry.matrix_shape[1:])
            for start, rows in zip(entry.block_offsets, entry.blocks):
                out[f"{entry.name}[{start}:{start + rows}]"] = buf[start:start + rows].double().numpy()
    return out


def errors(g: np.ndarray, schedule: muon_core.NSSchedule) -> tuple[float, float, float]:
    """(min gain, max gain, spectral distance) of NS(g) in float32 on the kept directions."""
    o = newton_schulz(torch.from_numpy(g).float(), schedule, 1e-7).double().numpy()
    return polar_errors(g, o, FLOOR)


def table(kinds: dict[str, dict[str, np.ndarray]]) -> str:
    """One row per (kind, schedule, algorithm): worst case over that kind's matrices."""
    lines = ["| matrices | schedule | algorithm | min sigma | max sigma | spectral distance |",
             "|---|---|---|---|---|---|"]
    for kind, mats in kinds.items():
        for label, coefficients, steps in SCHEDULES:
            for algorithm in ("standard", "gram"):
                schedule = muon_core.ns_schedule(coefficients, steps, algorithm)
                worst = [errors(g, schedule) for g in mats.values()]
                lo = min(w[0] for w in worst)
                hi = max(w[1] for w in worst)
                dist = max(w[2] for w in worst)
                lines.append(f"| {kind} | {label} | {algorithm} | {lo:.3f} | {hi:.3f} | "
                             f"{dist:.3f} |")
    return "\n".join(lines)


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--width", type=int, default=768)
    args = parser.parse_args()
    torch.set_num_threads(1)
    real = momentum_matrices(args.steps, args.width)
    rng = np.random.default_rng(1)
    random = {name: rng.standard_normal(g.shape) for name, g in real.items()}
    print(f"shapes: {sorted({g.shape for g in real.values()})}; {args.steps} steps, width "
          f"{args.width}")
    print(table({"char model momentum": real, "Gaussian": random}))


if __name__ == "__main__":
    main()
