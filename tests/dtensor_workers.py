"""Ranks of the DTensor tests: a small attention + MLP block sharded with FSDP2 and/or tensor
parallelism, stepped by `muon_torch.Muon`, next to an unsharded copy stepped by one process."""

import copy
import os
import pickle
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

STEPS = 10
# Column- and row-parallel layers of Megatron's layout: q, k, v, fc cut along their output
# rows (Shard(0)), o and proj along their input columns (Shard(1)); `odd` is column-parallel
# along its short axis (7 rows: uneven shards, and "distributed" falls back to "duplicated").
TP_PLAN = {"q": "colwise", "k": "colwise", "v": "colwise", "o": "rowwise", "fc": "colwise",
           "proj": "rowwise", "odd": "colwise"}


class Block(nn.Module):
    """Embedding, attention projections, an MLP, a norm and a head (AdamW by name)."""

    def __init__(self, width: int = 12, hidden: int = 40, vocab: int = 20) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width, bias=False) for _ in range(4))
        self.fc, self.proj = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.odd = nn.Linear(width, 7, bias=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(cases: list[dict], world_size: int, folder: str) -> list[list[dict]]:
    """Run `worker` on `world_size` processes joined by gloo on 127.0.0.1: per rank, each
    case's output."""
    import torch.multiprocessing as mp

    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(worker, args=(world_size, free_port(), cases, folder), nprocs=world_size)
    return [pickle.loads(open(os.path.join(folder, f"rank{r}.pkl"), "rb").read())
            for r in range(world_size)]


def shard_model(model: nn.Module, case: dict) -> None:
    """FSDP2 over the "dp" mesh dimension and/or tensor parallelism over "tp", as `case` says."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", tuple(case["mesh"]), mesh_dim_names=tuple(case["names"]))
    if "tp" in case["names"]:
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                       parallelize_module)

        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        parallelize_module(model, mesh["tp"], {n: styles[s]() for n, s in TP_PLAN.items()})
    if "dp" in case["names"]:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=mesh["dp"])


def _gradients(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return {n: torch.randn(p.shape, generator=generator) for n, p in model.named_parameters()}


def _case_gradients(model: nn.Module, step: int, case: dict) -> dict[str, torch.Tensor]:
    """The step's gradients as `case` alters them: a NaN at step `nan_at` (in rank 0's shard
    only under FSDP: all must skip), zero for the parameter `zero`, the tensor-parallel
    matrices' times `scale`."""
    grads = _gradients(model, step)
    if step == case.get("nan_at"):
        grads["fc.weight"][0, 0] = float("nan")
    if "zero" in case:
        grads[case["zero"]].zero_()
    for name in TP_PLAN:
        grads[f"{name}.weight"] *= case.get("scale", 1.0)
    return grads


def _saved_moments(opt, model: nn.Module) -> dict[str, np.ndarray]:
    """The second moments in this rank's `opt.state_dict()`, by parameter name."""
    packed = opt.state_dict()
    indices = [i for g in packed["param_groups"] for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: packed["state"][i]["second_moment"].numpy()
            for i, p in zip(indices, params) if "second_moment" in packed["state"].get(i, {})}


def _local_shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple((x.to_local() if hasattr(x, "to_local") else x).shape)


def _like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`full` placed like the DTensor `p` (replicated, then redistributed by DTensor itself,
    which also knows FSDP's strided shards)."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = p.device_mesh
    return distribute_tensor(full, mesh, [Replicate()] * mesh.ndim).redistribute(
        mesh, p.placements)


def _message(build) -> str:
    try:
        build()
    except ValueError as error:
        return str(error)
    return "no error"


def refusals(world_size: int) -> dict[str, str]:
    """The error each unsupported layout raises at construction (on a mesh of `world_size`)."""
    from muon_torch import Muon
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard

    def param(shape, mesh, placements):
        return nn.Parameter(DTensor.from_local(torch.randn(shape), mesh, placements,
                                               run_check=False))

    tp = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    out = {"partial": _message(lambda: Muon([("w", param((4, 6), tp, [Partial()]))])),
           "blockwise conv": _message(lambda: Muon([("conv", param((2, 3, 3, 3), tp, [Shard(0)]))],
                                                   tp_mode="blockwise")),
           "blockwise normuon": _message(lambda: Muon([("w", param((4, 6), tp, [Shard(0)]))],
                                                      tp_mode="blockwise",
                                                      second_moment="normuon")),
           "blockwise cautious": _message(lambda: Muon([("w", param((4, 6), tp, [Shard(0)]))],
                                                       tp_mode="blockwise",
                                                       cautious_weight_decay=True))}
    if world_size == 4:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "fsdp"))
        out["two data-parallel"] = _message(lambda: Muon([("w", param((2, 3), mesh,
                                                                      [Shard(0), Shard(1)]))]))
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        out["interleaved"] = _message(lambda: Muon([("w", param((2, 3), mesh,
                                                                [Shard(0), Shard(0)]))]))
    return out


def run_case(case: dict) -> dict:
    """Step the sharded block and an unsharded copy `STEPS` times on the same gradients; the
    final parameters of both (whole tensors) and the local shapes of parameters and momentum."""
    from muon_core import MuonConfig
    from muon_torch import Muon
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    reference = Block()
    model = copy.deepcopy(reference)
    out = {"initial": {n: p.detach().numpy().copy() for n, p in reference.named_parameters()}}
    shard_model(model, case)
    config = MuonConfig(ns_dtype="float32", lr=0.05, **case.get("config", {}))
    opt = Muon(model.named_parameters(), config)
    plain = Muon(reference.named_parameters(), config)
    if case.get("baseline"):  # one process, the options off: to show that they act
        baseline = copy.deepcopy(reference)
        pairs = [(plain, reference), (Muon(baseline.named_parameters(), MuonConfig(
            ns_dtype="float32", lr=0.05)), baseline)]
    else:
        pairs = [(plain, reference)]
    for step in range(STEPS):
        grads = _case_gradients(reference, step, case)
        for _, module in pairs:
            for name, p in module.named_parameters():
                p.grad = grads[name].clone()
        for name, p in model.named_parameters():
            p.grad = (_like(grads[name], p) if isinstance(p, DTensor) else grads[name].clone())
        opt.step()
        for one, _ in pairs:
            one.step()
        if step == STEPS // 2 and case.get("reload"):  # the state survives its own state dict
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    if case.get("baseline"):
        out["baseline"] = {n: p.detach().numpy() for n, p in baseline.named_parameters()}
    out["moments"] = _saved_moments(opt, model)
    out["plain moments"] = {n: plain.state[p]["second_moment"].numpy()
                            for n, p in reference.named_parameters()
                            if "second_moment" in plain.state[p]}
    out["sharded"] = {n: (p.detach().full_tensor() if isinstance(p, DTensor) else p.detach())
                      .numpy() for n, p in model.named_parameters()}
    out["plain"] = {n: p.detach().numpy() for n, p in reference.named_parameters()}
    out["grads"] = [{n: g.numpy() for n, g in _gradients(reference, s).items()}
                    for s in range(STEPS)]
    out["momentum"] = {n: _local_shape(opt.state[p]["momentum_buffer"])
                       for n, p in model.named_parameters() if "momentum_buffer" in opt.state[p]}
    out["local"] = {n: _local_shape(p) for n, p in model.named_parameters()}
    return out


def worker(rank: int, world_size: int, port: int, cases: list[dict], folder: str) -> None:
    """Join the gloo group, run every case (or record its error), save the outputs."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    outputs = []
    for case in cases:
        try:
            outputs.append({"refusals": refusals(world_size)} if case.get("refusals")
                           else run_case(case))
        except Exception as error:  # reported by the test, with the rank
            import traceback

            outputs.append({"error": f"{type(error).__name__}: {error}\n"
                                     f"{traceback.format_exc()}"})
    with open(os.path.join(folder, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(outputs, f)
    dist.destroy_process_group()


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
