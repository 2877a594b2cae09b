"""Batched Newton-Schulz in native torch, with the core's semantics."""

from __future__ import annotations

import torch
from muon_core import NSSchedule

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for accumulating norms, float32 on devices without float64 (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def frobenius_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm over the last two axes (kept as size-1 axes), in `x.dtype`.

    float32/float64: each row's norm in `x.dtype` (torch sums a row pairwise), the rows'
    total in float64, as accurate as a float64 norm at a fraction of its cost. bfloat16: torch
    accumulates in float32 and rounds once, which lands on the float64 norm rounded to bfloat16.
    """
    if x.dtype in LOW_PRECISION:
        return torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    rows = torch.linalg.vector_norm(x, dim=-1, keepdim=True).to(_wide_dtype(x.device))
    return rows.square().sum(dim=-2, keepdim=True).sqrt().to(x.dtype)


def newton_schulz(x: torch.Tensor, schedule: NSSchedule, eps: float) -> torch.Tensor:
    """Orthogonalize every matrix of `x` (shape `(..., m, n)`) in one batched computation.

    Semantics of `muon_core.orthogonalize`: work on `X^T` when `m > n`, divide by
    `max(norm_scale * ||X||_F, eps)`, then `X <- a X + (b A + c A^2) X` with `A = X X^T` for each
    `(a, b, c)` of the schedule. Runs in `x.dtype` on `x.device`; `x` is not modified.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got {x.ndim=} "
                         f"with shape {tuple(x.shape)}")
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])
    tall = shape[-2] > shape[-1]
    if tall:
        x = x.mT
    scale = (frobenius_norm(x) * schedule.norm_scale).clamp_min(eps)
    # Row-major even for a transposed view (torch's GEMMs prefer it), and every iteration writes
    # into buffers allocated once: a fresh large tensor per product costs page faults on CPU.
    x = torch.div(x, scale, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
    spare = torch.empty_like(x)
    gram = x.new_empty((x.shape[0], x.shape[1], x.shape[1]))
    poly = torch.empty_like(gram)
    for a, b, c in schedule.coefficients:
        torch.bmm(x, x.mT, out=gram)
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=poly)
        torch.baddbmm(x, poly, x, beta=a, out=spare)
        x, spare = spare, x
    if tall:
        x = x.mT
    return x.reshape(shape)
