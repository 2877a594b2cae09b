"""Every error a user can cause through the public API, with what its message must name.

Each row: an id, the call, the exception type, and the fragments the message must hold: the
thing (parameter, key, leaf), the offending value, and what was expected. Devices are not
listed: the project's tests run on one CPU, where no device mismatch can be caused.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jnp = pytest.importorskip("jax.numpy")

import muon_core as mc  # noqa: E402
import muon_jax  # noqa: E402
import muon_torch  # noqa: E402
from muon_core import MuonConfig, Rule  # noqa: E402

pytestmark = [pytest.mark.jax, pytest.mark.torch]


def _param(*shape, dtype=torch.float32):
    return torch.nn.Parameter(torch.zeros(shape, dtype=dtype),
                              requires_grad=dtype.is_floating_point)


def _jax_update(params, state_params):
    tx = muon_jax.muon()
    return tx.update(params, tx.init(state_params), params)


def _torch_nan_step():
    p = _param(2, 2)
    opt = muon_torch.Muon([("w", p)])
    p.grad = torch.full((2, 2), float("nan"))
    opt.step()


def _torch_state_shape():
    p = _param(2, 2)
    opt = muon_torch.Muon([("w", p)])
    p.grad = torch.ones(2, 2)
    opt.step()
    saved = opt.state_dict()
    other = muon_torch.Muon([("w", _param(3, 2))])
    other.load_state_dict(saved)


def _checkpoint(tmp_path, change):
    p = _param(4, 2)
    opt = muon_torch.Muon([("w", p), ("b", _param(4))])
    path = tmp_path / "opt.safetensors"
    muon_torch.save(path, opt)
    if change == "shape":
        muon_torch.load(path, muon_torch.Muon([("w", _param(5, 2)), ("b", _param(4))]))
    elif change == "name":
        muon_torch.load(path, muon_torch.Muon([("v", _param(4, 2)), ("b", _param(4))]))
    else:
        rule = Rule(match="w", algorithm="adamw")
        muon_torch.load(path, muon_torch.Muon([("w", _param(4, 2)), ("b", _param(4))],
                                              rules=[rule]))


ROWS = [
    # config values
    ("config.lr", lambda: MuonConfig(lr=-1), ValueError, ["lr", "-1", "expected"]),
    ("config.momentum", lambda: MuonConfig(momentum=1.5), ValueError,
     ["momentum", "1.5", "[0.0, 1.0)"]),
    ("config.ns_steps", lambda: MuonConfig(ns_steps=0), ValueError, ["ns_steps", "0", "[1, 100]"]),
    ("config.ns_dtype", lambda: MuonConfig(ns_dtype="int8"), ValueError,
     ["ns_dtype", "'int8'", "'float32'"]),
    ("config.ns_coefficients", lambda: MuonConfig(ns_coefficients="foo"), ValueError,
     ["ns_coefficients", "'foo'", "'keller'"]),
    ("config.momentum_kind", lambda: MuonConfig(momentum_kind="nag"), ValueError,
     ["momentum_kind", "'nag'", "'ema'"]),
    ("config.lr_scaling", lambda: MuonConfig(lr_scaling="big"), ValueError,
     ["lr_scaling", "'big'", "'original'"]),
    ("config.nonfinite", lambda: MuonConfig(nonfinite="ignore"), ValueError,
     ["nonfinite", "'ignore'", "'skip'"]),
    ("config.eps", lambda: MuonConfig(eps=0), ValueError, ["eps", "0", "(0.0, inf]"]),
    ("config.weight_decay", lambda: MuonConfig(weight_decay=-0.1), ValueError,
     ["weight_decay", "-0.1", "expected"]),
    ("config.adamw.betas", lambda: MuonConfig(adamw=dict(betas=(0.9, 1.5))), ValueError,
     ["adamw.betas[1]", "1.5", "[0.0, 1.0)"]),
    ("config.unknown_key", lambda: MuonConfig.from_dict({"lrr": 1}), ValueError,
     ["'lrr'", "allowed keys", "'lr'"]),
    # rules and routing
    ("rule.algorithm", lambda: Rule(match="*", algorithm="sgd"), ValueError,
     ["rule.algorithm", "'sgd'", "'adamw'"]),
    ("rule.split", lambda: mc.plan({"qkv.weight": (10, 4)},
                                   MuonConfig(rules=[Rule(match="*", split=(3, 3))])),
     ValueError, ["'qkv.weight'", "split=(3, 3)", "expected the output size 10"]),
    ("rule.out_axes", lambda: mc.plan({"w": (4, 4)},
                                      MuonConfig(rules=[Rule(match="*", out_axes=(5,),
                                                             in_axes=(0,))])),
     ValueError, ["'w'", "out_axes=(5,)", "expected distinct axes"]),
    ("plan.layout", lambda: mc.plan({"w": (4, 4)}, MuonConfig(), layout="io"), ValueError,
     ["layout", "'io'", "'out_in'"]),
    ("plan.muon_on_a_vector", lambda: mc.plan({"w": (4,)}, MuonConfig(
        rules=[Rule(match="*", algorithm="muon")])), ValueError,
     ["'w'", "(4,)", "ndim >= 2"]),
    # groups and parameters (torch)
    ("torch.config_type", lambda: muon_torch.Muon([_param(2, 2)], config={"lr": 1}),
     TypeError, ["config", "dict", "MuonConfig"]),
    ("torch.override", lambda: muon_torch.Muon([_param(2, 2)], lrr=1), ValueError,
     ["'lrr'", "expected MuonConfig fields"]),
    ("torch.group_algorithm", lambda: muon_torch.Muon([{"params": [_param(2, 2)],
                                                        "algorithm": "sgd"}]),
     ValueError, ["param group 0", "'sgd'", "expected 'muon' or 'adamw'"]),
    ("torch.integer_param", lambda: muon_torch.Muon([("w", _param(2, 2, dtype=torch.int32))]),
     ValueError, ["'w'", "torch.int32", "real floating tensor"]),
    ("torch.duplicate_tensor", lambda: (lambda p: muon_torch.Muon([("a", p), ("b", p)]))(
        _param(2, 2)), ValueError, ["'b'", "(2, 2)", "each tensor may appear once"]),
    ("torch.nonfinite_gradient", _torch_nan_step, FloatingPointError,
     ["'w'", "NaN or Inf", "nonfinite='skip'"]),
    ("torch.state_shape", _torch_state_shape, ValueError,
     ["'w'", "(2, 2)", "expected the parameter's shape (3, 2)"]),
    # core reference
    ("core.gradient_shape", lambda: mc.reference_step(
        {"w": np.zeros((2, 2))}, {"w": np.zeros((3, 2))}, None, MuonConfig()), ValueError,
     ["'w'", "(3, 2)", "expected the parameter's shape (2, 2)"]),
    ("core.nonfinite_gradient", lambda: mc.reference_step(
        {"w": np.zeros((2, 2))}, {"w": np.full((2, 2), np.nan)}, None, MuonConfig()),
     FloatingPointError, ["'w'", "NaN or Inf", "nonfinite='skip'"]),
    # JAX
    ("jax.override", lambda: muon_jax.muon(lrr=1), TypeError,
     ["'lrr'", "expected MuonConfig fields"]),
    ("jax.algorithms", lambda: muon_jax.plan_for({"w": jnp.zeros((2, 2))},
                                                 algorithms={"v": "muon"}),
     ValueError, ["['v']", "not leaves", "expected names from ['w']"]),
    ("jax.integer_leaf", lambda: muon_jax.muon().init({"w": jnp.zeros((2, 2), jnp.int32)}),
     TypeError, ["'w'", "int32", "expected a real floating dtype"]),
    ("jax.state_mismatch", lambda: _jax_update({"w": jnp.zeros((2, 2)), "v": jnp.zeros((2, 2))},
                                               {"w": jnp.zeros((2, 2))}),
     ValueError, ["['w']", "['v', 'w']", "init on these parameters"]),
    ("jax.missing_params", lambda: (lambda tx: tx.update(
        {"w": jnp.zeros((2, 2))}, tx.init({"w": jnp.zeros((2, 2))})))(muon_jax.muon()),
     ValueError, ["weight decay", "params", "weight_decay=0"]),
]


@pytest.mark.parametrize("call, error, fragments", [r[1:] for r in ROWS],
                         ids=[r[0] for r in ROWS])
def test_error_names_the_thing_the_value_and_what_was_expected(call, error, fragments):
    with pytest.raises(error) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


CHECKPOINT_ROWS = [
    ("shape", ["'w'", "stored_shape", "[4, 2] in the checkpoint, [5, 2] here"]),
    ("name", ["'v'", "not in the checkpoint", "names="]),
    ("routing", ["'w'", "algorithm", "muon in the checkpoint, adamw here"]),
]


@pytest.mark.parametrize("change, fragments", CHECKPOINT_ROWS, ids=[r[0] for r in CHECKPOINT_ROWS])
def test_checkpoint_mismatch_names_the_first_difference(tmp_path, change, fragments):
    with pytest.raises(ValueError) as info:
        _checkpoint(tmp_path, change)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_checkpoint_version_names_both_versions(tmp_path):
    from muon_core import _checkpoint as ckpt

    opt = muon_torch.Muon([("w", _param(4, 2))])
    path = tmp_path / "opt.safetensors"
    muon_torch.save(path, opt)
    metadata, tensors = ckpt.read_safetensors(path)
    ckpt.write_safetensors(path, tensors, {**metadata, "version": "7"})
    with pytest.raises(ValueError, match=re.escape("format version '7': expected 1")):
        muon_torch.load(path, opt)
