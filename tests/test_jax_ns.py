"""Newton-Schulz in jax.numpy against docs/algorithm.md's float64 golden values and the core."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import muon_core  # noqa: E402
from muon_jax import orthogonalize  # noqa: E402
from muon_jax._ns import orthogonalize_batch  # noqa: E402

pytestmark = pytest.mark.jax


def _singular_values(x) -> np.ndarray:
    return np.sort(np.linalg.svd(np.asarray(x, np.float64), compute_uv=False))


def test_keller_golden_matrix():
    # Golden value (docs/algorithm.md reference values): keller x5 of [[1,2,3],[4,5,6]] in float64.
    expected = [[-0.56829, 0.057742, 0.683774], [0.563355, 0.405613, 0.247871]]
    got = orthogonalize(jnp.array([[1.0, 2, 3], [4, 5, 6]]), dtype="float32")
    np.testing.assert_allclose(got, expected, atol=2e-6)


@pytest.mark.parametrize("coefficients, expected", [
    ("keller", [0.722876, 1.119204]),  # golden values (float64, docs/algorithm.md)
    ("quintic", [1.005632, 1.018629]),
])
def test_diagonal_golden_singular_values(coefficients, expected):
    got = orthogonalize(jnp.diag(jnp.array([3.0, 4.0])), coefficients=coefficients,
                        dtype="float32")
    np.testing.assert_allclose(_singular_values(got), expected, atol=2e-6)


def test_bfloat16_close_to_float64_reference():
    g = np.random.default_rng(0).normal(size=(3, 24, 40))
    expected = muon_core.orthogonalize(g)  # the core on numpy: float64 throughout
    got = orthogonalize(jnp.asarray(g, jnp.float32), dtype="bfloat16")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, atol=4e-2)


@pytest.mark.parametrize("coefficients", ["keller", "quintic", "polar_express",
                                          "polar_express_raw", ((3.0, -3.2, 1.2),)])
@pytest.mark.parametrize("shape", [(7, 12), (12, 7), (2, 5, 5)])
def test_float32_matches_core_reference(coefficients, shape):
    g = np.random.default_rng(1).normal(size=shape)
    expected = muon_core.orthogonalize(g, steps=6, coefficients=coefficients)
    got = orthogonalize(jnp.asarray(g, jnp.float32), steps=6, coefficients=coefficients)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_invariants():
    g = jnp.asarray(np.random.default_rng(2).normal(size=(6, 9)), jnp.float32)
    o = orthogonalize(g)
    np.testing.assert_allclose(orthogonalize(g.T), o.T, atol=1e-6)
    np.testing.assert_allclose(orthogonalize(5.0 * g), o, atol=1e-6)
    zero = orthogonalize(jnp.zeros((4, 3)))
    assert not np.isnan(zero).any() and not np.asarray(zero).any()


def test_batched_blocks_equal_one_by_one():
    rng = np.random.default_rng(3)
    blocks = [jnp.asarray(rng.normal(size=s), jnp.float32)
              for s in [(1, 4, 6), (2, 6, 4), (1, 4, 6), (1, 5, 5)]]
    schedule = muon_core.ns_schedule("keller", 5)
    together = orthogonalize_batch(blocks, schedule, 1e-7, jnp.float32)
    for block, got in zip(blocks, together):
        assert got.shape == block.shape
        np.testing.assert_allclose(got, orthogonalize(block), atol=1e-6)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"G.ndim=1"):
        orthogonalize(jnp.ones(3))
    with pytest.raises(TypeError, match="real floating"):
        orthogonalize(jnp.ones((3, 3), jnp.int32))
    if not jax.config.jax_enable_x64:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            orthogonalize(jnp.ones((3, 3)), dtype="float64")


@pytest.mark.parametrize("strip", [3, 4, 8])
def test_blocked_product_equals_plain_product(monkeypatch, strip):
    # Strips of 3 and 4 rows leave a short last strip on 10 rows; 8 leaves one of 2.
    from muon_jax import _ns
    monkeypatch.setattr(_ns, "STRIP_ROWS", strip)
    x = np.random.default_rng(4).normal(size=(2, 10, 16))
    expected = x @ x.swapaxes(-1, -2)  # float64, numpy

    def matmul(p, q):
        return jnp.matmul(p, q, precision=jax.lax.Precision.HIGHEST)

    got = _ns._blocked_product(jnp.asarray(x, jnp.float32), jnp.asarray(x, jnp.float32), matmul)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert np.array_equal(got, np.swapaxes(got, -1, -2))  # mirrored, so exactly symmetric


@pytest.mark.parametrize("algorithm, coefficients, steps", [
    ("standard", "keller", 5), ("gram", "keller", 5), ("gram", "quintic", 4)])
def test_blocked_symmetric_products_match_float64_reference(monkeypatch, algorithm,
                                                            coefficients, steps):
    from muon_jax import _ns
    monkeypatch.setattr(_ns, "STRIP_ROWS", 4)  # three strips on 10 rows
    g = np.random.default_rng(5).normal(size=(3, 10, 24))
    expected = muon_core.orthogonalize(g, steps=steps, coefficients=coefficients)  # float64
    # The Gram form's float32 round-off grows with the conditioning of X X^T: 6e-5 here on the
    # plain products already, against 5e-7 for the standard iteration.
    atol = {"standard": 1e-5, "gram": 1e-4}[algorithm]
    for symmetric in ("full", "blocked"):
        got = orthogonalize(jnp.asarray(g, jnp.float32), steps, coefficients, dtype="float32",
                            algorithm=algorithm, symmetric=symmetric)
        np.testing.assert_allclose(got, expected, atol=atol)


def test_symmetric_products_choice():
    from muon_jax._ns import symmetric_products
    assert symmetric_products("full") == "full"
    expected = "blocked" if jax.devices()[0].platform == "cpu" else "full"
    assert symmetric_products() == expected
    with pytest.raises(ValueError, match="symmetric='syrk'"):
        orthogonalize(jnp.ones((3, 4)), symmetric="syrk")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nonfinite_stack_leaves_the_next_stack_exact(bad):
    # The largest stack is orthogonalized first and the next one waits for its result: a
    # non-finite result must not leak into the next stack.
    rng = np.random.default_rng(4)
    finite = jnp.asarray(rng.normal(size=(1, 4, 6)), jnp.float32)
    broken = jnp.full((3, 6, 8), bad, jnp.float32)
    schedule = muon_core.ns_schedule("keller", 5)
    _, got = orthogonalize_batch([broken, finite], schedule, 1e-7, jnp.float32)
    np.testing.assert_array_equal(got, orthogonalize_batch([finite], schedule, 1e-7,
                                                           jnp.float32)[0])
