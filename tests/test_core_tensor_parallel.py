"""Blockwise Muon's definition and the tensor-parallel cost model (numpy, float64)."""

import numpy as np
import pytest

import muon_core
from muon_core import MuonConfig, ns_flops

CONFIG = MuonConfig(ns_dtype="float64", lr=0.05)


def _inputs(shapes, seed=0, steps=3):
    rng = np.random.default_rng(seed)
    params = {n: rng.standard_normal(s) for n, s in shapes.items()}
    grads = [{n: rng.standard_normal(s) for n, s in shapes.items()} for _ in range(steps)]
    return params, grads


def _run(step, params, grads, *args):
    state = None
    for g in grads:
        params, state = step(params, g, state, CONFIG, *args)
    return params, state


def test_one_block_is_the_reference_step():
    params, grads = _inputs({"w": (6, 10), "b": (10,)})
    expected, _ = _run(muon_core.reference_step, params, grads)
    got, _ = _run(muon_core.blockwise_reference_step, params, grads, {"w": (1, 1)})
    for name in params:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("axis", [0, 1])
def test_each_block_steps_as_a_matrix_of_its_own(axis):
    # Independent form: the two pieces as two separate parameters of the reference step.
    params, grads = _inputs({"w": (7, 10), "b": (10,)})
    sizes = muon_core.chunk_sizes(params["w"].shape[axis], 2)  # (4, 3) or (5, 5)

    def split(tree):
        first, second = np.split(tree["w"], [sizes[0]], axis=axis)
        return {"w0": first, "w1": second, "b": tree["b"]}

    expected, _ = _run(muon_core.reference_step, split(params), [split(g) for g in grads])
    got, state = _run(muon_core.blockwise_reference_step, params, grads, {"w": (axis, 2)})
    np.testing.assert_allclose(got["w"], np.concatenate([expected["w0"], expected["w1"]], axis),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["b"], expected["b"], rtol=1e-12, atol=1e-12)
    assert state["w"]["momentum_buffer"].shape == (7, 10)


def test_blockwise_refuses_what_it_cannot_cut():
    params, grads = _inputs({"conv": (4, 3, 3, 3), "w": (6, 10)})
    with pytest.raises(ValueError, match="'conv'.*cannot be cut into blockwise"):
        muon_core.blockwise_reference_step(params, grads[0], None, CONFIG, {"conv": (0, 2)})
    with pytest.raises(ValueError, match=r"cuts\['w'\] = \(2, 2\) is invalid"):
        muon_core.blockwise_reference_step(params, grads[0], None, CONFIG, {"w": (2, 2)})
    with pytest.raises(ValueError, match="second_moment='normuon'"):
        muon_core.blockwise_reference_step(params, grads[0], None,
                                           CONFIG.replace(second_moment="normuon"), {"w": (0, 2)})


def test_chunk_sizes_refuse_bad_parts():
    with pytest.raises(ValueError, match="parts=0 is invalid"):
        muon_core.chunk_sizes(4, 0)


def test_tp_cost_of_each_mode():
    rows, cols, tp = 768, 3072, 4  # GPT-2 small's MLP output projection, row-parallel
    duplicated = muon_core.tp_cost((rows, cols), tp, "duplicated", 1)
    assert duplicated.bytes_sent == 3 / 4 * rows * cols * 4  # ring all-gather of fp32 values
    assert duplicated.ns_flops == ns_flops(rows, cols, 5)
    standard = muon_core.tp_cost((rows, cols), tp, "distributed", 1, algorithm="standard")
    # per iteration: X Xᵀ and B X on the local 768 x 768 piece, A·A on the whole 768 x 768 Gram
    assert standard.ns_flops == 5 * (2 * 768 * 768 * 768 * 2 + 2 * 768 ** 3)
    # all-reduces: the pre-scale (one fp32 value), 5 Gram matrices, the float64 norm
    assert standard.bytes_sent == 2 * 3 / 4 * 4 + 5 * 2 * 3 / 4 * 768 * 768 * 4 + 2 * 3 / 4 * 8
    gram = muon_core.tp_cost((rows, cols), tp, "distributed", 1)
    # one all-reduce of the float32 Gram; X Xᵀ and Q X local; per step A², and but for the
    # last P Q, A·A² and (.)·P: 5 + 3 * 4 = 17 products of 768 x 768 matrices
    assert gram.bytes_sent == 2 * 3 / 4 * 4 + 2 * 3 / 4 * 768 * 768 * 4  # and the pre-scale
    assert gram.ns_flops == 2 * (2 * 768 * 768 * 768) + 17 * 2 * 768 ** 3
    blockwise = muon_core.tp_cost((rows, cols), tp, "blockwise", 1)
    assert (blockwise.bytes_sent, blockwise.ns_flops) == (0.0, ns_flops(768, 768, 5))
    # split along the short axis: "distributed" falls back to "duplicated"
    assert muon_core.tp_cost((rows, cols), tp, "distributed", 0) == \
        muon_core.TPCost("duplicated", duplicated.bytes_sent, duplicated.ns_flops)
    with pytest.raises(ValueError, match="mode='ring' is invalid"):
        muon_core.tp_cost((rows, cols), tp, "ring", 0)
