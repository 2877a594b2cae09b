"""muon_torch.Muon (float32 NS) against the core's float64 reference step, over many steps."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import muon_core  # noqa: E402
from muon_core import MuonConfig, Rule  # noqa: E402
from muon_torch import Muon  # noqa: E402
from torch_helpers import one_thread  # noqa: E402, F401

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_thread")]

# Tall, wide, fused QKV, conv, per-expert batch (explicit dims), a permuted view, AdamW tensors.
SHAPES = {
    "embed.weight": (12, 8), "h.0.attn.qkv.weight": (24, 8), "h.0.mlp.fc.weight": (16, 8),
    "h.0.mlp.proj.weight": (8, 16), "h.0.mlp.proj.bias": (8,), "conv.weight": (6, 3, 2, 2),
    "experts.weight": (3, 5, 7), "mix.weight": (4, 3, 6), "norm.weight": (8,),
    "head.weight": (5, 8),
}
RULES = (Rule(match="experts.*", out_axes=(1,), in_axes=(2,)),
         Rule(match="mix.*", out_axes=(2,), in_axes=(0,)))
BASE = MuonConfig(lr=0.02, weight_decay=0.1, rules=RULES,
                  adamw=dict(lr=0.01, betas=(0.9, 0.95), weight_decay=0.05))
VARIANTS = {
    "default": {}, "no_nesterov": {"nesterov": False}, "sum": {"momentum_kind": "sum"},
    "sum_no_nesterov": {"momentum_kind": "sum", "nesterov": False},
    "quintic": {"ns_coefficients": "quintic"},
    "polar_express": {"ns_coefficients": "polar_express"},
    "user_coefficients": {"ns_coefficients": [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)], "ns_steps": 4},
    "match_rms_adamw": {"lr_scaling": "match_rms_adamw"}, "spectral": {"lr_scaling": "spectral"},
    "no_scaling": {"lr_scaling": "none"}, "no_qkv_split": {"split_qkv": False},
    "no_decay_short_ns": {"weight_decay": 0.0, "momentum": 0.8, "ns_steps": 3, "eps": 1e-4},
}
STEPS = 60


def _problem(seed=0):
    """Initial values, targets and per-step gradient noise (float64 numpy)."""
    rng = np.random.default_rng(seed)
    init = {n: rng.normal(size=s) for n, s in SHAPES.items()}
    target = {n: rng.normal(size=s) for n, s in SHAPES.items()}
    noise = [{n: 0.3 * rng.normal(size=s) for n, s in SHAPES.items()} for _ in range(STEPS)]
    return init, target, noise


def _gradient(p, target, noise):
    """Gradient of 0.5 ||p - target||^2 plus noise: the trajectory feeds back into the gradient."""
    return p - target + noise


def _reference_run(config, problem):
    init, target, noise = problem
    config = config.replace(ns_dtype="float64")
    params, state = dict(init), None
    for t in range(STEPS):
        grads = {n: _gradient(params[n], target[n], noise[t][n]) for n in params}
        params, state = muon_core.reference_step(params, grads, state, config)
    return params


def _torch_run(config, problem):
    init, target, noise = problem
    params = {n: torch.nn.Parameter(torch.tensor(v, dtype=torch.float32)) for n, v in init.items()}
    opt = Muon(list(params.items()), config.replace(ns_dtype="float32"))
    as_torch = {n: torch.tensor(v, dtype=torch.float32) for n, v in target.items()}
    for t in range(STEPS):
        for n, p in params.items():
            p.grad = _gradient(p.detach(), as_torch[n], torch.tensor(noise[t][n],
                                                                      dtype=torch.float32))
        opt.step()
    return {n: p.detach().double().numpy() for n, p in params.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trajectory_matches_float64_reference(variant):
    config = BASE.replace(**VARIANTS[variant])
    problem = _problem()
    ours, reference = _torch_run(config, problem), _reference_run(config, problem)
    for name in SHAPES:
        # float32 tolerance: 60 steps of float32 arithmetic against float64, values of order 1
        np.testing.assert_allclose(ours[name], reference[name], atol=2e-5, rtol=1e-5,
                                   err_msg=name)


def test_plan_decisions_are_the_reference_plan():
    problem = _problem()
    params = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in problem[0].items()}
    opt = Muon(list(params.items()), BASE)
    assert opt.plan == muon_core.plan(SHAPES, BASE)
    assert [e.name for e in opt.plan.muon] == [
        "h.0.attn.qkv.weight", "h.0.mlp.fc.weight", "h.0.mlp.proj.weight", "conv.weight",
        "experts.weight", "mix.weight"]
    assert opt.plan["h.0.attn.qkv.weight"].blocks == (8, 8, 8)
    assert opt.plan["conv.weight"].matrix_shape == (1, 6, 12)
    assert opt.plan["mix.weight"].matrix_shape == (3, 6, 4)
