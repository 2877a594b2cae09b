"""Timeline of layer-wise sharded Muon: Newton-Schulz overlapped with the parameter broadcasts.

Usage: python benchmarks/overlap_timeline.py [--processes 2] [--steps 3] [--ns-steps 5]
       [--n-layer 12] [--width 100]

`torchrun --standalone` starts `--processes` gloo processes (one thread each); every rank builds
the GPT-2-small parameter set (`muon_cli.benchtools.gpt2_shapes`, float32, no model) in
`Muon(process_group=WORLD, shard="layerwise", ns_dtype="float32")` and steps on seeded random
gradients (`reduce_gradients()` then `step()`), alternating, step by step, the two orders of
the layer-wise step:

- `overlap` (the default): the rank runs the Newton-Schulz of one owned bucket, issues its
  broadcast and goes on to the next bucket while the broadcasts already issued proceed;
- `serial` (`opt._sharding.overlap = False`): every Newton-Schulz first, then every broadcast.

Each step is recorded with `muon_torch._distributed.record_timeline` (perf_counter events:
Newton-Schulz start/end per bucket, broadcast issue/wait/done). Rank 0 prints, per mode, the
median over steps of: the step time (slowest rank), the exposed communication (from the end of
a rank's last Newton-Schulz to its last broadcast done, the slowest rank) and the time ranks
sat blocked in `wait()`; the hidden fraction `1 - exposed(overlap) / exposed(serial)`; and an
ASCII timeline of the last step of each mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta

MODES = ("overlap", "serial")


def _summary(events, step_start):
    """Exposed communication (last NS end -> last broadcast done), blocked wait and the end."""
    ns_end = max((t for t, kind, event, _ in events if kind == "ns" and event == "end"),
                 default=step_start)
    done = max(t for t, kind, event, _ in events if kind == "broadcast" and event == "done")
    waits = {}
    for t, kind, event, bucket in events:
        if kind == "broadcast" and event in ("wait", "done"):
            waits.setdefault(bucket, {})[event] = t
    blocked = sum(w["done"] - w["wait"] for w in waits.values())
    return {"exposed_s": done - ns_end, "blocked_s": blocked}


def _ascii(per_rank, start, end, width):
    """One row per rank: `N` Newton-Schulz, `A` the AdamW step, `~` a collective (gradient
    reduce or parameter broadcast) issued and not yet seen done, `#` Newton-Schulz while one
    is, `.` none of these (copying, checking gradients, waiting for the others)."""
    rows = []
    scale = width / max(end - start, 1e-9)
    for rank, events in enumerate(per_rank):
        cells = [set() for _ in range(width)]
        opened = {}
        for t, kind, event, bucket in events:
            if event in ("start", "issue"):
                opened[kind, bucket] = t
            elif event in ("end", "done"):
                first = int((opened.pop((kind, bucket)) - start) * scale)
                last = int((t - start) * scale)
                for cell in cells[max(first, 0):min(last + 1, width)]:
                    cell.add("comm" if kind in ("reduce", "broadcast") else kind)
        rows.append(f"rank {rank} |" + "".join(
            "#" if {"ns", "comm"} <= c else "N" if "ns" in c else "A" if "adamw" in c
            else "~" if "comm" in c else "." for c in cells) + "|")
    return "\n".join(rows)


def worker(args: argparse.Namespace) -> None:
    """One rank: the two modes alternating for `--steps` timed steps each after a warm-up."""
    import torch
    import torch.distributed as dist

    from muon_cli.benchtools import gpt2_shapes
    from muon_torch import Muon
    from muon_torch._distributed import record_timeline

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank = dist.get_rank()
    shapes = gpt2_shapes(n_layer=args.n_layer)
    init = torch.Generator().manual_seed(0)
    named = [(n, torch.nn.Parameter(torch.randn(s, generator=init) * 0.02))
             for n, s in shapes.items()]
    opt = Muon(named, process_group=dist.group.WORLD, shard="layerwise",
               ns_dtype="float32", ns_steps=args.ns_steps)
    generator = torch.Generator().manual_seed(1000 + rank)
    results = {mode: [] for mode in MODES}
    last = {}
    for step in range(1 + 2 * args.steps):
        mode = MODES[step % 2]
        opt._sharding.overlap = mode == "overlap"
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=generator)
        dist.barrier()
        start = time.perf_counter()
        with record_timeline(opt) as events:
            opt.reduce_gradients()
            opt.step()
        end = time.perf_counter()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"start": start, "end": end, "events": events})
        if step == 0:
            continue  # warm-up
        per_rank = [_summary(g["events"], g["start"]) for g in gathered]
        t0 = min(g["start"] for g in gathered)
        results[mode].append({"step_s": max(g["end"] for g in gathered) - t0,
                              "exposed_s": max(r["exposed_s"] for r in per_rank),
                              "blocked_s": max(r["blocked_s"] for r in per_rank)})
        last[mode] = (gathered, t0)
    if rank == 0:
        medians = {mode: {key: statistics.median(r[key] for r in runs)
                          for key in runs[0]} for mode, runs in results.items()}
        hidden = 1 - medians["overlap"]["exposed_s"] / medians["serial"]["exposed_s"]
        print(json.dumps({"processes": dist.get_world_size(), "ns_steps": args.ns_steps,
                          "steps": args.steps, "buckets": len(opt._sharding.buckets),
                          **{f"{mode}_{k}": v for mode, m in medians.items()
                             for k, v in m.items()}, "hidden_fraction": hidden}), flush=True)
        for mode, (gathered, t0) in last.items():
            end = max(g["end"] for g in gathered)
            print(f"\n{mode}: last step, {end - t0:.2f} s, {args.width} columns")
            print(_ascii([g["events"] for g in gathered], t0, end, args.width))
    dist.destroy_process_group()


def main() -> None:
    """Parse options; run the worker under torchrun."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ns-steps", type=int, default=5)
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={args.processes}", __file__, "--worker", "--steps",
                    str(args.steps), "--ns-steps", str(args.ns_steps), "--n-layer",
                    str(args.n_layer), "--width", str(args.width)], check=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))


if __name__ == "__main__":
    main()
