"""Time the jitted muon_jax update against optax.contrib.muon on GPT-2 small (markdown table).

Usage: python benchmarks/jax_update.py [--rounds N] [--threads N]
"""

import argparse
import os
import platform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    # XLA reads its thread settings when it starts: pin them before importing jax.
    multi = str(args.threads > 1).lower()
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen="
                               f"{multi} intra_op_parallelism_threads={args.threads}").strip()
    import jax
    import optax

    from muon_jax import bench

    rows = bench.compare(rounds=args.rounds, threads=args.threads)
    print(f"jax {jax.__version__}, optax {optax.__version__}, {platform.processor() or 'cpu'}, "
          f"{args.threads} thread(s), median of {args.rounds} interleaved rounds\n")
    print("| measurement | ours (s) | optax.contrib.muon (s) | peer / ours |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['what']} | {row['ours_s']:.3f} | {row['peer_s']:.3f} | "
              f"{row['peer_s'] / row['ours_s']:.2f}x |")


if __name__ == "__main__":
    main()
