"""The Triton symmetric-product kernel under triton's CPU interpreter (`TRITON_INTERPRET=1`),
against float64 products and against the plain Newton-Schulz path.

triton reads `TRITON_INTERPRET` when it is imported, so a run without it set runs this file
again in a child interpreter with it set (`test_in_triton_interpreter`).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed: the Triton kernel is not tested")

import muon_core  # noqa: E402
from muon_torch import _newton_schulz, _triton_syrk  # noqa: E402
from muon_torch._newton_schulz import newton_schulz  # noqa: E402
from torch_helpers import one_thread  # noqa: E402, F401

INTERPRETED = _triton_syrk.interpreted()
pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_thread")]
interpreted_only = pytest.mark.skipif(not INTERPRETED,
                                      reason="run by test_in_triton_interpreter")


@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
def test_in_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]


@interpreted_only
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(2, 40, 70), (1, 16, 16), (3, 33, 5)])
def test_x_xt_matches_float64_and_is_exactly_symmetric(shape, dtype, tolerance):
    # tiles of 16: edge tiles, several upper tiles, and a contracted axis shorter than a slice
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    ours = _triton_syrk.symmetric_product(x, block=16, block_k=16)
    reference = x.double() @ x.double().mT
    assert ours.dtype == dtype and ours.shape == (shape[0], shape[1], shape[1])
    assert torch.equal(ours, ours.mT)
    assert (ours.double() - reference).abs().max() <= tolerance * reference.abs().max()


@interpreted_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_base_is_rounded_once_and_may_be_out(dtype):
    # beta C + alpha A A^T with C symmetric, C also the output (as Newton-Schulz uses it)
    x = torch.randn(2, 40, 24, generator=torch.Generator().manual_seed(3))
    c = torch.randn(2, 40, 40, generator=torch.Generator().manual_seed(4))
    c = (c + c.mT).to(dtype)
    reference = -4.775 * c.double() + 2.0315 * (x.to(dtype).double() @ x.to(dtype).double().mT)
    out = c.clone()
    _triton_syrk.symmetric_product(x.to(dtype), out=out, base=out, beta=-4.775, alpha=2.0315,
                                   block=16, block_k=16)
    # one rounding to `dtype`: within an ulp (triton's interpreter may round bfloat16 down)
    rounding = 2.4e-7 if dtype == torch.float32 else 7.9e-3
    assert (out.double() - reference).abs().max() <= rounding * reference.abs().max()
    assert torch.equal(out, out.mT)


@interpreted_only
def test_product_of_commuting_symmetric_matrices():
    # P Q with P, Q polynomials in one symmetric A: symmetric, computed as P (Q^T)^T
    a = torch.randn(2, 24, 24, dtype=torch.float64)
    a = a + a.mT
    p, q = 3 * a + a @ a, torch.eye(24) - 0.5 * a
    out = torch.empty(2, 24, 24)
    _triton_syrk.symmetric_product(p.float(), q.float(), out=out, block=16, block_k=16)
    reference = p @ q
    assert (out.double() - reference).abs().max() <= 1e-6 * reference.abs().max()


def test_bad_input_is_refused_with_its_shape():
    with pytest.raises(ValueError, match="a.shape"):
        _triton_syrk.symmetric_product(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="dtype"):
        _triton_syrk.symmetric_product(torch.zeros(1, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="out"):
        _triton_syrk.symmetric_product(torch.zeros(1, 4, 5), out=torch.zeros(1, 5, 5))


@interpreted_only
@pytest.mark.parametrize("algorithm, coefficients", [("standard", "keller"), ("gram", "keller"),
                                                     ("gram", "polar_express")])
def test_newton_schulz_with_kernel_matches_plain_path_and_float64(algorithm, coefficients):
    x = np.random.default_rng(1).normal(size=(2, 20, 48))
    schedule = muon_core.ns_schedule(coefficients, 5, algorithm)
    tensor = torch.tensor(x, dtype=torch.float32)
    ours = newton_schulz(tensor, schedule, 1e-7, symmetric="triton")
    plain = newton_schulz(tensor, schedule, 1e-7, symmetric="full")
    reference = muon_core.orthogonalize(x, 5, coefficients, dtype="float64", algorithm=algorithm)
    np.testing.assert_allclose(ours.numpy(), plain.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours.numpy(), reference, atol=2e-5, rtol=0)
    tall = newton_schulz(tensor.mT, schedule, 1e-7, symmetric="triton")
    np.testing.assert_allclose(tall.mT.numpy(), ours.numpy(), atol=1e-6, rtol=0)


@interpreted_only
def test_default_uses_kernel_only_on_cuda():
    assert _newton_schulz.symmetric_products(torch.device("cpu")) == "blocked"
    assert _newton_schulz.symmetric_products(torch.device("cpu"), "triton") == "triton"


def test_kernel_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _triton_syrk.available.cache_clear()
    try:
        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present: the kernel can run")
        with pytest.raises(ValueError, match="symmetric='triton'"):
            newton_schulz(torch.randn(4, 6), muon_core.ns_schedule(), 1e-7, symmetric="triton")
    finally:
        _triton_syrk.available.cache_clear()
