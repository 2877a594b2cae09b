"""The DDP recipe of docs/distributed.md: gradients averaged by DDP, then the same Muon step on
every rank. Two gloo processes on loopback must end identical, and equal one process that sees
the whole batch."""

from __future__ import annotations

import socket
import sys
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("muon_torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from muon_cli.torch_models import DigitsMLP  # noqa: E402
from muon_core import MuonConfig  # noqa: E402
from muon_torch import Muon  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                                 reason="needs torch.distributed with gloo")]
WORLD, STEPS, BATCH = 2, 3, 16
CONFIG = MuonConfig(lr=0.02, ns_dtype="float32", adamw={"lr": 3e-3})


def _data(step: int):
    gen = torch.Generator().manual_seed(step)
    return torch.rand(BATCH, 64, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)


def _train(model, opt, rank: int, world: int) -> dict:
    for step in range(STEPS):
        x, y = _data(step)
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        opt.zero_grad()
        F.cross_entropy(model(x[part]), y[part]).backward()
        opt.step()
    module = getattr(model, "module", model)
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _rank(rank: int, port: int, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(DigitsMLP(width=32))
        opt = Muon.for_model(model.module, CONFIG)
        out[rank] = _train(model, opt, rank, WORLD)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_match_each_other_and_one_process():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(_free_port(), out), nprocs=WORLD, join=True)
        ranks = [dict(out[r]) for r in range(WORLD)]
    torch.manual_seed(0)
    model = DigitsMLP(width=32)
    single = _train(model, Muon.for_model(model, CONFIG), 0, 1)
    for name, value in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6)
