"""The checks: each drives an adapter and compares it with the float64 reference or the float64
golden facts, raising `ConformanceFailure` with the check, case, parameter, shape, dtype,
options and error.

A check has cases; `collect` turns them into runnable `CheckCase`s with stable ids
`check[case]`, which known failures may name (or just `check` for all of its cases).
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from muon_core import (TP_MODES, MuonConfig, QKRule, Rule, assign_owners,
                       blockwise_reference_step, chunk_sizes, max_logits, orthogonalize, plan,
                       reference_step)
from muon_core import qk_clip as reference_qk_clip
from muon_conformance.adapter import (
    BF16, CAPABILITIES, DISTRIBUTED, FLOAT64, LEGACY_STATE, LR_SCHEDULE, OWNERS, PARAM_GROUPS,
    PORTABLE, QK_CLIP, QK_MAX, TENSOR_PARALLEL, unknown_capabilities,
)
from muon_conformance.oracle import (
    NUMPY_DTYPES, STANDARD_RULES, STANDARD_SHAPES, TIERS, ConformanceFailure, Tolerance,
    base_config, cast, compare, describe_options, make_grads, make_params, read_reference_state,
    reference_groups, reference_trajectory, write_reference_checkpoint,
)

TRAJECTORY_STEPS = 20
TIER_NEEDS = {"float32": frozenset(), "bfloat16": frozenset({BF16}),
              "float64": frozenset({FLOAT64})}


@dataclasses.dataclass(frozen=True)
class Case:
    """One parametrisation of a check: a value for the check, the config and dtype tier it
    runs in, and the capabilities it needs beyond the tier's."""

    name: str
    value: Any = None
    config: MuonConfig | None = None
    tier: str = "float32"
    needs: frozenset[str] = frozenset()
    slow: bool = False
    tol_scale: float = 1.0

    @property
    def run_config(self) -> MuonConfig:
        """The config the case runs with (default: the suite's base config), in its tier."""
        return (self.config or base_config()).replace(ns_dtype=self.tier)

    @property
    def all_needs(self) -> frozenset[str]:
        """Capabilities needed: the case's own and its tier's."""
        return self.needs | TIER_NEEDS[self.tier]


@dataclasses.dataclass(frozen=True)
class Check:
    """A named property of a backend, verified by `func(adapter, case, where)`."""

    name: str
    func: Callable[..., None]
    cases: tuple[Case, ...]

    @property
    def summary(self) -> str:
        """The first paragraph of the check's docstring, on one line."""
        return " ".join((self.func.__doc__ or "").strip().split("\n\n")[0].split())


@dataclasses.dataclass(frozen=True)
class CheckCase:
    """A runnable case: call it to verify; `skip` or `known_failure` give reasons when set."""

    check: str
    case: str
    run: Callable[[], None]
    slow: bool = False
    skip: str | None = None
    known_failure: str | None = None

    @property
    def id(self) -> str:
        """`check[case]`, the name known failures and pytest ids use."""
        return f"{self.check}[{self.case}]"

    def __call__(self) -> None:
        self.run()


CHECKS: dict[str, Check] = {}


def _register(name: str, cases: Iterable[Case]) -> Callable:
    def decorate(func: Callable) -> Callable:
        CHECKS[name] = Check(name, func, tuple(cases))
        return func
    return decorate


@dataclasses.dataclass(frozen=True)
class Where:
    """Names a failure: check, case, parameter, shape, dtype and options."""

    check: str
    case: str
    tier: str
    config: MuonConfig
    tol_scale: float = 1.0

    @property
    def tol(self) -> Tolerance:
        """The tier's tolerance, widened by the case's `tol_scale`."""
        tol = TIERS[self.tier]
        return dataclasses.replace(tol, rtol=tol.rtol * self.tol_scale)

    def at(self, name: str, shape: Sequence[int], what: str) -> str:
        """Failure location text for parameter `name`."""
        shape_text = "x".join(map(str, shape)) or "scalar"
        dtype = np.dtype(NUMPY_DTYPES[self.tier]).name
        return (f"check {self.check}[{self.case}]: parameter {name!r} (shape {shape_text}, "
                f"{dtype}; options: {describe_options(self.config)}), {what}")


# -- driving an adapter -----------------------------------------------------------------------

def drive(adapter: Any, params: Mapping[str, np.ndarray], grads: Sequence[Mapping[str, Any]],
          config: MuonConfig, handle: Any = None) -> tuple[list[dict[str, np.ndarray]], Any]:
    """Run `grads` through the adapter (from a fresh handle unless given); return the
    parameters after each step and the final handle."""
    handle = adapter.make(params, config) if handle is None else handle
    history = []
    for grad in grads:
        handle = adapter.step(handle, grad)
        history.append(adapter.params(handle))
    return history, handle


def seeded_inputs(tier: str, steps: int, shapes: Mapping[str, Sequence[int]] = STANDARD_SHAPES,
                  seed: int = 0) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Seeded parameters and `steps` gradients in the tier's numpy dtype."""
    dtype = NUMPY_DTYPES[tier]
    grads = make_grads(shapes, steps, seed + 1)
    return cast(make_params(shapes, seed), dtype), [cast(g, dtype) for g in grads]


def compare_trajectory(actual: Sequence[Mapping[str, np.ndarray]], expected: Sequence[tuple],
                       initial: Mapping[str, np.ndarray], tol: Tolerance, where: Where,
                       first: int = 1) -> None:
    """Compare the adapter's parameters after every step with the reference's (`first`: the
    number of the first step compared, for messages)."""
    for step, (got, (want, _)) in enumerate(zip(actual, expected), start=first):
        for name, value in want.items():
            shape = np.shape(value)
            if name not in got:
                raise ConformanceFailure(where.at(name, shape, f"missing after step {step}"))
            compare(got[name], value, tol=tol, baseline=initial[name],
                    where=where.at(name, shape, f"parameters after step {step}"))


def check_against_reference(adapter: Any, where: Where,
                            shapes: Mapping[str, Sequence[int]] = STANDARD_SHAPES,
                            steps: int = TRAJECTORY_STEPS) -> Any:
    """Run `steps` seeded steps with `where.config` in `where.tier`, compare every step with the
    float64 reference and return the adapter's final handle."""
    params, grads = seeded_inputs(where.tier, steps, shapes)
    expected = reference_trajectory(params, grads, where.config)
    actual, handle = drive(adapter, params, grads, where.config)
    compare_trajectory(actual, expected, params, where.tol, where)
    return handle


def _tiered(cases: Iterable[Case], tiers: Sequence[str] = tuple(TIERS)) -> tuple[Case, ...]:
    return tuple(dataclasses.replace(case, name=f"{case.name}-{tier}", tier=tier)
                 for case in cases for tier in tiers)


# -- Newton-Schulz: golden values and invariants ---------------------------------------------

def ns_config(coefficients: Any = "keller", algorithm: str = "standard") -> MuonConfig:
    """A config whose step from zero parameters leaves exactly minus the orthogonalized gradient:
    no momentum, lr 1, no decay, no LR scale."""
    return MuonConfig(lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False,
                      lr_scaling="none", ns_coefficients=coefficients, ns_algorithm=algorithm)


def orthogonalized(adapter: Any, grads: Mapping[str, np.ndarray],
                   where: Where) -> dict[str, np.ndarray]:
    """The backend's Newton-Schulz output for each gradient, read off one optimizer step with
    `where.config` (an `ns_config`)."""
    dtype = NUMPY_DTYPES[where.tier]
    zeros = {name: np.zeros(np.shape(g), dtype) for name, g in grads.items()}
    history, _ = drive(adapter, zeros, [cast(grads, dtype)], where.config)
    return {name: -np.asarray(p, np.float64) for name, p in history[0].items()}


# The facts have six significant digits. bfloat16 Newton-Schulz on these tiny matrices is far
# off: torch's bf16 matmuls gave 0.875 for f(0.5) = 0.765 and 1.078 for 1.119 (diag(3, 4)).
GOLDEN_ATOL = {"float64": 1e-6, "float32": 2e-5, "bfloat16": 0.15}
# docs/algorithm.md, reference values (float64): (coefficients, input, kind, expected).
GOLDEN = {
    "keller_diag34": ("keller", np.diag([3.0, 4.0]), "singular_values", [1.119204, 0.722876]),
    "quintic_diag34": ("quintic", np.diag([3.0, 4.0]), "singular_values", [1.018629, 1.005632]),
    "keller_2x3": ("keller", np.array([[1.0, 2, 3], [4, 5, 6]]), "values",
                   [[-0.56829, 0.057742, 0.683774], [0.563355, 0.405613, 0.247871]]),
}
# "keller" maps a normalized singular value s to these after 5 steps; diag(s, sqrt(1 - s^2))
# has Frobenius norm 1, so its first diagonal entry comes out as f(s).
KELLER_MAP = {1e-3: 0.470544, 1e-2: 0.698917, 0.1: 0.712120, 0.5: 0.765439, 1.0: 0.696436}


GOLDEN_CASES = [Case(name, name, ns_config(spec[0])) for name, spec in GOLDEN.items()]


@_register("ns_golden", _tiered([*GOLDEN_CASES, Case("keller_singular_map", None, ns_config())]))
def check_ns_golden(adapter: Any, name: str | None, where: Where) -> None:
    """Newton-Schulz reproduces the float64 golden values of docs/algorithm.md."""
    tol = Tolerance(where.tier, rtol=0.0, atol=GOLDEN_ATOL[where.tier])
    if name is None:
        grads = {f"m{i}.weight": np.diag([s, math.sqrt(1 - s * s)])
                 for i, s in enumerate(KELLER_MAP)}
        out = orthogonalized(adapter, grads, where)
        got = [out[f"m{i}.weight"][0, 0] for i in range(len(KELLER_MAP))]
        compare(got, list(KELLER_MAP.values()), tol=tol,
                where=where.at("m*.weight", (2, 2), f"f(s) for s in {list(KELLER_MAP)}"))
        return
    coefficients, matrix, kind, expected = GOLDEN[name]
    out = orthogonalized(adapter, {"m.weight": matrix}, where)["m.weight"]
    got = np.linalg.svd(out, compute_uv=False) if kind == "singular_values" else out
    compare(got, expected, tol=tol, where=where.at("m.weight", matrix.shape,
                                                   f"{kind} of NS({coefficients!r})"))


def _invariant_transpose(adapter: Any, where: Where) -> None:
    g = make_params({"g": (24, 8)}, seed=3)["g"]
    out = orthogonalized(adapter, {"tall.weight": g, "wide.weight": g.T}, where)
    compare(out["tall.weight"], out["wide.weight"].T, tol=where.tol,
            where=where.at("tall.weight", g.shape, "NS(G) vs NS(G^T)^T"))


# 1e30: the entries' squares (1e60) lie beyond float32's and bfloat16's range (3.4e38), so the
# Frobenius norm must be taken on scaled entries.
SCALES = {"b.weight": 100, "c.weight": 0.01, "d.weight": 1e30}


def _invariant_scale(adapter: Any, where: Where) -> None:
    g = make_params({"g": (12, 20)}, seed=4)["g"]
    out = orthogonalized(adapter, {"a.weight": g} | {name: factor * g
                                                     for name, factor in SCALES.items()}, where)
    for name, factor in SCALES.items():
        compare(out[name], out["a.weight"], tol=where.tol,
                where=where.at(name, g.shape, f"NS({factor}*G) vs NS(G)"))


def _invariant_zeros(adapter: Any, where: Where) -> None:
    g = make_params({"g": (10, 16)}, seed=5)["g"]
    g[[2, 7]] = 0.0
    out = orthogonalized(adapter, {"rows.weight": g, "zero.weight": np.zeros((6, 9))}, where)
    for name, mask in (("rows.weight", np.isin(np.arange(10), [2, 7])[:, None]),
                       ("zero.weight", np.ones((6, 9), bool))):
        values = out[name][np.broadcast_to(mask, out[name].shape)]
        if not np.all(values == 0.0):
            raise ConformanceFailure(where.at(name, out[name].shape, "zero rows of the gradient "
                                     f"must stay exactly zero (no NaN), got {values[:4]}"))


def _invariant_singular_range(adapter: Any, where: Where) -> None:
    g = make_params({"g": (16, 32)}, seed=6)["g"]
    values = np.linalg.svd(orthogonalized(adapter, {"m.weight": g}, where)["m.weight"],
                           compute_uv=False)
    # Reference values (docs/algorithm.md): "keller" lands normalized singular values above
    # 0.01 in about [0.68, 1.2] (bfloat16: [0.65, 1.22]); this matrix's smallest is 0.07.
    if values.min() < 0.65 or values.max() > 1.22:
        raise ConformanceFailure(where.at("m.weight", g.shape, "singular values of NS(G) span "
                                 f"[{values.min():.4f}, {values.max():.4f}], expected within "
                                 "[0.65, 1.22]"))


NS_INVARIANTS = {"transpose": _invariant_transpose, "scale": _invariant_scale,
                 "zeros": _invariant_zeros, "singular_range": _invariant_singular_range}


@_register("ns_invariants", _tiered([Case(n, n, ns_config()) for n in NS_INVARIANTS]))
def check_ns_invariants(adapter: Any, name: str, where: Where) -> None:
    """NS(G^T) = NS(G)^T, NS(cG) = NS(G), zero rows stay zero, NS(0) = 0, singular values
    land in keller's band."""
    NS_INVARIANTS[name](adapter, where)


# Blocks of every orientation and aspect around the Gram threshold (1.5): wide, tall, square,
# batched, and one just below the threshold that stays on the standard iteration.
ALGORITHM_SHAPES = {"wide.weight": (8, 32), "tall.weight": (30, 12), "square.weight": (10, 10),
                    "edge.weight": (12, 18), "below.weight": (12, 17)}


@_register("ns_algorithms", _tiered([
    Case(f"{algorithm}-{coefficients}", (algorithm, coefficients),
         ns_config(coefficients, algorithm))
    for algorithm in ("gram",) for coefficients in ("keller", "polar_express")]))
def check_ns_algorithms(adapter: Any, value: tuple[str, str], where: Where) -> None:
    """Each Newton-Schulz algorithm matches the core's float64 reference of that algorithm, which
    itself matches the standard iteration (the same polynomial, computed differently)."""
    algorithm, coefficients = value
    grads = make_params(ALGORITHM_SHAPES, seed=8)
    out = orthogonalized(adapter, grads, where)
    for name, g in grads.items():
        reference = orthogonalize(g, coefficients=coefficients, algorithm=algorithm)
        standard = orthogonalize(g, coefficients=coefficients)
        compare(reference, standard, tol=TIERS["float64"],
                where=where.at(name, g.shape, f"float64 {algorithm} vs standard reference"))
        compare(out[name], reference, tol=where.tol,
                where=where.at(name, g.shape, f"NS({coefficients!r}, {algorithm}) vs float64"))


# -- every option over many steps ------------------------------------------------------------

OPTIONS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "sum_momentum": {"momentum_kind": "sum"},
    "no_nesterov": {"nesterov": False},
    "sum_no_nesterov": {"momentum_kind": "sum", "nesterov": False, "momentum": 0.9},
    "quintic": {"ns_coefficients": "quintic"},
    "polar_express": {"ns_coefficients": "polar_express", "ns_steps": 7},
    "polar_express_raw": {"ns_coefficients": "polar_express_raw"},
    "custom_tuple": {"ns_coefficients": (3.0, -3.2, 1.2), "ns_steps": 6},
    "custom_schedule": {"ns_coefficients": [(4.0, -6.0, 2.5), (3.0, -3.2, 1.2)], "ns_steps": 4},
    "match_rms_adamw": {"lr_scaling": "match_rms_adamw", "lr": 0.005},
    "spectral": {"lr_scaling": "spectral"},
    "no_lr_scaling": {"lr_scaling": "none"},
    "no_weight_decay": {"weight_decay": 0.0},
    "strong_weight_decay": {"weight_decay": 1.5},
    "adamw_options": {"adamw": {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6,
                                "weight_decay": 0.0}},
    "no_qkv_split": {"split_qkv": False},
    "eps": {"eps": 1e-3},
    "gram": {"ns_algorithm": "gram"},
    "gram_polar_express": {"ns_algorithm": "gram", "ns_coefficients": "polar_express"},
}


# The raw Polar Express schedule starts with a = 8.29, which amplifies round-off: measured
# 1.7e-4 in float32 (numpy) where the other options stay below 5e-5; in bfloat16 it diverges,
# which is why the safe variant exists.
TRAJECTORY_TOL_SCALES = {"polar_express_raw": 5.0}


@_register("trajectory", [Case(name, None, base_config(**changes),
                               tol_scale=TRAJECTORY_TOL_SCALES.get(name, 1.0))
                          for name, changes in OPTIONS.items()])
def check_trajectory(adapter: Any, _: Any, where: Where) -> None:
    """Each config option follows the float64 reference for 20 steps on tall, wide, square,
    batched, conv, fused-QKV, GQA, 1-D, scalar, embedding and head parameters (float32)."""
    check_against_reference(adapter, where)


@_register("precision", [Case("bfloat16", tier="bfloat16"), Case("float64", tier="float64"),
                         Case("bfloat16-gram", None, base_config(**OPTIONS["gram"]), "bfloat16"),
                         Case("float64-sum_no_nesterov", None,
                              base_config(**OPTIONS["sum_no_nesterov"]), "float64")])
def check_precision(adapter: Any, _: Any, where: Where) -> None:
    """The dtype tiers over 20 steps: bfloat16 Newton-Schulz within 1.2e-1 of the float64
    reference, float64 within 1e-10."""
    check_against_reference(adapter, where)


# bfloat16 parameters and gradients (numpy carries them through ml_dtypes). Measured one step
# from zero parameters, Gaussian bfloat16 gradients on the standard shapes, seeds 0-2, against
# float64 Newton-Schulz of the same gradients: the update's norm is off by at most 0.74%
# (torch) and 1.13% (JAX, the 8x36 conv), its direction (relative error of the update) by
# 1.1-2.2% (torch) and 1.4-2.9% (JAX). A 2.5% error in the learning rate fails the norm check.
BF16_NORM_RTOL = 1.5e-2
BF16_DIRECTION_RTOL = 4e-2


def bfloat16_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies of `arrays` in bfloat16 (ml_dtypes' numpy dtype)."""
    import ml_dtypes

    return cast(arrays, ml_dtypes.bfloat16)


def compare_update_norm(actual: np.ndarray, expected: np.ndarray, where: str) -> None:
    """The update's norm within `BF16_NORM_RTOL` of the reference's and its direction within
    `BF16_DIRECTION_RTOL` (relative error of the whole update)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    reference = float(np.linalg.norm(expected))
    if not np.all(np.isfinite(actual)):
        raise ConformanceFailure(f"{where}: non-finite values, expected finite ones")
    norm_error = abs(float(np.linalg.norm(actual)) / reference - 1.0)
    direction_error = float(np.linalg.norm(actual - expected)) / reference
    if norm_error > BF16_NORM_RTOL or direction_error > BF16_DIRECTION_RTOL:
        raise ConformanceFailure(
            f"{where}: update norm off by {norm_error:.3%} (allowed {BF16_NORM_RTOL:.1%}), "
            f"direction by {direction_error:.3%} (allowed {BF16_DIRECTION_RTOL:.1%}) from the "
            "float64 reference")


@_register("bf16_params", [Case("update_norm", None, base_config(ns_dtype="bfloat16"),
                                tier="bfloat16")])
def check_bf16_params(adapter: Any, _: Any, where: Where) -> None:
    """bfloat16 parameters and gradients: one step from zero parameters on Gaussian gradients,
    each parameter's update norm within 1.5% of the float64 reference's, its direction within
    4%, and the parameters stay bfloat16."""
    shapes = STANDARD_SHAPES
    rng = np.random.default_rng(0)
    grads = bfloat16_arrays({n: rng.standard_normal(s) for n, s in shapes.items()})
    zeros = bfloat16_arrays({n: np.zeros(s) for n, s in shapes.items()})
    expected = reference_trajectory(zeros, [grads], where.config)[0][0]
    actual = drive(adapter, zeros, [grads], where.config)[0][0]
    for name, want in expected.items():
        got = actual[name]
        if np.asarray(got).dtype.name != "bfloat16":
            raise ConformanceFailure(where.at(name, np.shape(want), f"parameter dtype "
                                              f"{np.asarray(got).dtype}, expected bfloat16"))
        compare_update_norm(got, want, where.at(name, np.shape(want), "the first update"))


def _random_shape_case(draw: Any) -> tuple[dict, MuonConfig]:
    from hypothesis import strategies as st

    rows, cols = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["matrix", "conv", "batched"]))
    shape = {"matrix": (rows, cols), "conv": (rows, max(1, cols // 9), 3, 3),
             "batched": (draw(st.integers(1, 4)), rows, cols)}[kind]
    config = base_config(
        rules=(Rule(match="batched.*", out_axes=(1,), in_axes=(2,)),),
        momentum_kind=draw(st.sampled_from(["ema", "sum"])), nesterov=draw(st.booleans()),
        ns_coefficients=draw(st.sampled_from(["keller", "quintic", "polar_express"])),
        lr_scaling=draw(st.sampled_from(["original", "match_rms_adamw", "spectral", "none"])),
        weight_decay=draw(st.sampled_from([0.0, 0.1])))
    return {f"{kind}.weight": shape, f"{kind}.bias": (shape[0],)}, config


@_register("random_shapes", [Case("quick", 10), Case("many", 200, slow=True)])
def check_random_shapes(adapter: Any, examples: int, where: Where) -> None:
    """Hypothesis-drawn shapes (1 to 40 rows and columns, conv, batched) and options follow
    the float64 reference for 3 steps (float32)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    # No shrinking: each example may compile a new program (JAX), and the failure message
    # already names the drawn shape and options.
    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data: Any) -> None:
        shapes, config = _random_shape_case(data.draw)
        check_against_reference(adapter, dataclasses.replace(where, config=config), shapes,
                                steps=3)

    run()


# -- routing, state, resume --------------------------------------------------------------------

ROUTING_RULES = (Rule(match="square.*", algorithm="adamw"),
                 Rule(match="embed.*", algorithm="muon"),
                 Rule(match="lm_head.*", algorithm="muon"))
EXPECTED_KEYS = {"muon": {"momentum_buffer"}, "adamw": {"step", "exp_avg", "exp_avg_sq"}}


@_register("routing", [Case("defaults"),
                       Case("rules", None, base_config(rules=STANDARD_RULES + ROUTING_RULES))])
def check_routing(adapter: Any, _: Any, where: Where) -> None:
    """Every parameter gets the algorithm the core's plan gives it (seen in the state's keys),
    with the reference's values after 3 steps."""
    state = adapter.state(check_against_reference(adapter, where, steps=3))
    for entry in plan(STANDARD_SHAPES, where.config):
        keys = set(state.get(entry.name, {}))
        if keys != EXPECTED_KEYS[entry.algorithm]:
            raise ConformanceFailure(where.at(
                entry.name, entry.shape, f"the plan routes it to {entry.algorithm} "
                f"({entry.decided_by}: {entry.why}), expected state keys "
                f"{sorted(EXPECTED_KEYS[entry.algorithm])}, got {sorted(keys)}"))


def compare_state(got: Mapping[str, Mapping], want: Mapping[str, Mapping], tol: Tolerance,
                  where: Where, what: str) -> None:
    """Compare states in the reference's format: step counts exactly, buffers within `tol`."""
    for name, entry in want.items():
        shape = np.shape(entry.get("momentum_buffer", entry.get("exp_avg")))
        for key, value in entry.items():
            if key not in got.get(name, {}):
                raise ConformanceFailure(where.at(name, shape, f"{what}: state has no {key!r}"))
            actual = got[name][key]
            if key != "step":
                compare(actual, value, tol=tol, where=where.at(name, shape, f"{what}: {key}"))
            elif int(actual) != value:
                raise ConformanceFailure(where.at(name, shape, f"{what}: step count "
                                                  f"{int(actual)}, expected {value}"))


STATE_CASES = [Case(name, None, base_config(**OPTIONS[name]))
               for name in ("defaults", "sum_no_nesterov", "adamw_options")]


@_register("state", STATE_CASES)
def check_state(adapter: Any, _: Any, where: Where) -> None:
    """After 20 steps the state (momentum buffers, AdamW moments, step counts) matches the
    reference's."""
    params, grads = seeded_inputs(where.tier, TRAJECTORY_STEPS)
    expected = reference_trajectory(params, grads, where.config)[-1][1]
    _, handle = drive(adapter, params, grads, where.config)
    compare_state(adapter.state(handle), expected, where.tol, where,
                  f"state after {TRAJECTORY_STEPS} steps")


def assert_identical(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray],
                     where: Where, what: str) -> None:
    """Raise unless every array in `got` equals the one in `want` bit for bit."""
    for name, value in want.items():
        actual = np.asarray(got.get(name))
        if actual.shape != np.shape(value):
            raise ConformanceFailure(where.at(name, np.shape(value), f"{what}: shape "
                                              f"{actual.shape}, expected {np.shape(value)}"))
        if not np.array_equal(actual, value):
            diff = np.max(np.abs(actual.astype(np.float64) - value))
            raise ConformanceFailure(where.at(name, np.shape(value), f"{what}: differs by "
                                              f"{diff:.3g} (max abs), expected bitwise equality"))


@_register("resume", STATE_CASES)
def check_resume(adapter: Any, _: Any, where: Where) -> None:
    """Saving after 4 steps, pickling, restoring and running 4 more steps gives exactly the
    uninterrupted run (and the snapshot is unaffected by the later steps)."""
    resume_exactly(adapter, where, adapter.save)


def resume_exactly(adapter: Any, where: Where, save: Callable[[Any], Any]) -> None:
    """Snapshot with `save` after 4 steps, pickle, `restore`, run 4 more steps: raise unless
    that is bit for bit the uninterrupted run."""
    params, grads = seeded_inputs(where.tier, 8)
    first, handle = drive(adapter, params, grads[:4], where.config)
    saved = save(handle)
    straight, _ = drive(adapter, params, grads[4:], where.config, handle)
    restored = adapter.restore(first[-1], where.config, pickle.loads(pickle.dumps(saved)))
    resumed, _ = drive(adapter, params, grads[4:], where.config, restored)
    for step, (got, want) in enumerate(zip(resumed, straight), start=5):
        assert_identical(got, want, where, f"resumed run vs uninterrupted run after step {step}")


@_register("legacy_resume", [Case("defaults", needs=frozenset({LEGACY_STATE}))])
def check_legacy_resume(adapter: Any, _: Any, where: Where) -> None:
    """A snapshot in the backend's older format (`save_legacy`, e.g. AdamW step counts as
    plain numbers) restores and continues bit for bit as the uninterrupted run."""
    resume_exactly(adapter, where, adapter.save_legacy)


# -- bad inputs -------------------------------------------------------------------------------

def _expect_error(action: Callable[[], Any], errors: tuple[type, ...], name: str, shape: Any,
                  where: Where, what: str) -> None:
    try:
        action()
    except errors as exc:
        if name not in str(exc):
            raise ConformanceFailure(where.at(name, shape, f"{what}: the error must name the "
                                              f"parameter, got {type(exc).__name__}: {exc}"))
        return
    except Exception as exc:  # noqa: BLE001 - any other error is a conformance failure
        raise ConformanceFailure(where.at(name, shape, f"{what}: expected one of "
                                          f"{[e.__name__ for e in errors]}, got "
                                          f"{type(exc).__name__}: {exc}")) from exc
    raise ConformanceFailure(where.at(name, shape, f"{what}: expected an error, none raised"))


def _bad_gradients(kind: str, grads: Mapping[str, np.ndarray]) -> tuple[dict, str]:
    """Gradients with one defect, and the parameter an error must name."""
    grads = {name: g.copy() for name, g in grads.items()}
    if kind == "wrong_shape":
        grads["tall.weight"] = np.ascontiguousarray(grads["tall.weight"].T)
        return grads, "tall.weight"
    grads["square.weight"][3, 5] = np.nan
    grads["tall.bias"][0] = np.inf
    return grads, "square.weight"


# kind -> (nonfinite policy, errors accepted; none: the step must be skipped)
BAD_INPUTS = {"wrong_shape": ("raise", (ValueError, TypeError, RuntimeError)),
              "nonfinite_raise": ("raise", (FloatingPointError,)),
              "nonfinite_skip": ("skip", ())}


@_register("bad_inputs", [Case(kind, kind, base_config(nonfinite=policy))
                          for kind, (policy, _) in BAD_INPUTS.items()])
def check_bad_inputs(adapter: Any, kind: str, where: Where) -> None:
    """A gradient of the wrong shape or with NaN/Inf raises an error naming the parameter
    (with nonfinite="skip": is skipped) and changes nothing: the next good step still matches
    the reference's first step."""
    params, grads = seeded_inputs(where.tier, 1)
    bad, name = _bad_gradients(kind, grads[0])
    errors = BAD_INPUTS[kind][1]
    handle = adapter.make(params, where.config)
    if errors:
        _expect_error(lambda: adapter.step(handle, bad), errors, name, params[name].shape,
                      where, f"a step with a {kind.replace('_', ' ')} gradient")
    else:
        handle = adapter.step(handle, bad)
    assert_identical(adapter.params(handle), params, where, f"parameters after the {kind} step")
    history, _ = drive(adapter, params, grads, where.config, handle)
    compare_trajectory(history, reference_trajectory(params, grads, where.config), params,
                       where.tol, where)


@_register("inputs_unchanged", [Case("defaults")])
def check_inputs_unchanged(adapter: Any, _: Any, where: Where) -> None:
    """The arrays given to `make` and `step` are never modified."""
    params, grads = seeded_inputs(where.tier, 3)
    kept_params, kept_grads = seeded_inputs(where.tier, 3)
    drive(adapter, params, grads, where.config)
    assert_identical(params, kept_params, where, "parameters given to make()")
    for step, (grad, kept) in enumerate(zip(grads, kept_grads), start=1):
        assert_identical(grad, kept, where, f"gradients given to step() at step {step}")


@_register("distributed", [Case(name, 2, base_config(**OPTIONS[name]),
                                needs=frozenset({DISTRIBUTED}), slow=slow)
                           for name, slow in (("defaults", False), ("sum_no_nesterov", True))]
           + [Case("normuon", 2, base_config(second_moment="normuon"),
                   needs=frozenset({DISTRIBUTED}))])
def check_distributed(adapter: Any, world_size: int, where: Where) -> None:
    """`run_distributed` on 2 workers, in each mode the adapter lists in `distributed_modes`
    (or its only one), ends where the single-process reference does after 5 steps (float32)."""
    params, grads = seeded_inputs(where.tier, 5)
    expected = reference_trajectory(params, grads, where.config)[-1:]
    for mode in getattr(adapter, "distributed_modes", (None,)):
        final = adapter.run_distributed(params, where.config, grads, world_size,
                                        **({} if mode is None else {"mode": mode}))
        named = dataclasses.replace(where, case=f"{where.case}, {world_size} workers"
                                    + ("" if mode is None else f", mode {mode!r}"))
        compare_trajectory([final], expected, params, where.tol, named, first=len(grads))


# -- tensor parallelism -----------------------------------------------------------------------

# A small tensor-parallel layer stack in torch layout, and the axis 2 ranks cut each of its
# cut parameters along (the rest stay whole on every rank). With float32's default
# `ns_algorithm="auto"`, "distributed" takes the Gram form on the first two and the standard
# iteration on the next two.
TP_SHAPES = {"mlp.up.weight": (40, 16), "mlp.down.weight": (16, 40), "attn.o.weight": (20, 24),
             "odd.weight": (27, 20), "short.weight": (12, 30), "attn.qkv.weight": (60, 20),
             "mlp.up.bias": (40,), "norm.weight": (16,), "embed.weight": (30, 16)}
TP_CUTS = {"mlp.up.weight": 0,      # column-parallel: rows cut, its longer axis
           "mlp.down.weight": 1,    # row-parallel: columns cut, its longer axis
           "attn.o.weight": 1,      # row-parallel
           "odd.weight": 0,         # uneven pieces: 14 + 13 rows
           "short.weight": 0,       # cut along its shorter axis: "distributed" gathers it
           "attn.qkv.weight": 0,    # fused QKV (three blocks), no plain matrix: gathered
           "mlp.up.bias": 0}        # AdamW, updated piece by piece
# Blockwise Muon defines the step of cut plain matrices only: whole in the "blockwise" case.
TP_WHOLE_IN_BLOCKWISE = ("attn.qkv.weight",)
TP_STEPS = 3
# The last piece of these matrices' gradients is scaled by a power of two, so that the pieces'
# largest entries lie in different binades: a rank that pre-scaled its piece by its own power
# of two instead of the agreed one would change the matrix. The other matrices' pieces keep
# equal magnitudes, where a norm reduced by a maximum instead of a sum would be off by sqrt(2).
TP_UNEQUAL_PIECES = ("mlp.up.weight", "attn.o.weight")
TP_PIECE_SCALE = 2.0**10


def _unequal_pieces(grads: Sequence[Mapping[str, np.ndarray]], world_size: int
                    ) -> list[dict[str, np.ndarray]]:
    """Copies of `grads` with the last of the `world_size` pieces (`chunk_sizes` along its axis
    in `TP_CUTS`) of each parameter in `TP_UNEQUAL_PIECES` multiplied by `TP_PIECE_SCALE`."""
    out = []
    for grad in grads:
        grad = {name: np.array(g) for name, g in grad.items()}
        for name in TP_UNEQUAL_PIECES:
            axis = TP_CUTS[name]
            start = sum(chunk_sizes(grad[name].shape[axis], world_size)[:-1])
            np.moveaxis(grad[name], axis, 0)[start:] *= TP_PIECE_SCALE
        out.append(grad)
    return out


def _tp_run(config: MuonConfig, world_size: int) -> tuple[dict[str, int], Callable[..., tuple]]:
    """The cuts of `TP_CUTS` that `config.tp_mode` steps, and the float64 step it must match:
    `reference_step`, or blockwise Muon's (`muon_core.blockwise_reference_step`)."""
    if config.tp_mode != "blockwise":
        return dict(TP_CUTS), reference_step
    cuts = {name: axis for name, axis in TP_CUTS.items() if name not in TP_WHOLE_IN_BLOCKWISE}
    muon = {entry.name for entry in plan(TP_SHAPES, config) if entry.is_muon}
    return cuts, partial(blockwise_reference_step, cuts={
        name: (axis, world_size) for name, axis in cuts.items() if name in muon})


def _tp_defined(config: MuonConfig, mode: str) -> bool:
    """Blockwise Muon has no second moment and no cautious decay (`blockwise_reference_step`)."""
    adaptive = config.second_moment != "none" or config.cautious_weight_decay
    return not (mode == "blockwise" and adaptive)


@_register("tensor_parallel", [
    Case("defaults", 2, needs=frozenset({TENSOR_PARALLEL})),
    Case("normuon_cautious", 2, base_config(second_moment="normuon", cautious_weight_decay=True),
         needs=frozenset({TENSOR_PARALLEL}))])
def check_tensor_parallel(adapter: Any, world_size: int, where: Where) -> None:
    """`run_tensor_parallel` on 2 ranks, the matrices of a small layer stack cut along rows or
    columns (evenly and not, along the longer and the shorter axis), ends after 3 steps where
    the float64 reference does with `tp_mode` "duplicated" and "distributed", and where blockwise
    Muon's (`muon_core.blockwise_reference_step`) does with "blockwise" (float32, not with a
    second moment or cautious decay, which blockwise Muon does not define); an adapter
    supporting only some modes lists them in `tp_modes`."""
    modes = [mode for mode in getattr(adapter, "tp_modes", TP_MODES)
             if _tp_defined(where.config, mode)]
    if not modes:  # only "blockwise" listed: nothing this config defines to compare
        return
    configs = [where.config.replace(tp_mode=mode) for mode in modes]
    cuts, steps = zip(*(_tp_run(config, world_size) for config in configs))
    params, grads = seeded_inputs(where.tier, TP_STEPS, TP_SHAPES)
    grads = _unequal_pieces(grads, world_size)
    finals = adapter.run_tensor_parallel(params, grads, world_size, list(zip(configs, cuts)))
    for config, step, final in zip(configs, steps, finals):
        expected = reference_trajectory(params, grads, config, step)[-1:]
        named = dataclasses.replace(where, config=config,
                                    case=f"{where.case}, {world_size} ranks, {config.tp_mode}")
        compare_trajectory([final], expected, params, where.tol, named, first=TP_STEPS)


# -- QK-clip ----------------------------------------------------------------------------------

# case -> (shapes in torch layout, routing rules, QK-clip rules, per-head logits of layer "attn")
QK_CLIP_CASES = {
    "separate": ({"attn.q_proj.weight": (16, 12), "attn.q_proj.bias": (16,),
                  "attn.k_proj.weight": (16, 12), "attn.k_proj.bias": (16,),
                  "attn.v_proj.weight": (16, 12)}, (), (), (3.0, 0.5, 1.5, 0.8)),
    "gqa": ({"attn.wq.weight": (16, 12), "attn.wk.weight": (8, 12)}, (), (),
            (3.0, 0.5, 0.8, 0.9)),
    "fused": ({"attn.qkv.weight": (36, 12)}, (), (), (2.0, 0.7, 4.0)),
    "fused_gqa": ({"attn.qkv.weight": (32, 12)}, (Rule(match="attn.qkv.*", split=(16, 8, 8)),),
                  (), (0.5, 2.5, 4.0, 1.0)),
    "per_head": ({"attn.query.weight": (4, 4, 12), "attn.key.weight": (4, 4, 12)},
                 (Rule(match="*.query.*", out_axes=(0, 1), in_axes=(2,)),
                  Rule(match="*.key.*", out_axes=(1,), in_axes=(2,))), (),
                 (1.2, 0.3, 5.0, 0.9)),
    "mla": ({"attn.q_b.weight": (24, 12), "attn.kv_b.weight": (28, 12),
             "attn.kv_a.weight": (2, 12)}, (),
            (QKRule("*.q_b.*", "query", rope_dim=2), QKRule("*.kv_b.*", "key", value_dim=3),
             QKRule("*.kv_a.*", "none")), (3.0, 0.5, 1.5, 0.8)),
}


@_register("qk_clip", [Case(name, name, base_config(
    rules=rules, qk_clip={"threshold": 1.0, "alpha": 0.5, "rules": qk_rules}),
    needs=frozenset({QK_CLIP})) for name, (_, rules, qk_rules, _) in QK_CLIP_CASES.items()])
def check_qk_clip(adapter: Any, name: str, where: Where) -> None:
    """One step then QK-clip (tau = 1) gives the float64 reference's weights for separate Q/K
    with biases, GQA, fused QKV (equal and GQA blocks), per-head kernels and MLA (float32)."""
    shapes, _, _, logits = QK_CLIP_CASES[name]
    params, grads = seeded_inputs(where.tier, 1, shapes)
    qk_max = {"attn": np.asarray(logits, dtype=NUMPY_DTYPES[where.tier])}
    reference = reference_trajectory(params, grads, where.config)[0][0]
    expected = reference_qk_clip(reference, cast(qk_max, np.float64), where.config)
    handle = adapter.step(adapter.make(params, where.config), grads[0])
    got = adapter.params(adapter.qk_clip(handle, qk_max, where.config))
    for param, value in expected.items():
        compare(got[param], value, tol=where.tol, baseline=params[param],
                where=where.at(param, value.shape, "after one step and QK-clip"))


# -- learning-rate schedules and param groups -------------------------------------------------

# (Muon lr, AdamW lr) per step, as a warm-up then decay schedule sets them; one step has 0.
LR_STEPS = ((0.01, 0.004), (0.03, 0.012), (0.02, 0.01), (0.005, 0.02), (0.0, 0.001),
            (0.04, 0.0))
# The second group holds Muon and AdamW parameters and sets Muon's lr and both decays but not
# AdamW's lr: with a schedule its AdamW parameters follow the scheduled default.
GROUP_NAMES = (("tall.weight", "wide.weight", "experts.weight", "attn.qkv.weight",
                "attn.neox.weight", "attn.gqa.weight", "gate", "embed.weight"),
               ("square.weight", "conv.weight", "tall.bias", "norm.weight", "lm_head.weight"))
GROUP_OVERRIDES = {"lr": 0.05, "weight_decay": 0.0, "adamw": {"weight_decay": 0.3}}
GROUPS = {"own_lrs": ((GROUP_NAMES[0], {}), (GROUP_NAMES[1], {
              **GROUP_OVERRIDES, "adamw": {"lr": 3e-3, "weight_decay": 0.3}})),
          "scheduled": ((GROUP_NAMES[0], {}), (GROUP_NAMES[1], GROUP_OVERRIDES))}


def check_scheduled_run(adapter: Any, where: Where, groups: Sequence[tuple] | None,
                        lrs: Sequence[tuple[float, float]] | None) -> None:
    """Run `len(LR_STEPS)` seeded steps through `make_groups` (or `make_scheduled` without
    groups) and compare each with the float64 reference run per group."""
    params, grads = seeded_inputs(where.tier, len(LR_STEPS))
    if groups is None:
        handle = adapter.make_scheduled(params, where.config, lrs)
    else:
        handle = adapter.make_groups(params, where.config, groups, lrs)
    expected = reference_groups(params, grads, where.config,
                                groups or ((tuple(params), {}),), lrs)
    actual, _ = drive(adapter, params, grads, where.config, handle)
    compare_trajectory(actual, expected, params, where.tol, where)


@_register("lr_schedule", [Case("changing", needs=frozenset({LR_SCHEDULE}))])
def check_lr_schedule(adapter: Any, _: Any, where: Where) -> None:
    """Learning rates changed before every step (`make_scheduled`, both halves, one step at 0)
    give the float64 reference's parameters with each step's rates."""
    check_scheduled_run(adapter, where, None, LR_STEPS)


@_register("param_groups", [Case("own_lrs", "own_lrs", needs=frozenset({PARAM_GROUPS})),
                            Case("scheduled", "scheduled",
                                 needs=frozenset({PARAM_GROUPS, LR_SCHEDULE}))])
def check_param_groups(adapter: Any, name: str, where: Where) -> None:
    """Two param groups with their own learning rates and decays follow the float64 reference
    run on each group with its options; with a schedule, the rates a group does not set follow
    it."""
    check_scheduled_run(adapter, where, GROUPS[name], LR_STEPS if name == "scheduled" else None)


# -- the portable checkpoint ------------------------------------------------------------------

def _bf16_long_run(adapter: Any, where: Where, folder: str) -> None:
    """bfloat16 parameters restored at AdamW step 1001, as after a long run, then 2 steps:
    every step count is 1003 (bfloat16 holds integers exactly only up to 256)."""
    shapes = STANDARD_SHAPES
    params, grads = seeded_inputs("float32", 3)
    state = reference_trajectory(params, grads[:1], where.config)[0][1]
    for entry in state.values():
        if "step" in entry:
            entry["step"] = 1001
    path = f"{folder}/reference.safetensors"
    write_reference_checkpoint(path, shapes, where.config, state)
    bf16 = bfloat16_arrays(params)
    handle = adapter.restore_portable(bf16, where.config, path)
    _, handle = drive(adapter, bf16, [bfloat16_arrays(g) for g in grads[1:]], where.config,
                      handle)
    for name, entry in adapter.state(handle).items():
        if "step" in entry and int(entry["step"]) != 1003:
            raise ConformanceFailure(where.at(name, shapes[name], f"step count "
                                              f"{int(entry['step'])} after restoring 1001 and "
                                              "2 steps, expected 1003"))


@_register("portable_checkpoint", [
    Case("save", "save", needs=frozenset({PORTABLE})),
    Case("load", "load", needs=frozenset({PORTABLE})),
    Case("bf16_long_run", "bf16_long_run", base_config(ns_dtype="bfloat16"), "bfloat16",
         needs=frozenset({PORTABLE}))])
def check_portable_checkpoint(adapter: Any, kind: str, where: Where) -> None:
    """The `muon_core` checkpoint file: written after 4 steps it holds the float64 reference's
    state and restores into a run bit for bit the uninterrupted one (save); the reference's
    state written by `muon_core` restores into a run that follows the reference (load);
    bfloat16 parameters keep exact step counts past 256 (bf16_long_run)."""
    with tempfile.TemporaryDirectory() as folder:
        if kind == "bf16_long_run":
            _bf16_long_run(adapter, where, folder)
        elif kind == "load":
            _portable_load(adapter, where, f"{folder}/ckpt.safetensors")
        else:
            _portable_save(adapter, where, f"{folder}/ckpt.safetensors")


def _portable_load(adapter: Any, where: Where, path: str) -> None:
    """The reference's state after 4 steps, written by muon_core, then 4 adapter steps."""
    params, grads = seeded_inputs(where.tier, 8)
    expected = reference_trajectory(params, grads, where.config)
    write_reference_checkpoint(path, STANDARD_SHAPES, where.config, expected[3][1])
    at_four = cast(expected[3][0], NUMPY_DTYPES[where.tier])
    resumed, _ = drive(adapter, params, grads[4:], where.config,
                       adapter.restore_portable(at_four, where.config, path))
    compare_trajectory(resumed, expected[4:], params, where.tol, where)


def _portable_save(adapter: Any, where: Where, path: str) -> None:
    """4 adapter steps saved: the file holds the reference's state and resumes exactly."""
    params, grads = seeded_inputs(where.tier, 8)
    expected = reference_trajectory(params, grads[:4], where.config)
    first, handle = drive(adapter, params, grads[:4], where.config)
    adapter.save_portable(handle, path)
    compare_state(read_reference_state(path, STANDARD_SHAPES, where.config), expected[3][1],
                  where.tol, where, "portable checkpoint after 4 steps")
    straight, _ = drive(adapter, params, grads[4:], where.config, handle)
    resumed, _ = drive(adapter, params, grads[4:], where.config,
                       adapter.restore_portable(first[-1], where.config, path))
    for step, (got, want) in enumerate(zip(resumed, straight), start=5):
        assert_identical(got, want, where, f"run restored from the portable checkpoint vs "
                         f"uninterrupted run after step {step}")


# -- owners and attention logits --------------------------------------------------------------

@_register("owners", [Case("two_workers", 2, needs=frozenset({OWNERS}))])
def check_owners(adapter: Any, world_size: int, where: Where) -> None:
    """Distributed over 2 workers, each Muon matrix is orthogonalized by the rank
    `muon_core.assign_owners` gives it, and only Muon matrices have an owner."""
    params, _ = seeded_inputs(where.tier, 0)
    expected = dict(assign_owners(plan(STANDARD_SHAPES, where.config), world_size).owner)
    got = dict(adapter.owners(params, where.config, world_size))
    for name in sorted(set(expected) | set(got)):
        if got.get(name) != expected.get(name):
            raise ConformanceFailure(where.at(name, STANDARD_SHAPES[name], f"owner rank "
                                              f"{got.get(name)}, expected {expected.get(name)} "
                                              "(muon_core.assign_owners)"))


# case -> (batch, query heads, key heads, queries, keys, head dim, causal mask, scale); batch
# None: no batch axis, `q` `(heads, queries, dim)` (the leading axes are any number, none too)
QK_MAX_CASES = {"mha": (2, 4, 4, 5, 5, 8, False, None),
                "gqa_causal": (3, 6, 2, 7, 7, 4, True, 0.3),
                "unbatched": (None, 4, 2, 6, 3, 5, False, None)}


@_register("qk_max", [Case(name, name, needs=frozenset({QK_MAX})) for name in QK_MAX_CASES])
def check_qk_max(adapter: Any, name: str, where: Where) -> None:
    """The backend's measurement of the largest logit per query head, from `q`, `k` in
    torch's attention layout (with GQA, a causal mask, a given scale, no batch axis), matches
    `muon_core.max_logits` in float64."""
    batch, heads, kv_heads, queries, keys, dim, causal, scale = QK_MAX_CASES[name]
    lead = () if batch is None else (batch,)
    rng = np.random.default_rng(3)
    q = rng.standard_normal((*lead, heads, queries, dim)).astype(NUMPY_DTYPES[where.tier])
    k = rng.standard_normal((*lead, kv_heads, keys, dim)).astype(NUMPY_DTYPES[where.tier])
    mask = np.tril(np.ones((queries, keys), dtype=bool)) if causal else None
    expected = max_logits(q.astype(np.float64), k.astype(np.float64), scale=scale, mask=mask)
    got = adapter.qk_max(q, k, scale=scale, mask=mask)
    compare(got, expected, tol=where.tol, where=where.at("q", q.shape, "per-head largest logit"))


# -- collecting -----------------------------------------------------------------------------

def check_names() -> list[str]:
    """Every check's name, in the order the suite runs them."""
    return list(CHECKS)


def _skip_reason(adapter: Any, case: Case) -> str | None:
    missing = sorted(case.all_needs - frozenset(adapter.capabilities))
    if missing:
        return f"backend {adapter.name!r} does not declare capability {missing}"
    return None


def collect(adapter: Any, checks: Sequence[str] | None = None,
            known_failures: Mapping[str, str] | None = None) -> list[CheckCase]:
    """The runnable cases of `checks` (default: all) for `adapter`, with skip reasons for
    missing capabilities and known-failure reasons (keys `check` or `check[case]`) from the
    adapter's optional `known_failures` attribute updated with `known_failures`."""
    unknown = [c for c in (checks or ()) if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}: expected names from {check_names()}")
    bad_capabilities = unknown_capabilities(adapter.capabilities)
    if bad_capabilities:
        raise ValueError(f"adapter {adapter.name!r} declares unknown capabilities "
                         f"{bad_capabilities}: expected names from {sorted(CAPABILITIES)}")
    known = {**getattr(adapter, "known_failures", {}), **(known_failures or {})}
    cases = []
    for check in (CHECKS[name] for name in (checks or CHECKS)):
        for case in check.cases:
            where = Where(check.name, case.name, case.tier, case.run_config, case.tol_scale)
            item = CheckCase(check.name, case.name, partial(check.func, adapter, case.value,
                                                            where),
                             case.slow, _skip_reason(adapter, case))
            cases.append(dataclasses.replace(item, known_failure=known.get(
                item.id, known.get(check.name))))
    _check_known_failures(known)
    return cases


def _check_known_failures(known: Mapping[str, str]) -> None:
    names = set(CHECKS) | {f"{c.name}[{case.name}]" for c in CHECKS.values() for case in c.cases}
    unknown = sorted(set(known) - names)
    if unknown:
        raise ValueError(f"known failures name no check or case: {unknown}; expected a check "
                         "name such as 'trajectory' or an id such as 'trajectory[defaults]'")


def run_checks(adapter: Any, checks: Sequence[str] | None = None,
               include_slow: bool = False) -> dict[str, str]:
    """Run the cases directly (no pytest); return `{case id: failure message}` for every
    failure, known ones included. Cases skipped for a missing capability, and slow ones unless
    asked, are not run."""
    failures = {}
    for case in collect(adapter, checks):
        if case.skip or (case.slow and not include_slow):
            continue
        try:
            case()
        except AssertionError as exc:
            failures[case.id] = str(exc)
    return failures


# -- adaptive Muon: second moments after Newton-Schulz, cautious weight decay ---------------

ADAPTIVE_OPTIONS: dict[str, dict[str, Any]] = {
    "normuon": {"second_moment": "normuon"},
    "adamuon": {"second_moment": "adamuon"},
    "normuon_beta2": {"second_moment": "normuon", "beta2": 0.5, "second_moment_eps": 1e-3},
    "adamuon_no_qkv_split": {"second_moment": "adamuon", "beta2": 0.9, "split_qkv": False},
    "cautious_weight_decay": {"cautious_weight_decay": True, "weight_decay": 1.5},
    "normuon_cautious": {"second_moment": "normuon", "cautious_weight_decay": True,
                         "momentum_kind": "sum", "nesterov": False},
}
ADAPTIVE_STATE_CASES = [Case(name, None, base_config(**ADAPTIVE_OPTIONS[name]))
                        for name in ("normuon", "adamuon", "normuon_cautious")]

# Variations of the same arithmetic run with the slow checks.
ADAPTIVE_SLOW = frozenset({"normuon_beta2", "adamuon_no_qkv_split"})

_register("adaptive_trajectory", [Case(name, None, base_config(**changes),
                                       slow=name in ADAPTIVE_SLOW)
                                  for name, changes in ADAPTIVE_OPTIONS.items()])(
    check_trajectory)
_register("adaptive_state", ADAPTIVE_STATE_CASES)(check_state)
_register("adaptive_resume", ADAPTIVE_STATE_CASES)(check_resume)


def _zero_gradient_inputs(tier: str) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Zero-initialised Muon matrices whose gradients are zero at first, then partly zero."""
    params, grads = seeded_inputs(tier, 3)
    for name, shape in STANDARD_SHAPES.items():
        if len(shape) >= 2:
            params[name][...] = 0.0
            grads[0][name][...] = 0.0
            grads[1][name][..., :2] = 0.0
    return params, grads


@_register("adaptive_zero_gradients", [Case(name, None, base_config(**ADAPTIVE_OPTIONS[name]))
                                       for name in ("normuon", "adamuon", "normuon_cautious")])
def check_adaptive_zero_gradients(adapter: Any, _: Any, where: Where) -> None:
    """Zero-initialised matrices with all-zero, then partly zero, gradients follow the float64
    reference with a second moment (no NaN from a zero norm or a zero second moment)."""
    params, grads = _zero_gradient_inputs(where.tier)
    history, handle = drive(adapter, params, grads, where.config)
    expected = reference_trajectory(params, grads, where.config)
    compare_trajectory(history, expected, params, where.tol, where)
    compare_state(adapter.state(handle), expected[-1][1], where.tol, where,
                  "state after the zero-gradient steps")
