"""Time muon_torch.Muon's full step against torch.optim.Muon + torch.optim.AdamW on GPT-2 small.

Usage: python benchmarks/torch_step.py [--rounds N] [--threads N]
Prints a markdown table (ratio = our time / the peer's; below 1 is faster).
"""

import argparse
import datetime
import os
import subprocess


def _cpu_name() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in lines.splitlines()
             if line.startswith("Model name")]
    return names[0] if names else "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    from muon_torch import bench

    rows = bench.compare(rounds=args.rounds, threads=args.threads)
    today = datetime.date.today().isoformat()
    print(f"{today}, {_cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}, "
          f"{args.threads} thread(s), median of {args.rounds} interleaved rounds\n")
    print("| measurement | peer | ours (s) | peer (s) | ours / peer |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['what']} | {row['peer']} | {row['ours_s']:.2f} | {row['peer_s']:.2f} | "
              f"{row['ratio']:.2f} |")


if __name__ == "__main__":
    main()
