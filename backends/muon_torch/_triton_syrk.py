"""Symmetric matrix products for CUDA in Triton: `A B^T` computed on upper-triangular tiles only.

Every m x m product of Newton-Schulz has a symmetric result: `X X^T`, `A A` (A symmetric), and
in the Gram form `(a A + b A^2 + c A^3) P` and `P Q` (polynomials in the same Gram matrix, which
commute). A kernel that computes only the tiles on and above the diagonal and writes each one
twice (in place and mirrored) does about half the multiply-adds of a full GEMM. This module
imports triton lazily: `available()` says whether the kernel can run, and torch works without it.
Under `TRITON_INTERPRET=1` the kernel also runs on CPU tensors (slowly), which the tests use.
"""

from __future__ import annotations

import functools
import os

import torch

# Tile sizes: BLOCK x BLOCK output tiles, BLOCK_K-wide slices of the contracted axis.
DEFAULT_BLOCK = 128
DEFAULT_BLOCK_K = 64
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreted() -> bool:
    """Whether triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _kernel():
    """The compiled-on-demand Triton kernel (triton is imported here, on first use)."""
    import triton
    import triton.language as tl

    @triton.jit
    def symmetric_product(a_ptr, b_ptr, c_ptr, base_ptr, m, k, alpha, beta,
                          a_batch, a_row, a_col, b_batch, b_row, b_col, c_batch, c_row, c_col,
                          base_batch, base_row, base_col,
                          BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                          WIDEN: tl.constexpr, HAS_BASE: tl.constexpr):
        tile_row, tile_col, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if tile_row > tile_col:  # lower tiles are the mirror of upper ones
            return
        rows = tile_row * BLOCK + tl.arange(0, BLOCK)
        cols = tile_col * BLOCK + tl.arange(0, BLOCK)
        inner = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + batch * a_batch + rows[:, None] * a_row + inner[None, :] * a_col
        # B^T's tile: element (inner, col) is B[col, inner]
        b_ptrs = b_ptr + batch * b_batch + cols[None, :] * b_row + inner[:, None] * b_col
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            left = inner + start < k
            a = tl.load(a_ptrs, mask=(rows[:, None] < m) & left[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=(cols[None, :] < m) & left[:, None], other=0.0)
            if WIDEN:
                a, b = a.to(tl.float32), b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * a_col
            b_ptrs += BLOCK_K * b_col
        inside = (rows[:, None] < m) & (cols[None, :] < m)
        if HAS_BASE:  # alpha A B^T + beta C, C symmetric: its upper tile is read, may be `out`
            tile = (base_ptr + batch * base_batch + rows[:, None] * base_row
                    + cols[None, :] * base_col)
            acc = alpha * acc + beta * tl.load(tile, mask=inside, other=0.0).to(tl.float32)
        result = acc.to(c_ptr.dtype.element_ty)
        # Entries on and above the diagonal in place, those strictly above it mirrored (in a
        # diagonal tile, the mirror replaces the entries below the diagonal that were computed).
        base = c_ptr + batch * c_batch
        tl.store(base + rows[:, None] * c_row + cols[None, :] * c_col, result,
                 mask=inside & (rows[:, None] <= cols[None, :]))
        tl.store(base + cols[None, :] * c_row + rows[:, None] * c_col, result,
                 mask=inside & (rows[:, None] < cols[None, :]))

    return symmetric_product


@functools.cache
def available() -> bool:
    """Whether triton imports and can run the kernel here (a CUDA GPU, or the interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return interpreted() or torch.cuda.is_available()


def _tile(size: int) -> int:
    """The smallest power of two >= `size`, at least 16 (the smallest tile `tl.dot` takes)."""
    return max(16, 1 << (size - 1).bit_length())


def symmetric_product(a: torch.Tensor, b: torch.Tensor | None = None, *,
                      out: torch.Tensor | None = None, base: torch.Tensor | None = None,
                      beta: float = 1.0, alpha: float = 1.0, block: int | None = None,
                      block_k: int | None = None) -> torch.Tensor:
    """`a @ b.mT` for batches `(batch, m, k)` whose product is known to be symmetric (`b`
    defaults to `a`: `a a^T`), computing only the tiles on and above the diagonal; with a
    symmetric `base` of the result's shape, `beta * base + alpha * a @ b.mT` (rounded once;
    `base` may be `out`).

    Tiles are `block x block` (default: `DEFAULT_BLOCK`, less for small m) and contract over
    `block_k` values at a time (default: `DEFAULT_BLOCK_K`, less for small k). Accumulates in
    float32 and writes in `a.dtype` (float32 products in full float32, not TF32).
    `out`, when given, is a `(batch, m, m)` tensor of `a.dtype` that does not overlap the inputs.
    The lower triangle is a copy of the upper one, so the result is exactly symmetric even
    where rounding would make `a @ b.mT` slightly asymmetric.
    """
    b = a if b is None else b
    if a.ndim != 3 or b.shape != a.shape:
        raise ValueError(f"symmetric_product needs two (batch, m, k) tensors of one shape, got "
                         f"{tuple(a.shape)=} and {tuple(b.shape)=}")
    if a.dtype not in DTYPES or b.dtype != a.dtype:
        raise ValueError(f"symmetric_product needs one of {DTYPES}, got {a.dtype=}, {b.dtype=}")
    count, m, k = a.shape
    if out is None:
        out = torch.empty((count, m, m), dtype=a.dtype, device=a.device)
    elif out.shape != (count, m, m) or out.dtype != a.dtype:
        raise ValueError(f"out must be a ({count}, {m}, {m}) {a.dtype} tensor, got "
                         f"{tuple(out.shape)=}, {out.dtype=}")
    if base is not None and (base.shape != out.shape or base.dtype != out.dtype):
        raise ValueError(f"base must be a ({count}, {m}, {m}) {a.dtype} tensor, got "
                         f"{tuple(base.shape)=}, {base.dtype=}")
    if not available():
        raise RuntimeError("symmetric_product needs triton and a CUDA GPU (or TRITON_INTERPRET=1)")
    block = block or min(DEFAULT_BLOCK, _tile(m))
    block_k = block_k or min(DEFAULT_BLOCK_K, _tile(k))
    tiles = -(-m // block)
    # triton's interpreter multiplies bfloat16 tiles wrongly (as of triton 3.9), so there the
    # tiles are widened to float32 first: the same products, rounded once at the store.
    wide = interpreted() and a.dtype != torch.float32
    _kernel()[(tiles, tiles, count)](
        a, b, out, out if base is None else base, m, k, float(alpha), float(beta),
        *a.stride(), *b.stride(), *out.stride(), *(out if base is None else base).stride(),
        BLOCK=block, BLOCK_K=block_k, IEEE=a.dtype == torch.float32 or wide,
        WIDEN=wide, HAS_BASE=base is not None,
        num_warps=8 if block >= 128 else 4, num_stages=3 if a.element_size() == 2 else 2)
    return out
