"""The oracle: standard models, seeded gradients, the float64 reference run and tolerance tiers.

Every check compares a backend with `muon_core.reference_step` run on float64 numpy arrays with
Newton-Schulz in float64, or with the float64 facts of docs/algorithm.md (reference values).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from muon_core import AdamWConfig, MuonConfig, Rule, plan, reference_step
from muon_core import _checkpoint as ckpt

Arrays = dict[str, np.ndarray]

# One small model holding every shape family of the spec, in torch layout (out, in, ...).
STANDARD_SHAPES: dict[str, tuple[int, ...]] = {
    "tall.weight": (48, 16),
    "wide.weight": (16, 40),
    "square.weight": (24, 24),
    "experts.weight": (3, 12, 20),      # batched: one matrix per expert (rule below)
    "conv.weight": (8, 4, 3, 3),        # flattened to 8 x 36
    "attn.qkv.weight": (60, 20),        # fused QKV: three 20 x 20 blocks
    "attn.neox.weight": (24, 10),       # per-head interleaved QKV: 2 groups [q, k, v] (rule)
    "attn.gqa.weight": (32, 24),        # grouped-query QKV: blocks 16 + 8 + 8 (rule below)
    "tall.bias": (48,),
    "norm.weight": (16,),
    "gate": (),
    "embed.weight": (50, 16),           # AdamW by name
    "lm_head.weight": (30, 16),         # AdamW by name
}
STANDARD_RULES = (
    Rule(match="experts.*", out_axes=(1,), in_axes=(2,)),
    Rule(match="*.gqa.*", split=(16, 8, 8)),
    Rule(match="*.neox.*", split=(8, 8, 8), groups=2),
)


def base_config(**changes: Any) -> MuonConfig:
    """The suite's default config: float32 Newton-Schulz, visible decay, the standard rules."""
    config = MuonConfig(lr=0.02, weight_decay=0.1, ns_dtype="float32", rules=STANDARD_RULES,
                        adamw=AdamWConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1))
    return config.replace(**changes)


def _flat_options(config: MuonConfig) -> dict[str, Any]:
    data = config.to_dict()
    adamw = data.pop("adamw")
    data.pop("rules")
    return data | {f"adamw.{key}": value for key, value in adamw.items()}


def describe_options(config: MuonConfig) -> str:
    """The options that differ from `MuonConfig()`'s defaults, as `key=value` text (rules,
    the same in every case but the routing check's, are left out)."""
    default = _flat_options(MuonConfig())
    changed = {k: v for k, v in _flat_options(config).items() if v != default[k]}
    return ", ".join(f"{k}={v!r}" for k, v in changed.items()) or "defaults"


def make_params(shapes: Mapping[str, Sequence[int]], seed: int = 0) -> Arrays:
    """Seeded float64 parameters of the given shapes."""
    rng = np.random.default_rng(seed)
    return {name: 0.5 * rng.standard_normal(tuple(shape)) for name, shape in shapes.items()}


def make_grads(shapes: Mapping[str, Sequence[int]], steps: int, seed: int = 1) -> list[Arrays]:
    """Seeded float64 gradients for `steps` steps; each parameter gets its own scale."""
    rng = np.random.default_rng(seed)
    scales = {name: 10.0 ** rng.uniform(-2, 1) for name in shapes}
    return [{name: scales[name] * rng.standard_normal(tuple(shape))
             for name, shape in shapes.items()} for _ in range(steps)]


def cast(arrays: Mapping[str, np.ndarray], dtype: Any) -> Arrays:
    """Copies of `arrays` in `dtype`."""
    return {name: np.array(a, dtype=dtype) for name, a in arrays.items()}


def reference_trajectory(params: Mapping[str, np.ndarray], grads: Sequence[Mapping[str, Any]],
                         config: MuonConfig, step: Callable[..., tuple] = reference_step
                         ) -> list[tuple[Arrays, dict]]:
    """(params, state) after each step of the float64 reference with float64 Newton-Schulz
    (`step`: `reference_step` or a function of the same arguments, such as
    `blockwise_reference_step` with its cuts bound)."""
    config = config.replace(ns_dtype="float64")
    current, state, out = cast(params, np.float64), None, []
    for grad in grads:
        current, state = step(current, cast(grad, np.float64), state, config)
        out.append((current, state))
    return out


def scheduled(config: MuonConfig, lrs: tuple[float, float] | None) -> MuonConfig:
    """`config` with its Muon and AdamW learning rates replaced by the pair `lrs` (if given)."""
    if lrs is None:
        return config
    return config.with_overrides({"lr": lrs[0], "adamw": {"lr": lrs[1]}})


def reference_groups(params: Mapping[str, np.ndarray], grads: Sequence[Mapping[str, Any]],
                     config: MuonConfig, groups: Sequence[tuple[Sequence[str], Mapping]],
                     lrs: Sequence[tuple[float, float]] | None = None) -> list[tuple[Arrays, dict]]:
    """(params, state) after each step of the float64 reference run on each group alone: step
    `i` uses `config` with the learning rates `lrs[i]` (if given), then the group's overrides."""
    current, states, out = cast(params, np.float64), [None] * len(groups), []
    for i, grad in enumerate(grads):
        step_config = scheduled(config.replace(ns_dtype="float64"), lrs[i] if lrs else None)
        merged_state: dict = {}
        for g, (names, overrides) in enumerate(groups):
            part, states[g] = reference_step(
                {n: current[n] for n in names}, cast({n: grad[n] for n in names}, np.float64),
                states[g], step_config.with_overrides(overrides))
            current = {**current, **part}
            merged_state |= states[g]
        out.append((current, merged_state))
    return out


# safetensors dtype code <-> numpy dtype, for the portable checkpoints the suite reads and writes
CODES = {"F64": np.float64, "F32": np.float32, "I64": np.int64, "I32": np.int32}


def stored_state(shapes: Mapping[str, Sequence[int]], config: MuonConfig,
                 state: Mapping[str, Mapping[str, Any]]) -> tuple[Any, dict, dict]:
    """The plan, the tensors in the canonical layout and the step counts a portable checkpoint
    of the reference `state` holds (float32 arrays, `step` a float32 scalar as torch keeps it)."""
    routed = plan(shapes, config, layout="out_in")
    tensors, steps = {}, {}
    for entry in routed:
        for key, value in state.get(entry.name, {}).items():
            array = np.asarray(value, dtype=np.float32)
            array = np.array(np.transpose(  # np.ascontiguousarray would make a scalar 1-d
                array, ckpt.stored_perm(entry, array.shape, "out_in")), order="C")
            tensors.setdefault(entry.name, {})[key] = ckpt.Tensor("F32", array.shape,
                                                                  array.tobytes())
            if key == "step":
                steps[entry.name] = int(value)
    return routed, tensors, steps


def write_reference_checkpoint(path: Any, shapes: Mapping[str, Sequence[int]],
                               config: MuonConfig, state: Mapping[str, Mapping]) -> None:
    """Write the reference `state` as a portable checkpoint (`muon_core.save_checkpoint`)."""
    routed, tensors, steps = stored_state(shapes, config, state)
    ckpt.save_checkpoint(path, routed, "out_in", tensors, steps)


def read_reference_state(path: Any, shapes: Mapping[str, Sequence[int]],
                         config: MuonConfig) -> dict[str, dict[str, Any]]:
    """A portable checkpoint's state in the reference's format (layout "out_in"): arrays as
    float64, `step` an int."""
    checkpoint = ckpt.read_checkpoint(path)
    out: dict[str, dict[str, Any]] = {}
    for entry in plan(shapes, config, layout="out_in"):
        for key, stored in checkpoint.state(entry.name).items():
            array = np.frombuffer(stored.data, CODES[stored.dtype]).reshape(stored.shape)
            array = np.transpose(array, ckpt.loaded_perm(entry, array.shape, "out_in"))
            out.setdefault(entry.name, {})[key] = (int(array) if key == "step"
                                                   else array.astype(np.float64))
    return out


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Allowed error: `|actual - expected| <= rtol * scale + atol`, `scale` the largest
    magnitude of the expected quantity (a norm-wise relative error)."""

    tier: str
    rtol: float
    atol: float


# Measured on the standard model over 20 steps against the float64 reference: float32 numpy
# 0.8e-5 to 5e-5 across the options; bfloat16 Newton-Schulz (torch matmuls) 3.5e-2 to 5.6e-2,
# and docs/algorithm.md (reference values) puts XLA's bfloat16 further from float64 than torch's.
TIERS = {
    "float64": Tolerance("float64", rtol=1e-10, atol=1e-13),
    "float32": Tolerance("float32", rtol=1e-4, atol=1e-7),
    "bfloat16": Tolerance("bfloat16", rtol=1.2e-1, atol=1e-4),
}
NUMPY_DTYPES = {"float64": np.float64, "float32": np.float32, "bfloat16": np.float32}


class ConformanceFailure(AssertionError):
    """A backend disagrees with the specification; the message says where and by how much."""


def compare(actual: Any, expected: Any, *, tol: Tolerance, where: str,
            baseline: Any = None) -> None:
    """Raise `ConformanceFailure` unless `actual` matches `expected` within `tol`.

    With `baseline` (the value before the steps), the error is measured relative to the
    displacement `expected - baseline`, so a small update is not hidden by a large parameter.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ConformanceFailure(f"{where}: shape {actual.shape}, expected {expected.shape}")
    if not np.all(np.isfinite(actual)):
        raise ConformanceFailure(f"{where}: {int(np.sum(~np.isfinite(actual)))} non-finite "
                                 "value(s), expected finite values")
    if actual.size == 0:
        return
    reference = expected if baseline is None else expected - np.asarray(baseline, np.float64)
    scale = float(np.max(np.abs(reference)))
    error = np.abs(actual - expected)
    worst = np.unravel_index(int(np.argmax(error)), error.shape)
    max_error = float(error[worst])
    if max_error <= tol.rtol * scale + tol.atol:
        return
    measured = "displacement from the initial value" if baseline is not None else "value"
    relative = max_error / scale if scale > 0 else float("inf")
    raise ConformanceFailure(
        f"{where}: max abs error {max_error:.3g}, relative {relative:.3g} (to the largest "
        f"expected {measured}, {scale:.3g}) exceeds the {tol.tier} tolerance "
        f"rtol={tol.rtol:g}, atol={tol.atol:g}; worst element {tuple(map(int, worst))}: "
        f"got {actual[worst]:.8g}, expected {expected[worst]:.8g}")
