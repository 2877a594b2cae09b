"""Newton-Schulz in jax.numpy: same-shape blocks are stacked into one batched call."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import muon_core
from muon_core import DeviceFacts, NSSchedule, ns_schedule, resolve_dtype
from muon_core._ns import uses_gram

from muon_jax._chunks import in_chunks, stack_in_place


@functools.cache
def device_facts() -> DeviceFacts:
    """What `ns_dtype="auto"` needs to know about JAX's default device."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return DeviceFacts("cpu", cpu_flags=muon_core.host_cpu_flags())
    capability = getattr(device, "compute_capability", None)
    if device.platform in ("gpu", "cuda") and capability:
        major, minor = str(capability).split(".")[:2]
        return DeviceFacts("cuda", cuda_capability=(int(major), int(minor)))
    return DeviceFacts(device.platform)


def ns_dtype(name: str) -> Any:
    """The jnp dtype for a config's `ns_dtype` ("auto": decided for JAX's default device);
    float64 needs `jax_enable_x64`."""
    if name == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("ns_dtype='float64' needs jax.config.update('jax_enable_x64', True); "
                         "without it JAX silently computes in float32")
    return resolve_dtype(name, jnp, facts=device_facts() if name == "auto" else None)


# How Newton-Schulz computes its symmetric m x m products (`X X^T`, `A^2`, and every m x m
# product of the Gram form): "full" products, or "blocked": only strips of rows from the
# diagonal rightwards (about half the multiply-adds), the rest mirrored. None: "blocked" on CPU
# (measured faster there, docs/benchmarks.md), "full" elsewhere.
SYMMETRIC = ("full", "blocked")
# The choice when none is passed (read when an update is traced); None: per device.
SYMMETRIC_DEFAULT: str | None = None
# Rows per strip of the blocked product (read when traced); None: `_strip_rows`'s choice.
STRIP_ROWS: int | None = None


def symmetric_products(choice: str | None = None) -> str:
    """How the symmetric products are computed: `choice` when given (one of `SYMMETRIC`), else
    `SYMMETRIC_DEFAULT` when set, else "blocked" when JAX's default device is a CPU and "full"
    otherwise."""
    choice = choice or SYMMETRIC_DEFAULT
    if choice is None:
        return "blocked" if device_facts().kind == "cpu" else "full"
    if choice not in SYMMETRIC:
        raise ValueError(f"symmetric={choice!r} is invalid: expected one of {SYMMETRIC} or None")
    return choice


def _strip_rows(m: int) -> int:
    """About six strips, a multiple of 64 rows and at least 128."""
    return STRIP_ROWS or max(128, 64 * -(-m // (6 * 64)))


def _blocked_product(p: jax.Array, q: jax.Array, matmul: Any) -> jax.Array:
    """`p @ q^T` for `(..., m, k)` operands whose product is symmetric, from its upper strips:
    rows `[s, s + h)` of `p` times rows `[s, m)` of `q` per strip, the part left of each
    strip's diagonal block taken from the transpose. (XLA on CPU runs these row slices of
    both operands faster than column slices of `q^T`.)"""
    m = p.shape[-2]
    strip = _strip_rows(m)
    pad = [(0, 0)] * (p.ndim - 2)
    upper = jnp.concatenate(
        [jnp.pad(matmul(p[..., s:s + strip, :], q[..., s:, :].mT), pad + [(0, 0), (s, 0)])
         for s in range(0, m, strip)], axis=-2)
    # The upper triangle, mirrored: exactly symmetric, the diagonal blocks included.
    index = np.arange(m)
    return jnp.where(index[:, None] <= index[None, :], upper, upper.mT)


def _norm_factors(wide: jax.Array, schedule: NSSchedule,
                  eps: float) -> tuple[jax.Array, jax.Array]:
    """`(power, divisor)`, each `(..., 1, 1)`, with `_normalised(wide) = wide * power / divisor`."""
    biggest = jnp.max(jnp.abs(wide), axis=(-2, -1), keepdims=True)
    exponent = jnp.clip(jnp.frexp(biggest)[1], 0, -jnp.finfo(wide.dtype).minexp)
    power = jnp.ldexp(jnp.ones_like(biggest), -exponent)
    scaled = wide * power
    norm = jnp.sqrt(jnp.sum(scaled * scaled, axis=(-2, -1), keepdims=True)) * schedule.norm_scale
    return power, jnp.maximum(norm, eps * power)


def _normalised(wide: jax.Array, schedule: NSSchedule, eps: float,
                factors: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """`wide / max(norm_scale * ||wide||_F, eps)` per matrix. Both sides are first scaled by
    `2^-k`, `k >= 0` the binary exponent of the largest `|entry|` (at most that of the
    smallest normal number: XLA flushes subnormals to zero): exact, so no bit of the result
    changes, but the squares cannot overflow for entries up to the dtype's largest.
    `factors`: `_norm_factors(wide)` when already known."""
    power, divisor = _norm_factors(wide, schedule, eps) if factors is None else factors
    return wide * power / divisor


def _newton_schulz(x: jax.Array, schedule: NSSchedule, eps: float, symmetric: str = "full",
                   factors: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Orthogonalize a batch `(..., m, n)` with m <= n in `x.dtype` (`factors` as in
    `_normalised`).

    Matrix products take `x.dtype` inputs and accumulate in at least float32; the
    elementwise combinations, the Frobenius norm and the coefficients stay in that wider
    type, so bfloat16 rounds only what feeds the next product. `symmetric` (one of
    `SYMMETRIC`) names how the products with a symmetric result are computed.
    """
    acc = jnp.promote_types(x.dtype, jnp.float32)
    precision = lax.Precision.DEFAULT if x.dtype == jnp.bfloat16 else lax.Precision.HIGHEST

    def matmul(p: jax.Array, q: jax.Array) -> jax.Array:
        return jnp.matmul(p, q, precision=precision, preferred_element_type=acc)

    outer = _symmetric_matmul(symmetric, matmul, transpose_q=True)
    sym = _symmetric_matmul(symmetric, matmul, transpose_q=False)
    x = _normalised(x.astype(acc), schedule, eps, factors).astype(x.dtype)
    if uses_gram(schedule, x.shape[-2], x.shape[-1], x.dtype == jnp.bfloat16):
        q = _gram_iterations(outer(x, x), schedule, symmetric)
        return matmul(q.astype(x.dtype), x).astype(x.dtype)

    def iteration(x: jax.Array, abc: jax.Array) -> tuple[jax.Array, None]:
        a, b, c = abc[0], abc[1], abc[2]
        gram = outer(x, x)
        narrow = gram.astype(x.dtype)
        poly = (b * gram + c * sym(narrow, narrow)).astype(x.dtype)
        return (a * x + matmul(poly, x)).astype(x.dtype), None

    x, _ = lax.scan(iteration, x, jnp.asarray(schedule.coefficients, dtype=acc))
    return x


def _symmetric_matmul(symmetric: str, matmul: Any, transpose_q: bool) -> Any:
    """`p, q -> p @ q^T` (`transpose_q`) or `p @ q` (`q` symmetric) through `matmul`, for
    products with a symmetric result, computed as `symmetric` says. The blocked form reads
    rows of `q` either way (a symmetric `q`'s rows are its columns, and its own results are
    exactly symmetric); where it does not apply, the plain product keeps the iteration's
    rounding, which the Gram form amplifies for long schedules if `q^T` stands for `q`."""

    def product(p: jax.Array, q: jax.Array) -> jax.Array:
        if symmetric == "blocked" and _strip_rows(p.shape[-2]) < p.shape[-2]:
            return _blocked_product(p, q, matmul)
        return matmul(p, q.mT if transpose_q else q)

    return product


def _gram_iterations(gram: jax.Array, schedule: NSSchedule, symmetric: str = "full") -> jax.Array:
    """The m x m part of Gram Newton-Schulz (see `muon_core`): `Q` from `A = X X^T` (in
    float32 or wider, at the highest matmul precision). Every product is symmetric (all are
    polynomials in `A`), computed as `symmetric` says."""

    def matmul(p: jax.Array, q: jax.Array) -> jax.Array:
        return jnp.matmul(p, q, precision=lax.Precision.HIGHEST)

    sym = _symmetric_matmul(symmetric, matmul, transpose_q=False)
    eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
    q = None
    last = len(schedule.coefficients) - 1
    for i, (a, b, c) in enumerate(schedule.coefficients):
        square = sym(gram, gram)
        poly = a * eye + b * gram + c * square
        q = poly if q is None else sym(poly, q)
        if i < last:
            gram = sym(a * gram + b * square + c * sym(gram, square), poly)
    return q


def _stack_size(blocks: Sequence[jax.Array], indices: Sequence[int]) -> int:
    return sum(blocks[i].size for i in indices)


def orthogonalize_batch(blocks: Sequence[jax.Array], schedule: NSSchedule, eps: float,
                        dtype: Any, symmetric: str | None = None) -> list[jax.Array]:
    """Orthogonalize each `(batch, rows, cols)` block in `dtype`; results keep their inputs' dtype;
    `symmetric` as in `symmetric_products`.

    Tall blocks are transposed so rows <= cols; blocks of one oriented shape are stacked
    along the batch axis, and Newton-Schulz runs over that stack a few matrices at a time, in
    place (`in_chunks`), so its scratch stays a fraction of the stack. The stacks go largest
    first, each begun only once the previous one's result exists, so that XLA does not keep
    two stacks alive at once. The Frobenius norms are summed over the whole stack first
    (their rounding depends on the batch; the products' does not), so the numbers equal one
    call on the whole stack.
    """
    oriented = [b.astype(dtype).mT if b.shape[1] > b.shape[2] else b.astype(dtype)
                for b in blocks]
    groups: dict[tuple[int, int], list[int]] = {}
    for index, block in enumerate(oriented):
        groups.setdefault(block.shape[1:], []).append(index)
    results: list[Any] = [None] * len(blocks)
    symmetric = symmetric_products(symmetric)
    previous = None
    for indices in sorted(groups.values(), key=lambda ix: -_stack_size(oriented, ix)):
        stack = stack_in_place([oriented[i] for i in indices], after=previous)
        factors = _norm_factors(stack.astype(jnp.promote_types(dtype, jnp.float32)), schedule,
                                eps)
        stacked = in_chunks(lambda x, *f: _newton_schulz(x, schedule, eps, symmetric, f),
                            stack, *factors)
        previous = stacked
        ends = list(itertools.accumulate(oriented[i].shape[0] for i in indices))
        for i, piece in zip(indices, jnp.split(stacked, ends[:-1])):
            tall = blocks[i].shape[1] > blocks[i].shape[2]
            results[i] = (piece.mT if tall else piece).astype(blocks[i].dtype)
    return results


def orthogonalize(G: jax.Array, steps: int = 5, coefficients: Any = "keller", eps: float = 1e-7,
                  dtype: str | None = None, algorithm: str = "standard",
                  symmetric: str | None = None) -> jax.Array:
    """`muon_core.orthogonalize` in jax.numpy: the approximate polar factor of `G` (..., m, n).

    `dtype` names the working precision ("bfloat16", "float32", "float64"; default: the
    input's); the result has the input's dtype; `algorithm` as in the core; `symmetric` how
    the symmetric products are computed ("full" or "blocked"; default per device, see
    `symmetric_products`). Jittable; the schedule is static.
    """
    G = jnp.asarray(G)
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix or a batch of matrices, got {G.ndim=} "
                         f"with shape {tuple(G.shape)}")
    if not jnp.issubdtype(G.dtype, jnp.floating):
        raise TypeError(f"orthogonalize needs a real floating array, got {G.dtype=}")
    work = G.dtype if dtype is None else ns_dtype(dtype)
    tall = G.shape[-2] > G.shape[-1]
    x = G.astype(work).mT if tall else G.astype(work)
    x = _newton_schulz(x, ns_schedule(coefficients, steps, algorithm), eps,
                       symmetric_products(symmetric))
    return (x.mT if tall else x).astype(G.dtype)
