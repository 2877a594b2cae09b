"""float32 GEMM and Newton-Schulz rates on this CPU, one thread, every library side by side.

    python benchmarks/cpu_rates.py [--shape 768 3072] [--rounds 7]

GEMM `(m x m) @ (m x n)` through torch (MKL), oneDNN, numpy (its BLAS) and XLA; keller-5
Newton-Schulz through the core's plain iteration on torch tensors, muon_torch (standard and
Gram, with its default blocked symmetric products and with full GEMMs; Gram with quintic-4,
a schedule closer to the polar factor than keller-5) and muon_jax (standard and Gram, jitted). Contenders are interleaved round by round and
timed on this process's CPU time; rates are flops / median time, Newton-Schulz counted as the
standard keller-5 flops 5 (4 m^2 n + 2 m^3).
"""

from __future__ import annotations

import argparse
import os

os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import muon_core  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from muon_cli.benchtools import interleaved_times, set_clock  # noqa: E402
from muon_jax._ns import orthogonalize as jax_orthogonalize  # noqa: E402
from muon_torch._newton_schulz import newton_schulz  # noqa: E402
from muon_torch.bench import keller_flops  # noqa: E402


def contenders(m: int, n: int) -> dict[str, tuple[callable, int]]:
    """name -> (call, flops)."""
    rng = np.random.default_rng(0)
    g, a = rng.standard_normal((m, n), np.float32), rng.standard_normal((m, m), np.float32)
    x, w = torch.from_numpy(g), torch.from_numpy(a)
    out = torch.empty(m, n)
    dnn_a, dnn_x = w.to_mkldnn(), x.T.contiguous().to_mkldnn()
    jx, ja = jnp.asarray(g), jnp.asarray(a)
    xla_mm = jax.jit(lambda p, q: jnp.matmul(p, q, precision="highest"))
    xla_ns = {alg: jax.jit(lambda v, alg=alg: jax_orthogonalize(v, dtype="float32",
                                                                algorithm=alg))
              for alg in ("standard", "gram")}
    torch_ns = {alg: muon_core.ns_schedule("keller", 5, alg) for alg in ("standard", "gram")}
    quintic4 = muon_core.ns_schedule("quintic", 4, "gram")
    gemm, ns = 2 * m * m * n, keller_flops(m, n)
    return {
        "GEMM torch (MKL)": (lambda: torch.mm(w, x, out=out), gemm),
        "GEMM oneDNN": (lambda: torch._C._nn.mkldnn_linear(dnn_a, dnn_x), gemm),
        "GEMM numpy (its BLAS)": (lambda: np.matmul(a, g), gemm),
        "GEMM XLA": (lambda: xla_mm(ja, jx).block_until_ready(), gemm),
        "NS keller-5, core's plain iteration on torch": (lambda: muon_core.orthogonalize(x), ns),
        "NS keller-5, muon_torch standard": (lambda: newton_schulz(x, torch_ns["standard"], 1e-7),
                                             ns),
        "NS keller-5, muon_torch standard, full products": (
            lambda: newton_schulz(x, torch_ns["standard"], 1e-7, symmetric="full"), ns),
        "NS keller-5, muon_torch gram": (lambda: newton_schulz(x, torch_ns["gram"], 1e-7), ns),
        "NS keller-5, muon_torch gram, full products": (
            lambda: newton_schulz(x, torch_ns["gram"], 1e-7, symmetric="full"), ns),
        "NS quintic-4, muon_torch gram (counted as keller-5)": (
            lambda: newton_schulz(x, quintic4, 1e-7), ns),
        "NS keller-5, muon_jax standard": (lambda: xla_ns["standard"](jx).block_until_ready(),
                                           ns),
        "NS keller-5, muon_jax gram": (lambda: xla_ns["gram"](jx).block_until_ready(), ns),
    }


def main() -> None:
    """Print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(768, 3072))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    set_clock("cpu")
    m, n = args.shape
    calls = contenders(m, n)
    times = interleaved_times({k: c for k, (c, _) in calls.items()}, rounds=args.rounds)
    print(f"torch capability {torch.backends.cpu.get_cpu_capability()}, {m}x{n}, float32, "
          f"1 thread, CPU time, median of {args.rounds} interleaved rounds")
    print("| what | ms | GFLOP/s |\n|---|---|---|")
    for name, (_, flops) in calls.items():
        print(f"| {name} | {times[name] * 1e3:.0f} | {flops / times[name] / 1e9:.0f} |")


if __name__ == "__main__":
    main()
