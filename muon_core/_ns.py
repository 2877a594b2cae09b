"""Newton-Schulz orthogonalization on any Array API array."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from array_api_compat import array_namespace
from array_api_compat import device as array_device

KELLER = (3.4445, -4.7750, 2.0315)
# You Jiacheng's per-iteration quintic schedule.
QUINTIC = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
# Polar Express (Amsel et al., 2025), raw optimal coefficients; later steps use the limit.
POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
)
POLAR_EXPRESS_LIMIT = (1.875, -1.25, 0.375)
# The safe variant trades a little speed for headroom against round-off in low precision.
POLAR_EXPRESS_SAFETY = 1.01
PRESETS = ("keller", "quintic", "polar_express", "polar_express_raw")
# How the iteration is computed: "standard" on X, or "gram" on the small side's Gram matrix.
NS_ALGORITHMS = ("auto", "standard", "gram")
# "gram" saves work only on rectangular blocks: for an m x n block (m <= n) five standard steps
# cost 20 m^2 n + 10 m^3 flops and five Gram steps 4 m^2 n + 34 m^3, equal at n = 1.5 m.
GRAM_MIN_ASPECT = 1.5
# Working precisions of Newton-Schulz, by name; "auto" picks one of the others per device.
NS_DTYPES = ("auto", "bfloat16", "float32", "float64")
# CPU feature flags (as /proc/cpuinfo spells them) that mean native bfloat16 matrix products.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# Vector capabilities (as `torch.backends.cpu.get_cpu_capability()` reports them) whose kernels
# can use those instructions; None means the framework does not report one (JAX).
BF16_CPU_CAPABILITIES = (None, "AVX512")


class NSSchedule(NamedTuple):
    """Coefficients `(a, b, c)` of each iteration, the factor applied to the Frobenius norm, and
    the algorithm ("standard" or "gram", see `NS_ALGORITHMS`)."""

    coefficients: tuple[tuple[float, float, float], ...]
    norm_scale: float = 1.0
    algorithm: str = "standard"


def _extend(schedule: Sequence[tuple[float, float, float]], steps: int,
            tail: tuple[float, float, float]) -> tuple[tuple[float, float, float], ...]:
    schedule = tuple(tuple(map(float, t)) for t in schedule)
    return schedule[:steps] + (tuple(map(float, tail)),) * max(0, steps - len(schedule))


def normalise_coefficients(value: Any) -> str | tuple[tuple[float, float, float], ...]:
    """A preset name as is; an `(a, b, c)` tuple or a list of them as a tuple of float triples."""
    if isinstance(value, str):
        return value
    number = (int, float)
    if isinstance(value, Sequence) and len(value) == 3 and all(
            isinstance(v, number) and not isinstance(v, bool) for v in value):
        value = (value,)
    if isinstance(value, Sequence) and value and all(
            isinstance(t, Sequence) and len(t) == 3 and all(
                isinstance(v, number) and not isinstance(v, bool) and math.isfinite(v) for v in t)
            for t in value):
        return tuple(tuple(float(v) for v in t) for t in value)
    raise ValueError(f"ns_coefficients={value!r} is invalid: expected one of {list(PRESETS)}, "
                     "an (a, b, c) tuple of finite numbers or a list of them")


def ns_schedule(coefficients: Any = "keller", steps: int = 5,
                algorithm: str = "standard") -> NSSchedule:
    """Resolve a preset name, an `(a, b, c)` tuple or a list of tuples into `steps` iterations
    computed by `algorithm` (one of `NS_ALGORITHMS`).

    A schedule shorter than `steps` repeats its last entry (Polar Express: its limit).
    """
    if algorithm not in NS_ALGORITHMS:
        raise ValueError(f"ns_algorithm={algorithm!r} is invalid: expected one of "
                         f"{list(NS_ALGORITHMS)}")
    return _coefficient_schedule(coefficients, steps)._replace(algorithm=algorithm)


def _coefficient_schedule(coefficients: Any, steps: int) -> NSSchedule:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"ns_steps={steps!r} is invalid: expected a positive int")
    if isinstance(coefficients, str):
        if coefficients == "keller":
            return NSSchedule(_extend((KELLER,), steps, KELLER))
        if coefficients == "quintic":
            return NSSchedule(_extend(QUINTIC, steps, QUINTIC[-1]))
        if coefficients == "polar_express_raw":
            return NSSchedule(_extend(POLAR_EXPRESS_RAW, steps, POLAR_EXPRESS_LIMIT))
        if coefficients == "polar_express":
            s = POLAR_EXPRESS_SAFETY
            raw = _extend(POLAR_EXPRESS_RAW, steps, POLAR_EXPRESS_LIMIT)
            return NSSchedule(tuple((a / s, b / s**3, c / s**5) for a, b, c in raw), s)
        raise ValueError(f"ns_coefficients={coefficients!r} is invalid: expected one of "
                         f"{list(PRESETS)}, an (a, b, c) tuple or a list of them")
    coefficients = normalise_coefficients(coefficients)
    return NSSchedule(_extend(coefficients, steps, coefficients[-1]))


def _matrix_transpose(x: Any, xp: Any) -> Any:
    return xp.matrix_transpose(x) if hasattr(xp, "matrix_transpose") else xp.swapaxes(x, -1, -2)


def _is_bfloat16(dtype: Any, xp: Any) -> bool:
    bfloat16 = getattr(xp, "bfloat16", None)
    return bfloat16 is not None and dtype == bfloat16


def _frobenius_norm(x: Any, xp: Any) -> Any:
    """Norm over the last two axes, accumulated in float64 where the namespace has it."""
    wide = getattr(xp, "float64", None)
    acc = x if wide is None else xp.astype(x, wide)
    norm = xp.sqrt(xp.sum(acc * acc, axis=(-2, -1), keepdims=True))
    return xp.astype(norm, x.dtype)


def _normalised(x: Any, schedule: NSSchedule, eps: float, xp: Any) -> Any:
    """`x / max(norm_scale * ||x||_F, eps)` per matrix. Both sides are first scaled by `2^-k`,
    `k >= 0` the binary exponent of the largest `|entry|` (0 below 1; at most that of the
    smallest normal number, which libraries flushing subnormals keep): exact, so no bit of the
    result changes, but the norm stays finite for entries up to the dtype's largest, also
    where it is accumulated in x's own dtype."""
    biggest = xp.max(xp.abs(x), axis=(-2, -1), keepdims=True)
    largest_k = round(-math.log2(xp.finfo(x.dtype).smallest_normal))
    exponent = xp.clip(xp.floor(xp.log2(xp.maximum(biggest, xp.full_like(biggest, 0.5)))) + 1,
                       min=0, max=largest_k)
    power = xp.pow(xp.full_like(biggest, 2.0), -exponent)
    scaled = x * power
    norm = _frobenius_norm(scaled, xp) * schedule.norm_scale
    return scaled / xp.maximum(norm, eps * power)


def uses_gram(schedule: NSSchedule, rows: int, cols: int, bfloat16: bool = False) -> bool:
    """Whether a block of `rows x cols` (either orientation) takes the Gram iteration;
    `bfloat16`: whether the working precision is bfloat16 (see `resolve_algorithm`)."""
    small, large = sorted((rows, cols))
    return (resolve_algorithm(schedule.algorithm, bfloat16) == "gram"
            and large >= GRAM_MIN_ASPECT * small)


def resolve_algorithm(algorithm: str, bfloat16: bool) -> str:
    """The iteration `ns_algorithm` stands for: "auto" is "gram" in float32 or wider and
    "standard" in bfloat16, where the Gram form's m x m iterations, which need at least float32,
    would leave the bfloat16 matrix units (measured 1.6 to 4 times slower on an H200 GPU)."""
    if algorithm != "auto":
        return algorithm
    return "standard" if bfloat16 else "gram"


def _gram_iterations(x: Any, schedule: NSSchedule, xp: Any) -> Any:
    """The Gram form of Newton-Schulz on `x` (m <= n, normalised): returns `Q` with `Q X` the
    result of the standard iteration.

    Each step's polynomial `P = a I + b A + c A^2` is a polynomial in `A = X X^T`, so
    `X_{k+1} = P X_k` gives `X_k = Q_k X_0` with `Q_{k+1} = P Q_k` and
    `A_{k+1} = P A P = (a A + b A^2 + c A^3) P`: every product but the last is m x m. `A` is
    formed and iterated in at least float32: rounded to bfloat16 it has spurious negative
    eigenvalues, which the iteration multiplies by about `a^2` per step until they overflow.
    """
    wide = x.dtype if x.dtype in (xp.float32, getattr(xp, "float64", None)) else xp.float32
    wide_x = xp.astype(x, wide)
    return gram_polynomial(wide_x @ _matrix_transpose(wide_x, xp), schedule, xp=xp)


def gram_polynomial(gram: Any, schedule: NSSchedule, *, xp: Any) -> Any:
    """`Q` of the Gram form from `A = X X^T` of a normalised `X` (see `_gram_iterations`):
    `Q X` is Newton-Schulz of `X`. Tensor-parallel ranks that sum their pieces' `X Xᵀ` share
    one `A` and apply `Q` to their own columns."""
    eye = xp.eye(gram.shape[-1], dtype=gram.dtype, device=array_device(gram))
    q = None
    last = len(schedule.coefficients) - 1
    for i, (a, b, c) in enumerate(schedule.coefficients):
        square = gram @ gram
        poly = a * eye + b * gram + c * square
        q = poly if q is None else poly @ q
        if i < last:
            gram = (a * gram + b * square + c * (gram @ square)) @ poly
    return q


def _newton_schulz(x: Any, schedule: NSSchedule, eps: float, *, xp: Any) -> Any:
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = _matrix_transpose(x, xp)
    x = _normalised(x, schedule, eps, xp)
    if uses_gram(schedule, x.shape[-2], x.shape[-1], _is_bfloat16(x.dtype, xp)):
        x = xp.astype(_gram_iterations(x, schedule, xp), x.dtype) @ x
    else:
        for a, b, c in schedule.coefficients:
            gram = x @ _matrix_transpose(x, xp)
            poly = b * gram + c * (gram @ gram)
            x = a * x + poly @ x
    return _matrix_transpose(x, xp) if tall else x


class DeviceFacts(NamedTuple):
    """What a backend reports about the device that runs Newton-Schulz.

    `kind`: "cpu", "cuda", "tpu", or another device name (torch's device type, JAX's platform,
    with JAX's "gpu" on NVIDIA hardware reported as "cuda"); `cuda_capability`: the GPU's
    compute capability `(major, minor)`; `cpu_capability`: torch's CPU vector capability
    ("AVX2", "AVX512", ...; None where the framework does not report one); `cpu_flags`: the
    host CPU's feature flags as /proc/cpuinfo lists them.
    """

    kind: str
    cuda_capability: tuple[int, int] | None = None
    cpu_capability: str | None = None
    cpu_flags: frozenset[str] = frozenset()


def host_cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the host CPU from /proc/cpuinfo; empty where it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def auto_ns_dtype(facts: DeviceFacts | None) -> tuple[str, str]:
    """The working precision `ns_dtype="auto"` picks, and why: `(dtype name, reason)`.

    bfloat16 where the device multiplies bfloat16 matrices natively: TPUs, CUDA GPUs of
    compute capability 8.0 or later (bfloat16 tensor cores), and CPUs with AVX512-BF16 or AMX
    whose framework kernels use them. float32 everywhere else (older GPUs, AVX2 CPUs, Apple
    MPS, unknown devices), where bfloat16 products are emulated and many times slower.
    """
    if facts is None:
        return "float32", "no device facts"
    if facts.kind == "tpu":
        return "bfloat16", "TPU"
    if facts.kind == "cuda":
        capability = facts.cuda_capability
        if capability is not None and tuple(capability) >= (8, 0):
            return "bfloat16", f"CUDA compute capability {capability[0]}.{capability[1]}"
        shown = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        return "float32", f"CUDA compute capability {shown} < 8.0"
    if facts.kind == "cpu":
        flags = sorted(set(BF16_CPU_FLAGS) & set(facts.cpu_flags))
        shown = facts.cpu_capability or "CPU"
        if not flags:
            return "float32", f"{shown} without avx512_bf16/amx_bf16"
        if facts.cpu_capability in BF16_CPU_CAPABILITIES:
            return "bfloat16", f"{shown} with {'/'.join(flags)}"
        return "float32", f"{shown} kernels, which do not use {'/'.join(flags)}"
    return "float32", f"device {facts.kind!r}"


def describe_ns_dtype(name: str, facts: DeviceFacts | None, algorithm: str = "standard") -> str:
    """One line for plan tables: the working precision `name` stands for on this device, and,
    for `algorithm="auto"`, the iteration it picks there (`resolve_algorithm`)."""
    dtype, reason = (name, "") if name != "auto" else auto_ns_dtype(facts)
    line = f"Newton-Schulz in {dtype}" + (f" (ns_dtype='auto': {reason})" if reason else "")
    if algorithm != "auto":
        return line
    chosen = resolve_algorithm(algorithm, dtype == "bfloat16")
    return f"{line}, {chosen} iteration (ns_algorithm='auto')"


def resolve_dtype(name: str, xp: Any, key: str = "ns_dtype",
                  facts: DeviceFacts | None = None) -> Any:
    """The namespace's dtype called `name` (one of `NS_DTYPES`); float32 where it has no
    bfloat16 (numpy). "auto" follows `auto_ns_dtype(facts)`. `key` names the argument in
    error messages."""
    if name not in NS_DTYPES:
        raise ValueError(f"{key}={name!r} is invalid: expected one of {list(NS_DTYPES)}")
    if name == "auto":
        name = auto_ns_dtype(facts)[0]
    dtype = getattr(xp, name, None)
    if dtype is None and name == "bfloat16":
        dtype = xp.float32
    if dtype is None:
        raise ValueError(f"{key}={name!r} is not available in {xp.__name__}")
    return dtype


def orthogonalize(G: Any, steps: int = 5, coefficients: Any = "keller", eps: float = 1e-7,
                  dtype: str | None = None, algorithm: str = "standard") -> Any:
    """Approximate the orthogonal polar factor `U V^T` of `G = U S V^T` by Newton-Schulz.

    `G` is any Array API array with shape `(..., m, n)`; leading axes are a batch. The
    input is normalised by its Frobenius norm (at least `eps`), transposed so that rows <= cols
    and back, and iterated `X <- a X + (b A + c A^2) X` with `A = X X^T`. `dtype` names the
    working precision ("bfloat16", "float32", "float64"; default: the input's); the result
    has the input's dtype. `algorithm="gram"` computes the same polynomial on the small side's
    Gram matrix where the block is at least `GRAM_MIN_ASPECT` times wider than tall (fewer
    flops; the standard iteration elsewhere). The input is never modified.
    """
    xp = array_namespace(G)
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix or a batch of matrices, got {G.ndim=} "
                         f"with shape {tuple(G.shape)}")
    if not xp.isdtype(G.dtype, "real floating"):
        raise TypeError(f"orthogonalize needs a real floating array, got {G.dtype=}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"{eps=} is invalid: expected a finite number > 0 (the norm's floor, "
                         "which keeps NS(0) = 0 free of NaN)")
    schedule = ns_schedule(coefficients, steps, algorithm)
    work = G if dtype is None else xp.astype(G, resolve_dtype(dtype, xp, key="dtype"))
    return xp.astype(_newton_schulz(work, schedule, eps, xp=xp), G.dtype)
