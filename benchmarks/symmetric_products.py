"""Symmetric products on this CPU: one full GEMM against the blocked upper-strip product.

    python benchmarks/symmetric_products.py [--sizes 768 1024] [--rounds 7] [--dtype float32]

For each size m: `X X^T` with X of m x 4m (the Gram matrix of a GPT-2 MLP block) and `A A` with
A symmetric m x m (the Gram form's products), computed by `torch.bmm` and by muon_torch's
"blocked" product (strips of rows from the diagonal rightwards, then mirrored) with its default
strip height and a few others. One thread, contenders interleaved round by round, CPU time.
"""

from __future__ import annotations

import argparse

import torch
from muon_cli.benchtools import interleaved_times, set_clock
from muon_torch import _newton_schulz


def contenders(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
               strips: tuple[int, ...]) -> dict[str, callable]:
    """name -> call computing `out = a @ b`."""

    def blocked(rows: int | None):
        def call():
            _newton_schulz.STRIP_ROWS = rows
            _newton_schulz._blocked_product(a, b, out)
        return call

    _newton_schulz.STRIP_ROWS = None
    default = _newton_schulz._strip_rows(out.shape[-1])
    calls = {"full GEMM (torch.bmm)": lambda: torch.bmm(a, b, out=out),
             f"blocked, default ({default} rows)": blocked(None)}
    return calls | {f"blocked, {rows} rows": blocked(rows) for rows in strips if rows != default}


def main() -> None:
    """Print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=(768, 1024))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--strips", type=int, nargs="*", default=(128, 192, 256))
    args = parser.parse_args()
    torch.set_num_threads(1)
    set_clock("cpu")
    dtype = getattr(torch, args.dtype)
    print(f"torch capability {torch.backends.cpu.get_cpu_capability()}, {args.dtype}, 1 thread, "
          f"CPU time, median of {args.rounds} interleaved rounds")
    print("| product | how | ms | speed-up vs full GEMM |\n|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for m in args.sizes:
        x = torch.randn(1, m, 4 * m, generator=generator, dtype=dtype)
        a = torch.randn(1, m, m, generator=generator, dtype=dtype)
        a = a + a.mT
        out = torch.empty(1, m, m, dtype=dtype)
        for name, (left, right) in {f"X X^T, X {m}x{4 * m}": (x, x.mT),
                                    f"A A, A {m}x{m} symmetric": (a, a)}.items():
            times = interleaved_times(contenders(left, right, out, tuple(args.strips)),
                                      rounds=args.rounds)
            full = times["full GEMM (torch.bmm)"]
            for how, seconds in times.items():
                print(f"| {name} | {how} | {seconds * 1e3:.1f} | {full / seconds:.2f}x |")
    _newton_schulz.STRIP_ROWS = None


if __name__ == "__main__":
    main()
