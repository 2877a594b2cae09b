"""Cost of each tensor-parallel mode on GPT-2 small's layers: model, and bytes counted on gloo.

Usage: python benchmarks/tp_cost.py [--tp 2 4] [--measure]

Prints, per layer of a GPT-2 small block (fused Q/K/V and the MLP's first matrix
column-parallel, the two output projections row-parallel, Megatron's layout) and per `tp_mode`:
the bytes each rank sends per Muon step and its Newton-Schulz flops, from
`muon_core.tp_cost` (float32 values, 5 iterations). `--measure` runs one `Muon` step of each
layer alone on `tp` gloo processes on 127.0.0.1 (the parameter made tensor-parallel by
`parallelize_module`) with every `torch.distributed` collective counted by
`muon_torch._distributed.count_traffic`, and prints the measured bytes beside the model's.
"""

from __future__ import annotations

import argparse
import os
import socket
from datetime import timedelta

import muon_core

# name: (out, in), split axis (0 column-parallel, 1 row-parallel)
LAYERS = {"attn.qkv": ((2304, 768), 0), "attn.proj": ((768, 768), 1),
          "mlp.fc": ((3072, 768), 0), "mlp.proj": ((768, 3072), 1)}
MODES = muon_core.TP_MODES
# Every step also all-reduces two float32 flags per parameter (non-finite, has a gradient)
# over the world before anything moves, so that every rank steps or skips together.
FLAG_BYTES = 2 * 4


def model_rows(tp: int) -> list[tuple[str, str, muon_core.TPCost]]:
    """(layer, requested mode, cost) for every layer and mode."""
    return [(name, mode, muon_core.tp_cost(shape, tp, mode, axis))
            for name, (shape, axis) in LAYERS.items() for mode in MODES]


def _worker(rank: int, world: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    from muon_torch import Muon
    from muon_torch._distributed import TrafficCounter, count_traffic

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    for name, ((rows, cols), axis) in LAYERS.items():
        for mode in MODES:
            torch.manual_seed(0)
            layer = torch.nn.Linear(cols, rows, bias=False)
            style = ColwiseParallel() if axis == 0 else RowwiseParallel()
            parallelize_module(layer, mesh, style)
            config = muon_core.MuonConfig(ns_dtype="float32", split_qkv=False, tp_mode=mode)
            opt = Muon([(name + ".weight", layer.weight)], config)
            layer.weight.grad = torch.randn_like(layer.weight)
            counter = TrafficCounter(world)
            with count_traffic(counter):
                opt.step()
            if rank == 0:
                queue.put((name, mode, counter.total))
    dist.destroy_process_group()


def measure(tp: int) -> dict[tuple[str, str], float]:
    """Bytes rank 0 sent in one step of each (layer, mode), counted on `tp` gloo processes."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(tp, port, queue), nprocs=tp)
    out = {}
    while not queue.empty():
        name, mode, sent = queue.get()
        out[name, mode] = sent
    return out


def main() -> None:
    """Print the table (and the measured bytes with --measure)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--measure", action="store_true")
    args = parser.parse_args()
    print("| TP | layer (out x in, split) | tp_mode | runs as | sent KB/step/rank | "
          "NS GFLOP/rank |" + (" measured KB (minus flags) |" if args.measure else ""))
    print("|---|---|---|---|---|---|" + ("---|" if args.measure else ""))
    for tp in args.tp:
        measured = measure(tp) if args.measure else {}
        for name, mode, cost in model_rows(tp):
            (rows, cols), axis = LAYERS[name]
            where = f"{name} ({rows} x {cols}, {'column' if axis == 0 else 'row'})"
            line = (f"| {tp} | {where} | {mode} | {cost.mode} | {cost.bytes_sent / 1e3:,.1f} | "
                    f"{cost.ns_flops / 1e9:.2f} |")
            if measured:
                flags = 2 * (tp - 1) / tp * FLAG_BYTES
                line += f" {(measured[name, mode] - flags) / 1e3:,.1f} |"
            print(line)


if __name__ == "__main__":
    main()
