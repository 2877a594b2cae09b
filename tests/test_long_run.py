"""Long-run stability of the float64 reference: 10,000 steps on a small noisy quadratic.

Parameters stay finite and bounded, and each orthogonalized update keeps its singular values
in keller's band: normalized input singular values above 0.01 land in about [0.68, 1.2]
(docs/algorithm.md), and none exceeds 1.2.
"""

import numpy as np
import pytest

from muon_core import MuonConfig, plan, reference_step

pytestmark = pytest.mark.slow

STEPS = 10_000
SHAPES = {"a.weight": (8, 4), "b.weight": (4, 8), "a.bias": (8,)}
# No decay, no LR scale and no Nesterov: the Muon update is exactly -lr * NS(momentum buffer).
CONFIG = MuonConfig(lr=0.02, weight_decay=0.0, nesterov=False, lr_scaling="none",
                    ns_dtype="float64", adamw=dict(lr=1e-2, weight_decay=0.0))


def test_ten_thousand_reference_steps_stay_finite_and_in_the_band():
    rng = np.random.default_rng(0)
    targets = {n: rng.standard_normal(s) for n, s in SHAPES.items()}
    params = {n: np.zeros(s) for n, s in SHAPES.items()}
    routing = plan(SHAPES, CONFIG)
    muon = [e.name for e in routing.muon]
    state, lowest, highest = None, np.inf, 0.0
    for _ in range(STEPS):
        grads = {n: params[n] - targets[n] + 0.3 * rng.standard_normal(s)
                 for n, s in SHAPES.items()}
        new, state = reference_step(params, grads, state, CONFIG, routing)
        for name in muon:
            update = np.linalg.svd((params[name] - new[name]) / CONFIG.lr, compute_uv=False)
            direction = np.linalg.svd(state[name]["momentum_buffer"], compute_uv=False)
            normalized = direction / np.linalg.norm(direction)
            in_band = int(np.sum(normalized > 0.01))
            assert update.max() <= 1.2, (name, update)
            # svd sorts descending: the in_band largest outputs are the images of those inputs.
            assert update[in_band - 1] >= 0.68, (name, update, normalized)
            lowest, highest = min(lowest, update[in_band - 1]), max(highest, update.max())
        params = new
    for name, value in params.items():
        assert np.all(np.isfinite(value)), name
        assert np.abs(value - targets[name]).max() < 2.0, name
    assert 0.68 <= lowest and highest <= 1.2
