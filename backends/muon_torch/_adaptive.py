"""NorMuon / AdaMuon second moments and cautious weight decay in native torch.

The semantics are `muon_core.apply_second_moment` and `muon_core.decayed_param`: the second
moment acts on each orthogonalized block before its LR scale, and every matrix of a block
keeps its Frobenius norm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import muon_core
import torch
from muon_core import ParamPlan

STATE_KEY = "second_moment"


def _method(group: Mapping[str, Any]) -> str:
    # Groups loaded from a checkpoint made before these options existed lack the keys.
    return group.get("second_moment", "none")


def ensure_second_moment(state: dict[str, Any], param: torch.Tensor, entry: ParamPlan,
                         group: Mapping[str, Any]) -> None:
    """Add a zero `second_moment` to a Muon parameter's state when its group uses one."""
    shape = muon_core.second_moment_shape(entry, _method(group))
    if shape is not None and STATE_KEY not in state:
        state[STATE_KEY] = torch.zeros(shape, dtype=param.dtype, device=param.device)


def state_shape(key: str, entry: ParamPlan, group: Mapping[str, Any]) -> tuple[tuple, str]:
    """The shape a state tensor `key` of this parameter must have, and what it is."""
    if key == STATE_KEY and entry.is_muon:
        shape = muon_core.second_moment_shape(entry, _method(group)) or ()
        return tuple(shape), f"the shape for second_moment={_method(group)!r}"
    return tuple(entry.shape), "the parameter's shape"


def _matrix_view(x: torch.Tensor, entry: ParamPlan) -> tuple[torch.Tensor, bool]:
    """`x` as `(batch, rows, cols)` matrices, and whether that is a view (else a copy)."""
    permuted = x.view(entry.view_shape).permute(entry.perm)
    if permuted.is_contiguous():
        return permuted.view(entry.matrix_shape), True
    return permuted.reshape(entry.matrix_shape), False


@dataclasses.dataclass(frozen=True)
class Pieces:
    """An update held as pieces of each matrix on several ranks (tensor parallelism): `total`
    sums a tensor over the pieces (an all-reduce, in place), `cols` is the whole matrix's
    column count when its columns are cut (None: every row is whole on one rank)."""

    total: Callable[[torch.Tensor], torch.Tensor]
    cols: int | None


def _keep_norm(scaled: torch.Tensor, update: torch.Tensor,
               pieces: Pieces | None = None) -> torch.Tensor:
    """`scaled * ||update|| / ||scaled||` per (whole) matrix; 0 where `scaled` is all zero."""
    if pieces is None:
        norm = torch.linalg.vector_norm(update, dim=(-2, -1), keepdim=True)
        new_norm = torch.linalg.vector_norm(scaled, dim=(-2, -1), keepdim=True)
    else:
        squares = pieces.total(torch.stack([update.square().sum(dim=(-2, -1), keepdim=True),
                                            scaled.square().sum(dim=(-2, -1), keepdim=True)]))
        norm, new_norm = squares.sqrt()
    return scaled * torch.where(new_norm > 0, norm / new_norm, 0.0)


def _row_mean_square(o: torch.Tensor, pieces: Pieces | None) -> torch.Tensor:
    """Mean of `o**2` along each (whole) row."""
    if pieces is None or pieces.cols is None:
        return o.square().mean(dim=-1)
    return pieces.total(o.square().sum(dim=-1)) / pieces.cols


def _adapt_block(update: torch.Tensor, state: dict[str, Any], entry: ParamPlan, rows: slice,
                 group: Mapping[str, Any], pieces: Pieces | None = None) -> torch.Tensor:
    """One block's second-moment step; updates the state in place, returns the new update.
    With `pieces`, `update`, `entry` and the state are this rank's piece of each matrix."""
    v = state[STATE_KEY]
    normuon = _method(group) == "normuon"
    matrices, is_view = (v, True) if normuon else _matrix_view(v, entry)
    block = matrices[:, rows]
    wide = torch.promote_types(v.dtype, torch.float32)
    o = update.to(wide)
    square = _row_mean_square(o, pieces) if normuon else o.square()
    new_v = torch.lerp(block.to(wide), square, 1.0 - group["beta2"])
    block.copy_(new_v)
    if not is_view:
        v.view(entry.view_shape).permute(entry.perm).copy_(matrices.view(entry.permuted_shape))
    denom = new_v.sqrt().add_(group["second_moment_eps"])
    scaled = o / (denom.unsqueeze(-1) if normuon else denom)
    return _keep_norm(scaled, o, pieces).to(v.dtype)


def second_moments(updates: Sequence[torch.Tensor],
                   blocks: Sequence[tuple[dict[str, Any], ParamPlan, slice, Mapping[str, Any]]],
                   pieces: Pieces | None = None) -> list[torch.Tensor]:
    """Each orthogonalized block `(batch, rows, cols)` after its group's second moment (as it
    is when the group has none); `blocks` gives each one's (state, plan entry, rows, group).
    With `pieces`, every block is this rank's piece of a matrix cut over ranks (collective)."""
    return [update if _method(group) == "none" else
            _adapt_block(update, state, entry, rows, group, pieces)
            for update, (state, entry, rows, group) in zip(updates, blocks)]


def cautious_factor(group: Mapping[str, Any]) -> float | None:
    """`lr * weight_decay` when the group decays cautiously (after Newton-Schulz), else None."""
    if not group.get("cautious_weight_decay", False):
        return None
    return group["lr"] * group["weight_decay"]


def decay_and_add_(block: torch.Tensor, update: torch.Tensor, alpha: float,
                   factor: float | None) -> None:
    """`block += alpha * update`, after cautious decay `block *= 1 - factor` where the
    update and the block agree in sign (`alpha` < 0 makes `update` the descent direction)."""
    if factor is not None:
        block.copy_(torch.where(update * block >= 0, block * (1.0 - factor), block))
    block.add_(update, alpha=alpha)
