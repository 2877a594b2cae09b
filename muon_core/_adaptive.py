"""Adaptive Muon: second moments of the orthogonalized update (NorMuon, AdaMuon), as pure
functions on Array API arrays (the reference every backend follows; cautious weight decay is
`decayed_param` beside `decay_factor` in the reference step).

The second moment acts on each block of the matrix view after Newton-Schulz and before the
block's LR scale; each matrix of a block keeps its Frobenius norm, so `lr` and `lr_scaling`
mean what they mean for plain Muon.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

from muon_core._config import MuonConfig
from muon_core._plan import ParamPlan

STATE_KEY = "second_moment"


def second_moment_shape(entry: ParamPlan, method: str) -> tuple[int, ...] | None:
    """Shape of a Muon parameter's `second_moment` state: `(batch, rows)` of the matrix view
    for "normuon", the parameter's shape for "adamuon", None for "none"."""
    if method == "normuon":
        return entry.matrix_shape[:2]
    if method == "adamuon":
        return entry.shape
    if method == "none":
        return None
    raise ValueError(f"second_moment={method!r} is invalid: expected 'none', 'normuon' or "
                     "'adamuon'")


def init_second_moment(param: Any, entry: ParamPlan, config: MuonConfig) -> dict[str, Any]:
    """`{"second_moment": zeros}` in the parameter's dtype, or `{}` without a second moment."""
    shape = second_moment_shape(entry, config.second_moment)
    if shape is None:
        return {}
    xp = array_namespace(param)
    return {STATE_KEY: xp.zeros(shape, dtype=param.dtype, device=getattr(param, "device", None))}


def _keep_norm(scaled: Any, update: Any, *, xp: Any) -> Any:
    """`scaled` times `||update|| / ||scaled||` per matrix (last two axes); 0 where
    `scaled` is all zero (then `update` is too), so zero gradients never give NaN."""
    norm = xp.sqrt(xp.sum(update * update, axis=(-2, -1), keepdims=True))
    new_norm = xp.sqrt(xp.sum(scaled * scaled, axis=(-2, -1), keepdims=True))
    nonzero = new_norm > 0
    ratio = xp.where(nonzero, norm / xp.where(nonzero, new_norm, xp.ones_like(new_norm)),
                     xp.zeros_like(new_norm))
    return scaled * ratio


def normuon(update: Any, second_moment: Any, beta2: float, eps: float) -> tuple[Any, Any]:
    """NorMuon on orthogonalized matrices `update` `(..., rows, cols)` with per-row state
    `second_moment` `(..., rows)`: returns (new update, new state).

    `v <- beta2 v + (1 - beta2) mean_cols(O^2)`, `O' = O / (sqrt(v) + eps)` row by row,
    rescaled so that each matrix keeps the Frobenius norm of `O`.
    """
    xp = array_namespace(update)
    row_mean = xp.mean(update * update, axis=-1)
    new_v = beta2 * second_moment + (1.0 - beta2) * row_mean
    scaled = update / (xp.sqrt(new_v) + eps)[..., None]
    return _keep_norm(scaled, update, xp=xp), new_v


def adamuon(update: Any, second_moment: Any, beta2: float, eps: float) -> tuple[Any, Any]:
    """AdaMuon on orthogonalized matrices `update` `(..., rows, cols)` with elementwise state
    `second_moment` of the same shape: returns (new update, new state).

    `v <- beta2 v + (1 - beta2) O^2`, `O' = O / (sqrt(v) + eps)` element by element, rescaled
    so that each matrix keeps the Frobenius norm of `O`.
    """
    xp = array_namespace(update)
    new_v = beta2 * second_moment + (1.0 - beta2) * (update * update)
    scaled = update / (xp.sqrt(new_v) + eps)
    return _keep_norm(scaled, update, xp=xp), new_v


METHODS = {"normuon": normuon, "adamuon": adamuon}


def apply_second_moment(matrices: Any, state: dict[str, Any], entry: ParamPlan,
                        config: MuonConfig) -> tuple[Any, dict[str, Any]]:
    """The configured second moment on the orthogonalized matrix view `(batch, rows, cols)`,
    block by block (fused QKV) and matrix by matrix (batch axes): (new matrices, new state
    entries). Without a second moment, returns `(matrices, {})`; a missing state entry
    starts from zero."""
    if config.second_moment == "none":
        return matrices, {}
    from muon_core._reference import from_matrices, to_matrices  # the reference imports us

    xp = array_namespace(matrices)
    method = METHODS[config.second_moment]
    v = state.get(STATE_KEY)
    if v is None:  # a state saved without a second moment starts from zero
        v = xp.zeros(second_moment_shape(entry, config.second_moment), dtype=matrices.dtype)
    if config.second_moment == "adamuon":
        v = to_matrices(v, entry, xp=xp)
    pieces, moments = [], []
    for start, rows in zip(entry.block_offsets, entry.blocks):
        block = slice(start, start + rows)
        piece, moment = method(matrices[:, block, ...], v[:, block, ...], config.beta2,
                               config.second_moment_eps)
        pieces.append(piece)
        moments.append(moment)
    new_v = xp.concat(moments, axis=1)
    if config.second_moment == "adamuon":
        new_v = from_matrices(new_v, entry, xp=xp)
    return xp.concat(pieces, axis=1), {STATE_KEY: new_v}

