"""Muon on sharded parameters: the digits MLP under FSDP2, tensor parallelism, or both.

    torchrun --nproc-per-node 2 examples/fsdp_tp_torch.py --layout fsdp          # CPU, gloo
    torchrun --nproc-per-node 2 examples/fsdp_tp_torch.py --layout tp --tp-mode distributed
    torchrun --nproc-per-node 4 examples/fsdp_tp_torch.py --layout 2d            # 2 x 2 mesh
    torchrun --nproc-per-node 8 examples/fsdp_tp_torch.py --layout 2d --backend nccl

`fully_shard` cuts every parameter along dim 0 over the "dp" mesh dimension; `parallelize_module`
makes fc1 column-parallel and fc2 row-parallel over the "tp" dimension. `Muon` reads the
placements of the DTensor parameters: it needs no process group. `--check` also trains an
unsharded copy on the whole batch in every process and prints the largest difference; it runs
in float64, since Newton-Schulz magnifies the float32 rounding differences of a sharded forward
pass along the gradient's smallest singular directions.
"""

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                               parallelize_module)
from torch.nn import functional as F

from muon_cli.data import digits_split
from muon_cli.torch_models import DigitsMLP
from muon_core import MuonConfig
from muon_torch import Muon


def shard(model: torch.nn.Module, layout: str, world: int, device: str) -> int:
    """Shard `model` in place; return the data-parallel size (ranks that see different data)."""
    shape, names = {"fsdp": ((world,), ("dp",)), "tp": ((world,), ("tp",)),
                    "2d": ((world // 2, 2), ("dp", "tp"))}[layout]
    mesh = init_device_mesh(device, shape, mesh_dim_names=names)
    if "tp" in names:
        parallelize_module(model, mesh["tp"], {"fc1": ColwiseParallel(),
                                               "fc2": RowwiseParallel()})
    if "dp" in names:
        fully_shard(model, mesh=mesh["dp"])
        return mesh["dp"].size()
    return 1


def main() -> None:
    """Parse options, train, print the loss (and with --check the difference) on rank 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--layout", choices=("fsdp", "tp", "2d"), default="fsdp")
    parser.add_argument("--tp-mode", choices=("duplicated", "distributed", "blockwise"),
                        default="duplicated")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cpu"
    if args.backend == "nccl":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial parameters on every rank
    dtype = torch.float64 if args.check else torch.float32
    model = DigitsMLP(width=64).to(device, dtype)
    whole = copy.deepcopy(model) if args.check else None
    dp = shard(model, args.layout, world, device.split(":")[0])
    ns_dtype = "float64" if args.check else "float32" if device == "cpu" else "bfloat16"
    config = MuonConfig(lr=0.02, ns_dtype=ns_dtype,
                        adamw={"lr": 3e-3}, tp_mode=args.tp_mode)
    opt = Muon.for_model(model, config)
    reference = Muon.for_model(whole, config) if whole is not None else None
    x, y, _, _ = digits_split(seed=0)
    x, y = torch.as_tensor(x, device=device, dtype=dtype), torch.as_tensor(y, device=device)
    generator = torch.Generator().manual_seed(1)  # the same batches on every rank
    for step in range(args.steps):
        batch = torch.randint(0, len(y), (args.batch,), generator=generator).to(device)
        mine = batch[rank // (world // dp)::dp]  # this data-parallel rank's share
        loss = F.cross_entropy(model(x[mine]), y[mine])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if reference is not None:
            F.cross_entropy(whole(x[batch]), y[batch]).backward()
            reference.step()
            reference.zero_grad()
        if rank == 0 and step % 10 == 9:
            print(f"step {step + 1}: loss on rank 0's share {loss.item():.3f}")
    if whole is not None:
        worst = 0.0
        for (name, p), q in zip(model.named_parameters(), whole.parameters()):
            value = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
            worst = max(worst, float((value - q.detach()).abs().max() / q.detach().abs().max()))
        if rank == 0:
            print(f"largest relative difference from one process: {worst:.1e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
