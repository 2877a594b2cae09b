"""Newton-Schulz: golden float64 values (docs/algorithm.md), invariants, namespaces, errors."""

import numpy as np
import pytest

import muon_core
from muon_core import ns_schedule, orthogonalize
from muon_core._ns import POLAR_EXPRESS_RAW, QUINTIC

from muon_cli.benchtools import peer_schedule

NAMESPACES = ["numpy", "array_api_strict"]


def as_namespace(x, name):
    if name == "numpy":
        return np.asarray(x, dtype=np.float64)
    xp = pytest.importorskip(name)
    return xp.asarray(np.asarray(x, dtype=np.float64))


def singular_values(x):
    return np.linalg.svd(np.asarray(x), compute_uv=False)


def scalar_iteration(s, schedule):
    """The NS polynomial applied to one normalised singular value (independent of matrices)."""
    for a, b, c in schedule.coefficients:
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.mark.parametrize("xp_name", NAMESPACES)
def test_keller_golden_values(xp_name):
    # docs/algorithm.md, reference values: float64 facts computed independently.
    out = orthogonalize(as_namespace(np.diag([3.0, 4.0]), xp_name))
    np.testing.assert_allclose(sorted(singular_values(out)), [0.722876, 1.119204], atol=1e-6)
    out = orthogonalize(as_namespace([[1, 2, 3], [4, 5, 6]], xp_name))
    expected = [[-0.56829, 0.057742, 0.683774], [0.563355, 0.405613, 0.247871]]
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_quintic_golden_values():
    out = orthogonalize(np.diag([3.0, 4.0]), coefficients="quintic")
    np.testing.assert_allclose(sorted(singular_values(out)), [1.005632, 1.018629], atol=1e-6)


def test_keller_maps_singular_values_as_published():
    # A matrix with chosen singular values: U diag(s) V^T, Frobenius norm 1 after scaling.
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    v, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    s = np.array([1e-3, 1e-2, 0.1, 0.5, 1.0])
    g = u @ np.diag(s) @ v[:5]
    out = orthogonalize(g * np.linalg.norm(s) / np.linalg.norm(g))
    # Normalising divides s by ||s||; map the golden points through that factor.
    golden = scalar_iteration(s / np.linalg.norm(s), ns_schedule("keller", 5))
    np.testing.assert_allclose(sorted(singular_values(out)), sorted(golden), rtol=1e-9)
    # docs/algorithm.md: keller maps {1e-3, 1e-2, 0.1, 0.5, 1} to these after 5 steps.
    np.testing.assert_allclose(scalar_iteration(s, ns_schedule("keller", 5)),
                               [0.470544, 0.698917, 0.712120, 0.765439, 0.696436], atol=1e-6)


def test_schedules_match_published_coefficients():
    assert ns_schedule("quintic", 5).coefficients == QUINTIC
    assert ns_schedule("keller", 3).coefficients == ((3.4445, -4.7750, 2.0315),) * 3
    raw = ns_schedule("polar_express_raw", 7).coefficients
    assert raw[:5] == POLAR_EXPRESS_RAW and raw[5:] == ((1.875, -1.25, 0.375),) * 2
    safe = ns_schedule("polar_express", 5)
    assert safe.norm_scale == 1.01
    a, b, c = POLAR_EXPRESS_RAW[0]
    np.testing.assert_allclose(safe.coefficients[0], (a / 1.01, b / 1.01**3, c / 1.01**5))
    assert ns_schedule([(1.0, 2.0, 3.0), (4.0, 5.0, 6.0)], 3).coefficients[-1] == (4.0, 5.0, 6.0)


@pytest.mark.parametrize("preset", ["keller", "quintic", "polar_express", "polar_express_raw"])
def test_each_preset_acts_on_singular_values_like_its_scalar_polynomial(preset):
    rng = np.random.default_rng(1)
    g = rng.standard_normal((6, 9))
    schedule = ns_schedule(preset, 5)
    s = singular_values(g) / (np.linalg.norm(g) * schedule.norm_scale)
    out = orthogonalize(g, coefficients=preset)
    np.testing.assert_allclose(singular_values(out), np.sort(scalar_iteration(s, schedule))[::-1],
                               rtol=1e-9, atol=1e-12)


def test_polar_express_orthogonalizes_well():
    g = np.random.default_rng(2).standard_normal((32, 64))
    sv = singular_values(orthogonalize(g, coefficients="polar_express", steps=8))
    assert np.all(np.abs(sv - 1) < 0.05), sv


@pytest.mark.parametrize("xp_name", NAMESPACES)
def test_invariants(xp_name):
    rng = np.random.default_rng(3)
    g = rng.standard_normal((5, 8))
    x = as_namespace(g, xp_name)
    out = np.asarray(orthogonalize(x))
    np.testing.assert_allclose(np.asarray(orthogonalize(as_namespace(g.T, xp_name))), out.T,
                               atol=1e-12)
    np.testing.assert_allclose(np.asarray(orthogonalize(as_namespace(7.5 * g, xp_name))), out,
                               atol=1e-12)
    g[2] = 0.0
    assert np.all(np.asarray(orthogonalize(as_namespace(g, xp_name)))[2] == 0.0)
    zero = np.asarray(orthogonalize(as_namespace(np.zeros((4, 3)), xp_name)))
    assert np.all(zero == 0.0)


def test_batched_equals_one_at_a_time_and_input_is_untouched():
    g = np.random.default_rng(4).standard_normal((2, 3, 9, 4))
    before = g.copy()
    out = orthogonalize(g, coefficients="quintic")
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(out[i, j], orthogonalize(g[i, j], coefficients="quintic"),
                                       atol=1e-13)
    np.testing.assert_array_equal(g, before)


def test_working_dtype_and_result_dtype():
    g = np.random.default_rng(5).standard_normal((4, 6))
    out32 = orthogonalize(g, dtype="float32")
    assert out32.dtype == np.float64
    np.testing.assert_allclose(out32, orthogonalize(g), atol=1e-5)
    # numpy has no bfloat16: the working precision falls back to float32
    np.testing.assert_array_equal(orthogonalize(g, dtype="bfloat16"), out32)


def test_bad_input_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"G.ndim=1"):
        orthogonalize(np.ones(3))
    with pytest.raises(TypeError, match="G.dtype=dtype\\('int64'\\)"):
        orthogonalize(np.ones((3, 3), dtype=np.int64))
    for eps in (0.0, -1e-7, float("nan")):
        with pytest.raises(ValueError, match="eps=.* is invalid: expected a finite number > 0"):
            orthogonalize(np.zeros((3, 3)), eps=eps)
    with pytest.raises(ValueError, match="ns_steps=0"):
        orthogonalize(np.ones((3, 3)), steps=0)
    with pytest.raises(ValueError, match="ns_coefficients='fast'"):
        orthogonalize(np.ones((3, 3)), coefficients="fast")
    with pytest.raises(ValueError,
                       match=r"dtype='int64' is invalid: expected one of \['auto', 'bfloat16'"):
        orthogonalize(np.ones((3, 3)), dtype="int64")


def test_peer_schedule_refuses_what_a_peer_cannot_run():
    config = muon_core.MuonConfig(ns_coefficients="keller", momentum_kind="sum")
    assert peer_schedule(config, "peer", {}) == muon_core.ns_schedule("keller", 5)
    with pytest.raises(ValueError, match=r"momentum_kind='sum': peer only has \['ema'\]"):
        peer_schedule(config, "peer", {"momentum_kind": ("ema",)})
    with pytest.raises(ValueError, match=r"ns_coefficients='quintic': peer takes one"):
        peer_schedule(config.replace(ns_coefficients="quintic"), "peer", {})


# The rule as docs/algorithm.md states it: bfloat16 on TPUs, CUDA >= 8.0 and CPUs whose
# kernels use AVX512-BF16 or AMX; float32 elsewhere.
@pytest.mark.parametrize("facts, expected", [
    (muon_core.DeviceFacts("tpu"), "bfloat16"),
    (muon_core.DeviceFacts("cuda", cuda_capability=(8, 0)), "bfloat16"),
    (muon_core.DeviceFacts("cuda", cuda_capability=(9, 0)), "bfloat16"),
    (muon_core.DeviceFacts("cuda", cuda_capability=(7, 5)), "float32"),
    (muon_core.DeviceFacts("cuda"), "float32"),
    (muon_core.DeviceFacts("cpu", cpu_capability="AVX512",
                           cpu_flags=frozenset({"avx512f", "avx512_bf16"})), "bfloat16"),
    (muon_core.DeviceFacts("cpu", cpu_capability="AVX512",
                           cpu_flags=frozenset({"amx_bf16"})), "bfloat16"),
    (muon_core.DeviceFacts("cpu", cpu_flags=frozenset({"avx512_bf16"})), "bfloat16"),
    (muon_core.DeviceFacts("cpu", cpu_capability="AVX512", cpu_flags=frozenset({"avx512f"})),
     "float32"),
    (muon_core.DeviceFacts("cpu", cpu_capability="AVX2", cpu_flags=frozenset({"avx2"})),
     "float32"),
    (muon_core.DeviceFacts("cpu", cpu_capability="AVX2", cpu_flags=frozenset({"amx_bf16"})),
     "float32"),
    (muon_core.DeviceFacts("mps"), "float32"),
    (None, "float32"),
])
def test_auto_ns_dtype_follows_the_documented_rule(facts, expected):
    dtype, reason = muon_core.auto_ns_dtype(facts)
    assert dtype == expected and reason
    assert muon_core.resolve_dtype("auto", np, facts=facts) == np.float32  # numpy: no bf16


def test_host_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert muon_core.host_cpu_flags(str(x86)) == {"fpu", "avx2", "avx512_bf16"}
    assert muon_core.host_cpu_flags(str(arm)) == {"fp", "asimd", "bf16"}
    assert muon_core.host_cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_describe_ns_dtype_names_the_choice_and_its_reason():
    facts = muon_core.DeviceFacts("cuda", cuda_capability=(7, 0))
    assert muon_core.describe_ns_dtype("auto", facts) == \
        "Newton-Schulz in float32 (ns_dtype='auto': CUDA compute capability 7.0 < 8.0)"
    assert muon_core.describe_ns_dtype("bfloat16", facts) == "Newton-Schulz in bfloat16"


@pytest.mark.parametrize(("dtype", "facts", "iteration"), [
    ("auto", muon_core.DeviceFacts("cuda", cuda_capability=(9, 0)), "standard"),
    ("auto", muon_core.DeviceFacts("cpu", cpu_capability="AVX2"), "gram"),
    ("bfloat16", None, "standard"),
    ("float32", None, "gram")])
def test_auto_algorithm_is_gram_unless_newton_schulz_runs_in_bfloat16(dtype, facts, iteration):
    line = muon_core.describe_ns_dtype(dtype, facts, "auto")
    assert line.endswith(f", {iteration} iteration (ns_algorithm='auto')"), line
    auto = ns_schedule("keller", 5, "auto")
    assert muon_core._ns.uses_gram(auto, 8, 32, bfloat16=iteration == "standard") is (
        iteration == "gram")


@pytest.mark.parametrize("shape", [(6, 20), (20, 6), (2, 8, 12), (9, 9), (8, 11)])
@pytest.mark.parametrize("coefficients", ["keller", "polar_express", "quintic"])
def test_gram_newton_schulz_is_the_same_polynomial_in_float64(shape, coefficients):
    g = np.random.default_rng(11).standard_normal(shape)
    gram = orthogonalize(g, coefficients=coefficients, algorithm="gram")
    np.testing.assert_allclose(gram, orthogonalize(g, coefficients=coefficients), atol=1e-12)


def test_gram_applies_only_to_rectangular_enough_blocks():
    schedule = ns_schedule("keller", 5, "gram")
    assert muon_core._ns.uses_gram(schedule, 8, 12) and muon_core._ns.uses_gram(schedule, 12, 8)
    assert not muon_core._ns.uses_gram(schedule, 8, 11)
    assert not muon_core._ns.uses_gram(ns_schedule("keller", 5), 8, 32)
    with pytest.raises(ValueError, match=r"ns_algorithm='fast' is invalid: expected one of"):
        ns_schedule("keller", 5, "fast")
    with pytest.raises(ValueError, match=r"ns_algorithm='fast' is invalid"):
        muon_core.MuonConfig(ns_algorithm="fast")
