"""Tensor-parallel Muon: the blockwise variant's definition and the cost of each `tp_mode`.

A matrix split over `tp` ranks along one axis can be orthogonalized three ways
(`MuonConfig.tp_mode`): "duplicated" gathers the whole matrix on every rank, "distributed"
keeps the pieces where they are and all-reduces the small Gram matrix inside each
Newton-Schulz iteration, and "blockwise" orthogonalizes each piece alone, which is a
different algorithm: `blockwise_reference_step` is its definition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from array_api_compat import array_namespace

from muon_core._config import TP_MODES, MuonConfig
from muon_core._ns import GRAM_MIN_ASPECT
from muon_core._owners import ns_flops
from muon_core._plan import ParamPlan, Plan, lr_scale, plan as make_plan
from muon_core._reference import _muon_param, check_gradients, reference_step, step_allowed


def chunk_sizes(length: int, parts: int) -> tuple[int, ...]:
    """Sizes of `parts` contiguous pieces of an axis of `length`, as `torch.chunk` and DTensor's
    `Shard` cut it: pieces of `ceil(length / parts)`, the last ones shorter or empty."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts={parts!r} is invalid: expected a positive int")
    size = -(-length // parts)
    return tuple(min(max(length - i * size, 0), size) for i in range(parts))


def is_plain_matrix(entry: ParamPlan) -> bool:
    """Whether a Muon entry is one 2-D matrix seen as it is (no batch, split or reshape)."""
    return (len(entry.shape) == 2 and entry.matrix_shape == (1, *entry.shape)
            and len(entry.blocks) == 1 and entry.perm == (0, 1))


def block_entry(entry: ParamPlan, shape: tuple[int, int], config: MuonConfig) -> ParamPlan:
    """The plan entry of one block of shape `shape` cut from a plain-matrix Muon entry: the
    block is a matrix of its own, with the LR scale of its own shape."""
    if not is_plain_matrix(entry):
        raise ValueError(f"parameter {entry.name!r} with matrix view {entry.matrix_shape} and "
                         f"blocks {entry.blocks} cannot be cut into blockwise pieces: expected "
                         "a plain 2-D matrix (no batch axes, reshape or Q/K/V split)")
    rows, cols = shape
    return dataclasses.replace(entry, shape=(rows, cols), matrix_shape=(1, rows, cols),
                               blocks=(rows,), view_shape=(rows, cols),
                               lr_scales=(lr_scale(rows, cols, config.lr_scaling),))


def _cut(x: Any, axis: int, sizes: tuple[int, ...], xp: Any) -> list[Any]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    index = [slice(None), slice(None)]
    pieces = []
    for start, size in zip(starts, sizes):
        index[axis] = slice(start, start + size)
        pieces.append(x[tuple(index)])
    return pieces


def _blockwise_param(p: Any, g: Any, buf: Any, entry: ParamPlan, axis: int, parts: int,
                     config: MuonConfig) -> tuple[Any, Any]:
    xp = array_namespace(p)
    sizes = tuple(s for s in chunk_sizes(entry.shape[axis], parts) if s)
    new_p, new_buf = [], []
    for piece_p, piece_g, piece_buf in zip(*(_cut(x, axis, sizes, xp) for x in (p, g, buf))):
        block = block_entry(entry, tuple(piece_p.shape), config)
        out_p, out_state = _muon_param(piece_p, piece_g, {"momentum_buffer": piece_buf}, block,
                                       config)
        new_p.append(out_p)
        new_buf.append(out_state["momentum_buffer"])
    return xp.concat(new_p, axis=axis), xp.concat(new_buf, axis=axis)


def blockwise_reference_step(params: Mapping[str, Any], grads: Mapping[str, Any],
                             state: Mapping[str, Any] | None, config: MuonConfig,
                             cuts: Mapping[str, tuple[int, int]], plan: Plan | None = None
                             ) -> tuple[dict, dict]:
    """`reference_step`, except that each Muon matrix named in `cuts` (`{name: (axis, parts)}`)
    is cut into `parts` contiguous pieces along `axis` (`chunk_sizes`) and every piece takes
    the Muon step as a matrix of its own: its own Newton-Schulz and the LR scale of its shape.
    This is blockwise Muon, what tensor-parallel ranks compute from their local shards alone.
    """
    if config.second_moment != "none" or config.cautious_weight_decay:
        raise ValueError(f"blockwise Muon with second_moment={config.second_moment!r} or "
                         f"cautious_weight_decay={config.cautious_weight_decay!r} is not "
                         "defined: expected second_moment='none' and no cautious decay")
    plan = plan or make_plan({n: tuple(p.shape) for n, p in params.items()}, config)
    entries = {e.name: e for e in plan}
    for name, (axis, _) in cuts.items():
        if name not in entries or not entries[name].is_muon or axis not in (0, 1):
            raise ValueError(f"cuts[{name!r}] = {cuts[name]!r} is invalid: expected a Muon "
                             "matrix of the plan and an axis 0 or 1")
        block_entry(entries[name], entries[name].shape, config)  # refuses non-plain matrices
    bad = check_gradients(params, grads)
    if not step_allowed(bad, {n: params[n].shape for n in bad}, config.nonfinite):
        return dict(params), dict(state or {})
    rest = Plan(tuple(e for e in plan if e.name not in cuts), plan.config)
    new_params, new_state = reference_step(
        params, {n: g for n, g in grads.items() if n not in cuts},
        {n: s for n, s in (state or {}).items() if n not in cuts}, config, rest)
    for name, (axis, parts) in cuts.items():
        if grads.get(name) is None:
            if state and name in state:
                new_state[name] = state[name]
            continue
        p = params[name]
        buf = (state or {}).get(name, {}).get("momentum_buffer")
        buf = array_namespace(p).zeros_like(p) if buf is None else buf
        new_params[name], new_buf = _blockwise_param(p, grads[name], buf, entries[name], axis,
                                                     parts, config)
        new_state[name] = {"momentum_buffer": new_buf}
    return new_params, new_state


@dataclasses.dataclass(frozen=True)
class TPCost:
    """Per-rank cost of one Muon step on one matrix split over `tp` ranks: bytes each rank
    sends (ring model), Newton-Schulz flops each rank runs, and the mode that actually runs
    ("distributed" falls back to "duplicated" when the split axis is the short one)."""

    mode: str
    bytes_sent: float
    ns_flops: int


def tp_cost(shape: tuple[int, int], tp: int, mode: str, split_axis: int, *, steps: int = 5,
            value_bytes: int = 4, algorithm: str = "gram") -> TPCost:
    """The cost model of each `tp_mode` for an (out, in) matrix split along `split_axis`
    (0: column-parallel, 1: row-parallel) over `tp` ranks, `value_bytes` per value exchanged,
    `algorithm` the config's `ns_algorithm`. m <= n are the matrix's sides.

    duplicated: one all-gather of the matrix, `(tp-1)/tp` of it sent per rank, and the whole
    Newton-Schulz on every rank. distributed (split along the long axis): first one
    all-reduce of one value (the agreed power-of-two pre-scale); then with "gram" and
    n >= 1.5 m (where one process takes the Gram form too), one
    all-reduce of the m x m float32 Gram matrix (`2 (tp-1)/tp` of it sent) and flops
    `4 m² n/tp + 2 m³ (4 steps - 3)` (the Gram form's m x m products run on every rank); with
    "standard", per iteration one all-reduce of the Gram matrix plus one of the float64 norm,
    and flops `steps (4 m² n / tp + 2 m³)`. blockwise: nothing sent, Newton-Schulz of the
    largest local block.
    """
    if mode not in TP_MODES:
        raise ValueError(f"mode={mode!r} is invalid: expected one of {list(TP_MODES)}")
    rows, cols = shape
    if mode == "distributed" and shape[split_axis] < shape[1 - split_axis]:
        mode = "duplicated"  # the documented fallback: the Gram product would be the large side
    ring = (tp - 1) / tp
    if mode == "duplicated":
        return TPCost(mode, ring * rows * cols * value_bytes, ns_flops(rows, cols, steps))
    local = list(shape)
    local[split_axis] = chunk_sizes(shape[split_axis], tp)[0]
    if mode == "blockwise":
        return TPCost(mode, 0.0, ns_flops(*local, steps))
    m = min(shape)
    n_local = local[split_axis]
    prescale = 2 * ring * value_bytes
    if algorithm == "gram" and max(shape) >= GRAM_MIN_ASPECT * m:
        return TPCost(mode, prescale + 2 * ring * m * m * max(value_bytes, 4),
                      4 * m * m * n_local + 2 * m ** 3 * (4 * steps - 3))
    sent = prescale + steps * 2 * ring * m * m * value_bytes + 2 * ring * 8
    return TPCost(mode, sent, steps * (4 * m * m * n_local + 2 * m ** 3))
