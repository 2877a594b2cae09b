"""Shared helpers of the muon_torch tests (imported after `pytest.importorskip("torch")`)."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run on one thread: tiny tensors are slower with a thread pool on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def named_params(shapes, seed=0, dtype=torch.float32):
    """Fresh leaf parameters with seeded random values, as (name, parameter) pairs."""
    generator = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype)))
            for n, s in shapes.items()]


def set_grads(params, seed):
    """Give every parameter a seeded random gradient."""
    generator = torch.Generator().manual_seed(seed)
    for _, p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
