"""Bytes, optimizer memory and step time of sharded Muon next to ZeRO-1 AdamW and DDP + Muon.

Usage: python benchmarks/distributed.py [--world-sizes 1 2 4] [--steps 2] [--ns-steps 5]
       [--n-layer 12] [--contenders layerwise zero1 zero1-adamw ddp-muon]

For each world size, `torchrun --standalone` starts that many gloo processes on this machine;
every rank builds the GPT-2-small parameter set (`muon_cli.benchtools.gpt2_shapes`, float32,
no model) and runs one contender for one warm-up step and `--steps` timed steps on seeded random
gradients (different on every rank); each (world size, contender) pair is a separate launch, so
one process holds one contender's memory only. Gradients come out of a backward pass that
draws them from a seeded generator (nothing is kept between steps), so DDP reduces them as in
training. Every collective is counted by
one `TrafficCounter` through `count_traffic`: ours, torch's ZeroRedundancyOptimizer, and DDP's
gradient all-reduce (its default hook registered in Python, so the same wrapper sees it).
Contenders:

- `layerwise`, `zero1`: `Muon(process_group=WORLD, shard=...)`, no DDP, `opt.reduce_gradients()`;
- `zero1-adamw`: DDP + `ZeroRedundancyOptimizer(AdamW)` on every parameter;
- `ddp-muon`: DDP + `Muon()` replicated on every rank.

Rank 0 prints one JSON line per contender: bytes sent per step per rank, optimizer-state bytes
(largest rank), peak resident memory (largest rank), step time (median over steps of the slowest rank), NS load max/mean.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import timedelta

CONTENDERS = ("layerwise", "zero1", "zero1-adamw", "ddp-muon")


class LossOfGradients:
    """A module whose backward gives each parameter a seeded random gradient, drawn in the
    backward itself so that no gradient source stays in memory."""

    def __new__(cls, params):
        import torch

        class SeededGradient(torch.autograd.Function):
            @staticmethod
            def forward(ctx, p, generator):
                ctx.shape, ctx.generator = p.shape, generator
                return p.new_zeros(())

            @staticmethod
            def backward(ctx, _):
                return torch.randn(ctx.shape, generator=ctx.generator), None

        class Module(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.ps = torch.nn.ParameterList(params)

            def forward(self, generator):
                return sum(SeededGradient.apply(p, generator) for p in self.ps)

        return Module()


def _state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for s in state.values() for t in s.values()
               if hasattr(t, "numel"))


def _contender(name, named, config):
    """(module to backward through, optimizer, after-backward hook, state dict to measure)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from muon_torch import Muon

    params = [p for _, p in named]
    module = LossOfGradients(params)
    if name in ("layerwise", "zero1"):
        opt = Muon(named, config, process_group=dist.group.WORLD, shard=name)
        return module, opt, opt.reduce_gradients, lambda: opt.state
    ddp = DistributedDataParallel(module, bucket_cap_mb=32, gradient_as_bucket_view=True)
    ddp.register_comm_hook(None, default_hooks.allreduce_hook)  # in Python: counted
    if name == "zero1-adamw":
        opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-3)
        return ddp, opt, lambda: None, lambda: opt.optim.state
    opt = Muon(named, config)
    return ddp, opt, lambda: None, lambda: opt.state


def worker(args: argparse.Namespace) -> None:
    """One rank: the contenders in turn on the same parameters and gradients."""
    import torch
    import torch.distributed as dist

    import muon_core
    from muon_cli.benchtools import gpt2_shapes
    from muon_torch._distributed import TrafficCounter, count_traffic

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    shapes = gpt2_shapes(n_layer=args.n_layer)
    config = muon_core.MuonConfig(ns_dtype="float32", ns_steps=args.ns_steps)
    load = muon_core.assign_owners(muon_core.plan(shapes, config), world).imbalance
    for name in args.contenders:
        init = torch.Generator().manual_seed(0)
        named = [(n, torch.nn.Parameter(torch.randn(s, generator=init) * 0.02))
                 for n, s in shapes.items()]
        counter = TrafficCounter(world)
        module, opt, reduce, state = _contender(name, named, config)
        times = []
        generator = torch.Generator().manual_seed(1000 + rank)
        for step in range(args.steps + 1):
            dist.barrier()
            start = time.perf_counter()
            with count_traffic(counter):
                module(generator).backward()
                reduce()
                opt.step()
            elapsed = torch.tensor(time.perf_counter() - start)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            opt.zero_grad()
            if step == 0:
                counter.sent.clear()  # the warm-up step's traffic is not counted
            else:
                times.append(float(elapsed))
        state_bytes = torch.tensor(_state_bytes(state()))
        dist.all_reduce(state_bytes, op=dist.ReduceOp.MAX)
        peak = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(json.dumps({"world_size": world, "contender": name,
                              "sent_MB_per_step": counter.total / args.steps / 1e6,
                              "state_MB_per_rank": int(state_bytes) / 1e6,
                              "step_s": statistics.median(times), "ns_load_max_mean": load,
                              "peak_rss_MB_per_rank": int(peak) * 1024 / 1e6}),
                  flush=True)
        del module, opt, named
    dist.destroy_process_group()


def main() -> None:
    """Parse options; run the worker under torchrun for each world size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--ns-steps", type=int, default=5)
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    for world in args.world_sizes:
        for name in args.contenders:  # one launch each: a process holds one contender
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={world}", __file__, "--worker", "--steps",
                            str(args.steps), "--ns-steps", str(args.ns_steps), "--n-layer",
                            str(args.n_layer), "--contenders", name], check=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))


if __name__ == "__main__":
    main()
