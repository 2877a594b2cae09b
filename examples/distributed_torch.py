"""Sharded Muon on torch.distributed: the digits MLP trained on every rank's share of a batch.

    torchrun --nproc-per-node 2 examples/distributed_torch.py                  # CPU, gloo
    torchrun --nproc-per-node 2 examples/distributed_torch.py --shard zero1
    torchrun --nproc-per-node 8 examples/distributed_torch.py --backend nccl   # one GPU a rank

No DDP: `opt.reduce_gradients()` averages the gradients, each rank receiving those it updates;
`opt.step()` updates what this rank owns and shares the new values. `--checkpoint DIR` saves the
optimizer state with torch.distributed.checkpoint (it loads onto any number of ranks).
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn import functional as F

from muon_cli.data import digits_split
from muon_cli.torch_models import DigitsMLP
from muon_core import MuonConfig
from muon_torch import Muon


def main() -> None:
    """Parse options, train, print the loss on rank 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--shard", choices=("layerwise", "zero1"), default="layerwise")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args()
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial parameters on every rank
    model = DigitsMLP(width=64).to(device)
    config = MuonConfig(lr=0.02, ns_dtype="float32" if device.type == "cpu" else "bfloat16",
                        adamw={"lr": 3e-3})
    opt = Muon.for_model(model, config, process_group=dist.group.WORLD, shard=args.shard)
    if rank == 0:
        print(opt.owners)
    x, y, _, _ = digits_split(seed=0)
    x, y = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)
    generator = torch.Generator().manual_seed(1)  # the same batches on every rank
    for step in range(args.steps):
        batch = torch.randint(0, len(y), (args.batch,), generator=generator).to(device)
        mine = batch[rank::world]  # this rank's share
        loss = F.cross_entropy(model(x[mine]), y[mine])
        loss.backward()
        opt.reduce_gradients()
        opt.step()
        opt.zero_grad()
        if rank == 0 and step % 10 == 9:
            print(f"step {step + 1}: loss on rank 0's share {loss.item():.3f}")
    if args.checkpoint:
        import torch.distributed.checkpoint as dcp

        dcp.save(opt.state_dict(), checkpoint_id=args.checkpoint)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
