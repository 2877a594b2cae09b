"""bfloat16 parameters: torch and JAX updates compared with each other from the same state,
and the conformance suite's bf16 norm check shown to catch a small learning-rate error."""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")
pytest.importorskip("ml_dtypes")

from muon_conformance.adapters import JaxAdapter, TorchAdapter  # noqa: E402
from muon_core import plan  # noqa: E402
from muon_conformance.checks import (  # noqa: E402
    CHECKS, Where, bfloat16_arrays, check_bf16_params, drive,
)
from muon_conformance.oracle import STANDARD_SHAPES, ConformanceFailure, base_config  # noqa: E402

pytestmark = [pytest.mark.jax, pytest.mark.torch]

CONFIG = base_config(ns_dtype="bfloat16")
# Measured one step from zero parameters, Gaussian gradients, seeds 0-2: the relative
# difference between torch's and JAX's bf16 updates is 1.7e-2 to 4.6e-2 on the Muon
# parameters (each is 1-3% from float64, in different directions) and at most 6.3e-3 on the
# AdamW ones (bf16 rounding of lr * sign); each norm is within 1.13% of float64's, so the
# two norms are allowed 1.5% apart.
MUON_RTOL, ADAMW_RTOL, NORM_RTOL = 6e-2, 1e-2, 1.5e-2


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_and_jax_bf16_updates_agree_from_the_same_state(seed):
    rng = np.random.default_rng(seed)
    grads = bfloat16_arrays({n: rng.standard_normal(s) for n, s in STANDARD_SHAPES.items()})
    zeros = bfloat16_arrays({n: np.zeros(s) for n, s in STANDARD_SHAPES.items()})
    torch_step = drive(TorchAdapter(), zeros, [grads], CONFIG)[0][0]
    jax_step = drive(JaxAdapter(), zeros, [grads], CONFIG)[0][0]
    muon = {e.name for e in plan(STANDARD_SHAPES, CONFIG).muon}
    for name in STANDARD_SHAPES:
        a, b = (np.asarray(x[name], np.float64) for x in (torch_step, jax_step))
        assert torch_step[name].dtype == jax_step[name].dtype == grads[name].dtype, name
        scale = max(np.linalg.norm(b), 1e-30)
        limit = MUON_RTOL if name in muon else ADAMW_RTOL
        assert np.linalg.norm(a - b) / scale < limit, name
        assert abs(np.linalg.norm(a) / scale - 1) < NORM_RTOL, name


class ScaledLr(TorchAdapter):
    """A torch backend whose learning rate is off by a factor."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def make(self, params, config):
        return super().make(params, config.replace(lr=config.lr * self.factor))


@pytest.mark.parametrize("factor", [1.025, 0.975])
def test_bf16_check_fails_a_learning_rate_off_by_2_5_percent(factor):
    case = CHECKS["bf16_params"].cases[0]
    where = Where("bf16_params", case.name, case.tier, case.run_config)
    check_bf16_params(TorchAdapter(), None, where)  # the honest backend passes
    with pytest.raises(ConformanceFailure, match="update norm off by"):
        check_bf16_params(ScaledLr(factor), None, dataclasses.replace(where))
