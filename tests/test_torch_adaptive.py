"""muon_torch with second moments and cautious weight decay: state_dict, checkpoints, no NaN."""

import copy

import numpy as np
import pytest
import torch

from muon_core import MuonConfig, reference_step
from muon_torch import Muon

SHAPES = {"attn.qkv.weight": (12, 4), "fc.weight": (3, 5), "fc.bias": (3,)}


def make(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)))
            for n, s in SHAPES.items()]


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    for _, p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)


CFG = MuonConfig(lr=0.05, ns_dtype="float64", weight_decay=0.3, cautious_weight_decay=True)


@pytest.mark.parametrize("method, shape", [("normuon", (1, 12)), ("adamuon", (12, 4))])
def test_state_dict_holds_the_second_moment_and_resumes(method, shape):
    cfg = CFG.replace(second_moment=method)
    params = make()
    opt = Muon(params, config=cfg)
    for step in range(2):
        set_grads(params, step)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())  # state_dict() shares the live tensors
    assert tuple(saved["state"][0]["second_moment"].shape) == shape
    resumed = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in params]
    other = Muon(resumed, config=cfg)
    other.load_state_dict(saved)
    for step in (2, 3):
        set_grads(params, step)
        set_grads(resumed, step)
        opt.step()
        other.step()
    for (_, a), (_, b) in zip(params, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_matches_the_reference_with_per_group_options():
    params = make()
    opt = Muon([{"params": params[:1], "second_moment": "normuon", "beta2": 0.5},
                {"params": params[1:]}], config=CFG)
    ref = {n: p.detach().numpy().copy() for n, p in params}
    ref_state = {}
    for step in range(3):
        set_grads(params, step)
        grads = {n: p.grad.numpy().copy() for n, p in params}
        opt.step()
        qkv = {"attn.qkv.weight": ref["attn.qkv.weight"]}
        new, ref_state["qkv"] = reference_step(
            qkv, {"attn.qkv.weight": grads["attn.qkv.weight"]}, ref_state.get("qkv"),
            CFG.replace(second_moment="normuon", beta2=0.5))
        rest = {n: ref[n] for n in ("fc.weight", "fc.bias")}
        new_rest, ref_state["rest"] = reference_step(
            rest, {n: grads[n] for n in rest}, ref_state.get("rest"), CFG)
        ref = {**new, **new_rest}
    for name, p in params:
        np.testing.assert_allclose(p.detach().numpy(), ref[name], rtol=1e-10, atol=1e-12)


def test_misshapen_second_moment_is_refused_by_name():
    params = make()
    opt = Muon(params, config=CFG.replace(second_moment="normuon"))
    set_grads(params, 0)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["second_moment"] = torch.zeros(12)
    with pytest.raises(ValueError, match=r"'second_moment' of parameter 'attn.qkv.weight' has "
                                         r"shape \(12,\), expected the shape for "
                                         r"second_moment='normuon' \(1, 12\)"):
        Muon(make(), config=CFG.replace(second_moment="normuon")).load_state_dict(saved)


@pytest.mark.parametrize("method", ["normuon", "adamuon"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_gradients_and_zero_weights_stay_finite(method, dtype):
    w = torch.nn.Parameter(torch.zeros(8, 6, dtype=dtype))
    opt = Muon([("fc.weight", w)], config=MuonConfig(second_moment=method,
                                                     cautious_weight_decay=True))
    w.grad = torch.zeros_like(w)
    opt.step()
    w.grad[:, 0] = 1.0
    opt.step()
    assert torch.isfinite(w).all() and w.abs().sum() > 0
    assert torch.isfinite(opt.state[w]["second_moment"]).all()
