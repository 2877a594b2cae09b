"""muon_torch.newton_schulz against golden values, the core's float64 NS and its invariants."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import muon_core  # noqa: E402
import muon_torch._newton_schulz  # noqa: E402
from muon_torch import frobenius_norm, newton_schulz  # noqa: E402
from torch_helpers import one_thread  # noqa: E402, F401

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_thread")]
KELLER = muon_core.ns_schedule("keller", 5)


def _core(x: np.ndarray, coefficients="keller") -> np.ndarray:
    """The core's Newton-Schulz on a float64 numpy array: the independent oracle."""
    return muon_core.orthogonalize(x, steps=5, coefficients=coefficients, dtype="float64")


def test_golden_singular_values_of_diag_3_4():
    # Golden facts (float64, docs/algorithm.md reference values): keller x5 -> [0.722876, 1.119204],
    # quintic x5 -> [1.018629, 1.005632]
    g = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    keller = torch.linalg.svdvals(newton_schulz(g, KELLER, 1e-7)).sort().values
    quintic = torch.linalg.svdvals(newton_schulz(g, muon_core.ns_schedule("quintic"), 1e-7))
    torch.testing.assert_close(keller, torch.tensor([0.722876, 1.119204], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(quintic.sort().values,
                               torch.tensor([1.005632, 1.018629], dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_golden_wide_matrix():
    # Golden fact (docs/algorithm.md reference values): keller x5 on [[1,2,3],[4,5,6]] in float64
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    expected = torch.tensor([[-0.56829, 0.057742, 0.683774], [0.563355, 0.405613, 0.247871]],
                            dtype=torch.float64)
    torch.testing.assert_close(newton_schulz(g, KELLER, 1e-7), expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("shape", [(5, 8), (8, 5), (6, 6), (3, 4, 7), (2, 3, 9, 4)])
@pytest.mark.parametrize("coefficients", ["keller", "quintic", "polar_express"])
def test_float32_matches_core_float64(shape, coefficients):
    x = np.random.default_rng(0).normal(size=shape)
    schedule = muon_core.ns_schedule(coefficients, 5)
    ours = newton_schulz(torch.tensor(x, dtype=torch.float32), schedule, 1e-7)
    assert ours.dtype == torch.float32 and ours.shape == shape
    np.testing.assert_allclose(ours.numpy(), _core(x, coefficients), atol=2e-5, rtol=0)


def test_bfloat16_within_bf16_tolerance_of_float64():
    x = np.random.default_rng(1).normal(size=(4, 64, 96))
    ours = newton_schulz(torch.tensor(x, dtype=torch.bfloat16), KELLER, 1e-7).double().numpy()
    reference = _core(x)
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 2e-2


def test_invariants_transpose_scale_zero_rows_and_zero():
    x = torch.randn(3, 6, 10, dtype=torch.float64)
    out = newton_schulz(x, KELLER, 1e-7)
    torch.testing.assert_close(newton_schulz(x.mT, KELLER, 1e-7), out.mT)
    torch.testing.assert_close(newton_schulz(7.5 * x, KELLER, 1e-7), out)
    x[:, 2] = 0
    assert torch.equal(newton_schulz(x, KELLER, 1e-7)[:, 2], torch.zeros(3, 10, dtype=x.dtype))
    zero = newton_schulz(torch.zeros(2, 4, 5), KELLER, 1e-7)
    assert torch.equal(zero, torch.zeros(2, 4, 5))


def test_batch_entries_are_independent():
    x = torch.randn(5, 8, 12)
    batched = newton_schulz(x, KELLER, 1e-7)
    one_by_one = torch.stack([newton_schulz(m, KELLER, 1e-7) for m in x])
    torch.testing.assert_close(batched, one_by_one)


def test_input_is_not_modified():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 6, 4, dtype=dtype)
        before = x.clone()
        newton_schulz(x, KELLER, 1e-7)
        assert torch.equal(x, before)


def test_rejects_vectors():
    with pytest.raises(ValueError, match=r"x.ndim=1 with shape \(5,\)"):
        newton_schulz(torch.ones(5), KELLER, 1e-7)


def test_norm_float32_is_float64_accurate():
    # torch's flat float32 norm of 8M elements is off by ~2e-4 (docs/algorithm.md); ours by ~1e-7
    x = torch.randn(1, 2048, 4096) + 0.5
    exact = x.double().square().sum().sqrt()
    assert abs(frobenius_norm(x).double().item() / exact.item() - 1) < 1e-6


def test_norm_bfloat16_is_float64_norm_rounded():
    x = (torch.randn(64, 96, 128) * 3 + 1).bfloat16()
    exact = x.double().square().sum(dim=(-2, -1), keepdim=True).sqrt()
    assert torch.equal(frobenius_norm(x), exact.bfloat16())


@pytest.mark.parametrize("shape", [(6, 5, 8), (6, 8, 5)])
def test_cpu_chunks_and_out_give_the_same_result(shape, monkeypatch):
    x = torch.randn(*shape, dtype=torch.float64)
    whole = newton_schulz(x, KELLER, 1e-7)
    monkeypatch.setattr(muon_torch._newton_schulz, "CPU_CHUNK_VALUES", 80)  # two per chunk
    assert torch.equal(newton_schulz(x, KELLER, 1e-7), whole)
    in_place = x.clone()
    result = newton_schulz(in_place, KELLER, 1e-7, out=in_place)
    assert torch.equal(result, whole) and result.data_ptr() == in_place.data_ptr()


def test_out_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match=r"out must be a contiguous torch.float32 tensor of 40"):
        newton_schulz(torch.randn(5, 8), KELLER, 1e-7, out=torch.empty(5, 7))


@pytest.mark.parametrize("algorithm", ["standard", "gram"])
@pytest.mark.parametrize("shape", [(2, 10, 31), (3, 9, 7)])
def test_blocked_symmetric_products_match_full_and_float64(algorithm, shape, monkeypatch):
    monkeypatch.setattr(muon_torch._newton_schulz, "STRIP_ROWS", 3)  # several strips, one short
    x = np.random.default_rng(2).normal(size=shape)
    schedule = muon_core.ns_schedule("keller", 5, algorithm)
    tensor = torch.tensor(x, dtype=torch.float32)
    blocked = newton_schulz(tensor, schedule, 1e-7, symmetric="blocked")
    full = newton_schulz(tensor, schedule, 1e-7, symmetric="full")
    reference = muon_core.orthogonalize(x, 5, "keller", dtype="float64", algorithm=algorithm)
    np.testing.assert_allclose(blocked.numpy(), full.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(blocked.numpy(), reference, atol=2e-5, rtol=0)


def test_blocked_product_is_exactly_symmetric(monkeypatch):
    monkeypatch.setattr(muon_torch._newton_schulz, "STRIP_ROWS", 4)
    a = torch.randn(2, 10, 7, dtype=torch.float64)
    out = torch.full((2, 10, 10), float("nan"), dtype=torch.float64)
    muon_torch._newton_schulz._blocked_product(a, a.mT, out)
    assert torch.equal(out, out.mT)
    torch.testing.assert_close(out, a @ a.mT)


def test_unknown_symmetric_choice_is_refused():
    with pytest.raises(ValueError, match=r"symmetric='half' is invalid: expected one of"):
        newton_schulz(torch.randn(4, 6), KELLER, 1e-7, symmetric="half")
