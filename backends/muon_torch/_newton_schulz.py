"""Batched Newton-Schulz in native torch, with the core's semantics."""

from __future__ import annotations

import math

import muon_core
import torch
from muon_core import DeviceFacts, NSSchedule
from muon_core._ns import uses_gram

from muon_torch import _triton_syrk

LOW_PRECISION = (torch.bfloat16, torch.float16)
# On CPU the stack is walked in chunks of at most this many values per matrix group: measured
# here, torch's GEMMs on one 768x768 or 768x3072 matrix at a time (scratch reused from the heap,
# kept in cache) beat one batched GEMM over a dozen of them by about 8 %.
CPU_CHUNK_VALUES = 2**19
# Whether Newton-Schulz on CUDA computes its symmetric m x m products with the Triton kernel of
# `_triton_syrk` (upper tiles only) by default, where triton is installed.
CUDA_SYMMETRIC_PRODUCTS = False
# Rows per strip of the "blocked" symmetric product (see `_blocked_product`); None: about six
# strips, a multiple of 64 rows and at least 128 (measured here in float32: 128 rows best at
# m = 768, 192 at m = 1024, both within noise of 256).
STRIP_ROWS: int | None = None


def _strip_rows(m: int) -> int:
    return STRIP_ROWS or max(128, 64 * -(-m // (6 * 64)))


# Facts per device, read once per process (a plain dict, which torch.compile reads as a constant).
_FACTS: dict[torch.device, DeviceFacts] = {}


def device_facts(device: torch.device) -> DeviceFacts:
    """What `ns_dtype="auto"` needs to know about `device` (see `muon_core.auto_ns_dtype`)."""
    device = torch.device(device)
    if device not in _FACTS:
        _FACTS[device] = _read_facts(device)
    return _FACTS[device]


def _read_facts(device: torch.device) -> DeviceFacts:
    if device.type == "cuda":
        return DeviceFacts("cuda", cuda_capability=torch.cuda.get_device_capability(device))
    if device.type == "cpu":
        return DeviceFacts("cpu", cpu_capability=torch.backends.cpu.get_cpu_capability(),
                           cpu_flags=muon_core.host_cpu_flags())
    return DeviceFacts(device.type)


def ns_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a config's `ns_dtype` on `device` ("auto" decided per device)."""
    facts = device_facts(device) if name == "auto" else None
    return muon_core.resolve_dtype(name, torch, facts=facts)


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


def _power_of_two_scale(x: torch.Tensor) -> torch.Tensor:
    """`2^-k` per matrix (kept as size-1 axes), `k >= 0` the binary exponent of the largest
    `|entry|` (1 when entries are < 1), at most that of the smallest normal number, so that
    devices flushing subnormals to zero keep it: `x` times it is exact, and its squares
    cannot overflow."""
    biggest = x.abs().amax(dim=(-2, -1), keepdim=True)
    largest_k = round(-math.log2(torch.finfo(x.dtype).smallest_normal))
    exponent = torch.frexp(biggest).exponent.clamp(0, largest_k)
    return torch.ldexp(torch.ones_like(biggest), -exponent)


def _normalised(x: torch.Tensor, schedule: NSSchedule, eps: float) -> torch.Tensor:
    """`x / max(norm_scale * ||x||_F, eps)` per matrix, as a new row-major tensor (which torch's
    GEMMs prefer even when `x` is a transposed view). Both sides are first scaled by a power of
    two (`_power_of_two_scale`), which changes no bit of the result but keeps the norm finite
    for entries up to the dtype's largest."""
    power = _power_of_two_scale(x)
    scaled = torch.mul(x, power, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
    return scaled.div_(torch.maximum(frobenius_norm(scaled) * schedule.norm_scale, eps * power))


def _full_product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                  base: torch.Tensor | None = None, beta: float = 1.0,
                  alpha: float = 1.0) -> None:
    if base is None:
        torch.bmm(a, b, out=out)
    else:
        torch.baddbmm(base, a, b, beta=beta, alpha=alpha, out=out)


def _blocked_product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                     base: torch.Tensor | None = None, beta: float = 1.0,
                     alpha: float = 1.0) -> None:
    """`out = a @ b` (with `base`: `beta * base + alpha * a @ b`, `base` symmetric, may be
    `out`) for a symmetric result: strips of `_strip_rows(m)` rows from the diagonal rightwards
    (about half the multiply-adds), then each strip left of the diagonal mirrored."""
    m = out.shape[-1]
    strip = _strip_rows(m)
    for start in range(0, m, strip):
        rows, cols = slice(start, start + strip), slice(start, None)
        if base is None:
            torch.matmul(a[:, rows], b[:, :, cols], out=out[:, rows, cols])
        else:
            torch.baddbmm(base[:, rows, cols], a[:, rows], b[:, :, cols], beta=beta,
                          alpha=alpha, out=out[:, rows, cols])
    for start in range(strip, m, strip):
        rows = slice(start, start + strip)
        out[:, rows, :start].copy_(out[:, :start, rows].mT)


def _triton_product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                    base: torch.Tensor | None = None, beta: float = 1.0,
                    alpha: float = 1.0) -> None:
    _triton_syrk.symmetric_product(a, b.mT, out=out, base=base, beta=beta, alpha=alpha)


# How the symmetric m x m products (`X X^T`, `A^2`, and in the Gram form every m x m product)
# are computed: "full" GEMMs, "blocked" upper strips mirrored (any device, best on CPU), or the
# "triton" kernel (CUDA, or triton's interpreter).
SYMMETRIC_PRODUCTS = {"full": _full_product, "blocked": _blocked_product,
                      "triton": _triton_product}


def symmetric_products(device: torch.device, choice: str | None = None) -> str:
    """The way `newton_schulz(..., symmetric=choice)` computes symmetric products on `device`:
    `choice` when given (one of `SYMMETRIC_PRODUCTS`; "triton" fails where the kernel cannot
    run), else "blocked" on CPU, "triton" on CUDA when `CUDA_SYMMETRIC_PRODUCTS` is set and
    triton is installed, "full" elsewhere."""
    if choice is None:
        kind = torch.device(device).type
        if kind == "cpu":
            return "blocked"
        use_triton = kind == "cuda" and CUDA_SYMMETRIC_PRODUCTS and _triton_syrk.available()
        return "triton" if use_triton else "full"
    if choice not in SYMMETRIC_PRODUCTS:
        raise ValueError(f"symmetric={choice!r} is invalid: expected one of "
                         f"{list(SYMMETRIC_PRODUCTS)} or None")
    if choice == "triton" and not _triton_syrk.available():
        raise ValueError(f"symmetric={choice!r} needs triton and a CUDA GPU (or "
                         "TRITON_INTERPRET=1)")
    return choice


def _iterate_gram(x: torch.Tensor, schedule: NSSchedule, eps: float, out: torch.Tensor,
                  symmetric: str = "full") -> None:
    """Gram Newton-Schulz (`muon_core`'s `_gram_iterations`) on a batch (b, m, n), m <= n.

    Forms `A = X X^T` and iterates `Q <- P Q` and `A <- (a A + b A^2 + c A^3) P` on m x m
    matrices in at least float32, then writes `Q X` (in `x.dtype`) into `out`. Every m x m
    product is symmetric (all are polynomials in the first Gram matrix): `symmetric` names
    how they are computed (see `SYMMETRIC_PRODUCTS`).
    """
    product = SYMMETRIC_PRODUCTS[symmetric]
    current = _normalised(x, schedule, eps)
    wide = torch.promote_types(x.dtype, torch.float32)
    # A rounded to bfloat16 is no longer positive semidefinite: its spurious negative eigenvalues
    # grow by a^2 per step (about 12 for keller) and overflow, so A is formed in `wide` too.
    wide_x = current.to(wide)
    gram = wide_x.new_empty((x.shape[0], x.shape[1], x.shape[1]))
    product(wide_x, wide_x.mT, gram)
    square, poly, cube = torch.empty_like(gram), torch.empty_like(gram), torch.empty_like(gram)
    q, spare = torch.empty_like(gram), torch.empty_like(gram)
    last = len(schedule.coefficients) - 1
    for i, (a, b, c) in enumerate(schedule.coefficients):
        product(gram, gram, square)
        torch.mul(gram, b, out=poly).add_(square, alpha=c)
        poly.diagonal(dim1=-2, dim2=-1).add_(a)
        if i == 0:
            q.copy_(poly)
        else:
            product(poly, q, spare)
            q, spare = spare, q
        if i < last:
            # a A + b A^2 + c A^3, then times P: the next Gram matrix
            torch.mul(gram, a, out=cube).add_(square, alpha=b)
            product(gram, square, cube, base=cube, alpha=c)
            product(cube, poly, gram)
    torch.bmm(q.to(x.dtype), current, out=out)


def _iterate(x: torch.Tensor, schedule: NSSchedule, eps: float, out: torch.Tensor,
             symmetric: str = "full") -> None:
    """Newton-Schulz on a batch `x` of shape (b, m, n) with m <= n, written into `out`;
    `symmetric` names how `X X^T` and `A^2` are computed (see `SYMMETRIC_PRODUCTS`)."""
    if uses_gram(schedule, x.shape[-2], x.shape[-1], x.dtype == torch.bfloat16):
        _iterate_gram(x, schedule, eps, out, symmetric)
        return
    # Every product writes into scratch allocated once; the last one writes into `out`.
    product = SYMMETRIC_PRODUCTS[symmetric]
    current = _normalised(x, schedule, eps)
    spare = torch.empty_like(current)
    gram = x.new_empty((x.shape[0], x.shape[1], x.shape[1]))
    poly = torch.empty_like(gram)
    last = len(schedule.coefficients) - 1
    for i, (a, b, c) in enumerate(schedule.coefficients):
        target = out if i == last else spare
        product(current, current.mT, gram)
        product(gram, gram, poly, base=gram, beta=b, alpha=c)
        torch.baddbmm(current, poly, current, beta=a, out=target)
        current, spare = target, current


def newton_schulz(x: torch.Tensor, schedule: NSSchedule, eps: float, *,
                  out: torch.Tensor | None = None, symmetric: str | None = None) -> torch.Tensor:
    """Orthogonalize every matrix of `x` (shape `(..., m, n)`) in one batched call.

    Semantics of `muon_core.orthogonalize`: work on `X^T` when `m > n`, divide by
    `max(norm_scale * ||X||_F, eps)`, then `X <- a X + (b A + c A^2) X` with `A = X X^T` for each
    `(a, b, c)` of the schedule, in `x.dtype` on `x.device`. The result goes to `out` when given
    (a contiguous tensor shaped like `x`, or like `x` with its last two axes swapped when
    `m > n`; `out` may be `x` itself), else to a new tensor; `x` is otherwise not modified.
    `symmetric` names how the symmetric products are computed (one of `SYMMETRIC_PRODUCTS`;
    default per device, see `symmetric_products`); every choice computes the same products.
    Returns the result shaped like `x`.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got {x.ndim=} "
                         f"with shape {tuple(x.shape)}")
    shape = x.shape
    work = x.reshape(-1, *shape[-2:])
    tall = shape[-2] > shape[-1]
    if tall:
        work = work.mT
    if out is None:
        out = torch.empty(work.shape, dtype=x.dtype, device=x.device)
    elif not out.is_contiguous() or out.numel() != work.numel() or out.dtype != x.dtype:
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of {work.numel()} values, "
                         f"got {out.dtype=}, {tuple(out.shape)=}, {out.is_contiguous()=}")
    result = out.view(work.shape)
    symmetric = symmetric_products(x.device, symmetric)
    count = work.shape[0]
    chunk = count if x.device.type != "cpu" else max(1, CPU_CHUNK_VALUES // work[0].numel())
    for start in range(0, count, chunk):
        _iterate(work[start:start + chunk], schedule, eps, result[start:start + chunk],
                 symmetric)
    return (result.mT if tall else result).reshape(shape)
