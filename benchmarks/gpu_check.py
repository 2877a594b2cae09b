"""One-shot GPU check: the Triton symmetric product, Newton-Schulz, the full step, JAX.

    PYTHONPATH=.:backends:conformance python benchmarks/gpu_check.py --out gpu_results
    PYTHONPATH=.:backends:conformance TRITON_INTERPRET=1 python benchmarks/gpu_check.py \\
        --device cpu --quick --out /tmp/gpu_check          # the logic, on tiny shapes

Sections, each in its own try/except (a failure is recorded and the next section runs):
(i) `muon_torch._triton_syrk.symmetric_product` against `torch.matmul` for `X X^T`: largest
    error relative to the float64 product, and time, for bf16 768x3072, 1024x4096, 4096x11008
    and a few tile sizes, plus float32 m x m products (the Gram form's);
(ii) Newton-Schulz in bf16: ours (gram, standard; symmetric products full, blocked, Triton) vs
    `torch.optim.Muon`'s, time and accuracy (singular values of the result, spectral distance
    to the exact polar factor from a float64 SVD), one matrix and a stack of 12;
(iii) one optimizer step on the GPT-2 small parameter set: `muon_torch.Muon` at its defaults
    against `torch.optim.Muon` + `torch.optim.AdamW` at theirs, and at the same settings;
(iv) JAX: the jitted `muon_jax` update against `optax.contrib.muon` on the same shapes.
Contenders are interleaved round by round after a warm-up; times are medians of CUDA-event
timings (synchronized). Results go to `--out`: results.json (every row and the machine) and
results.md (one table per section), rewritten after every section. A time budget
(`--budget`, seconds) skips what would start after it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Mapping

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX share the GPU

import torch  # noqa: E402

START = time.monotonic()
BUDGET = [225.0]  # seconds after START past which no further section or compilation starts


def over_budget() -> bool:
    """Whether the time budget is spent."""
    return time.monotonic() - START > BUDGET[0]


def log(message: str) -> None:
    """Progress on stdout, flushed, with the seconds since start."""
    print(f"[{time.monotonic() - START:6.1f}s] {message}", flush=True)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(contenders: Mapping[str, Callable[[], object]], device: torch.device, rounds: int,
          warmup: int = 2) -> dict[str, float]:
    """Median milliseconds per call of each contender, called in turn round by round; CUDA
    events on a GPU, the wall clock elsewhere."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - begin) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def working(contenders: dict[str, Callable[[], object]],
            failures: list[dict]) -> dict[str, Callable[[], object]]:
    """The contenders whose first call succeeds; a row for each one that fails goes to
    `failures` (a kernel that does not compile for one tile size leaves the others timed)."""
    kept = {}
    for name, fn in contenders.items():
        try:
            fn()
            kept[name] = fn
        except Exception as error:  # noqa: BLE001 (recorded)
            failures.append({"contender": name, "error": repr(error)[:300]})
            log(f"{name} failed: {error!r}")
    return kept


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference|, in float64."""
    return ((value.double() - reference).abs().max() / reference.abs().max()).item()


# (i) ---------------------------------------------------------------------------------------

def section_syrk(device: torch.device, quick: bool, rounds: int) -> list[dict]:
    """Triton symmetric product against torch.matmul for X X^T."""
    from muon_torch import _triton_syrk

    if not _triton_syrk.available():
        raise RuntimeError("triton cannot run here (no CUDA GPU; TRITON_INTERPRET not set)")
    shapes = [(32, 80), (48, 64)] if quick else [(768, 3072), (1024, 4096), (4096, 11008)]
    tiles = [(None, None), (32, 16)] if quick else [(None, None), (64, 64), (128, 32)]
    cases = [(torch.bfloat16, m, k) for m, k in shapes]
    # the Gram form multiplies float32 m x m matrices
    cases += [(torch.float32, m, m) for m in ((32,) if quick else (768, 1024))]
    rows = []
    for dtype, m, k in cases:
        x = torch.randn(1, m, k, device=device, dtype=torch.float32).to(dtype)
        reference = x.double() @ x.double().mT
        contenders = {"torch.matmul": lambda x=x: torch.matmul(x, x.mT)}
        for block, block_k in tiles:
            contenders[f"triton block={block or 'auto'},{block_k or 'auto'}"] = (
                lambda x=x, b=block, bk=block_k: _triton_syrk.symmetric_product(
                    x, block=b, block_k=bk))
        contenders = working(contenders, rows)
        errors = {name: relative_error(fn(), reference) for name, fn in contenders.items()}
        times = timed(contenders, device, rounds)
        flops = 2 * m * m * k
        for name in contenders:
            rows.append({"shape": f"{m}x{k}", "dtype": str(dtype).removeprefix("torch."),
                         "contender": name, "ms": times[name],
                         "TFLOP/s (full-GEMM flops)": flops / times[name] / 1e9,
                         "speed-up vs torch.matmul": times["torch.matmul"] / times[name],
                         "max rel err vs float64": errors[name]})
        log(f"syrk {m}x{k} {dtype}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()))
    return rows


# (ii) --------------------------------------------------------------------------------------

def peer_orthogonalize() -> Callable | None:
    """torch.optim.Muon's Newton-Schulz function, looked up defensively across versions."""
    import torch.optim._muon as peer

    for name in ("_zeropower_via_newtonschulz", "zeropower_via_newtonschulz",
                 "_zeropower_via_newtonschulz5"):
        if hasattr(peer, name):
            return getattr(peer, name)
    return None


def polar_factor(g: torch.Tensor) -> torch.Tensor:
    """`U V^T` of a wide `g = U S V^T` (m <= n), in float64: `(g g^T)^(-1/2) g` by one m x m
    eigendecomposition (cheaper than an SVD of g; exact for the full-rank test matrices)."""
    g = g.double()
    values, vectors = torch.linalg.eigh(g @ g.mT)
    return (vectors * values.rsqrt()) @ vectors.mT @ g


def _singular_values(x: torch.Tensor) -> torch.Tensor:
    """Singular values of a wide float64 matrix, from the eigenvalues of `x x^T`."""
    return torch.linalg.eigvalsh(x @ x.mT).clamp_min(0).sqrt()


def polar_accuracy(result: torch.Tensor, polar: torch.Tensor) -> dict:
    """Singular values (min, max) of `result` and its spectral distance to `polar`, in
    float64."""
    sigma = _singular_values(result.double())
    distance = _singular_values(result.double() - polar).max()
    return {"sigma min": sigma.min().item(), "sigma max": sigma.max().item(),
            "spectral distance to UV^T": distance.item()}


def test_matrices(m: int, n: int, count: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Gaussian matrices, and matrices with singular values spread from 1 to 1e-3 (closer to
    momentum buffers' spectra)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    gauss = torch.randn(count, m, n, generator=generator)
    u, _, vh = torch.linalg.svd(torch.randn(m, n, generator=generator), full_matrices=False)
    spread = (u * torch.logspace(0, -3, min(m, n))) @ vh
    return {"gaussian": gauss.to(device),
            "spread spectrum": spread.expand(count, m, n).contiguous().to(device)}


def section_newton_schulz(device: torch.device, quick: bool, rounds: int) -> list[dict]:
    """Our bf16 Newton-Schulz (gram/standard; full, blocked or Triton symmetric products)
    against torch.optim.Muon's."""
    import muon_core
    from muon_torch import _triton_syrk
    from muon_torch._newton_schulz import newton_schulz

    peer = peer_orthogonalize()
    keller = muon_core.ns_schedule("keller", 1).coefficients[0]
    triton_ok = _triton_syrk.available()
    shapes = [(24, 96), (32, 64)] if quick else [(768, 3072), (1024, 4096)]
    counts = (1, 3) if quick else (1, 12)
    rows = []
    for m, n in shapes:
        for count in counts:
            for kind, g in test_matrices(m, n, count, device).items():
                if kind != "gaussian" and count != 1:
                    continue
                bf = g.bfloat16()
                contenders = {}
                for algorithm in ("gram", "standard"):
                    schedule = muon_core.ns_schedule("keller", 5, algorithm)
                    for symmetric in ("full", "blocked") + (("triton",) if triton_ok else ()):
                        name = f"ours {algorithm}, {symmetric} products"
                        contenders[name] = (lambda s=schedule, t=symmetric, bf=bf:
                                            newton_schulz(bf, s, 1e-7, symmetric=t))
                if peer is not None:
                    contenders["torch.optim.Muon NS"] = lambda bf=bf: [
                        peer(v, keller, 5, 1e-7) for v in bf]
                contenders = working(contenders, rows)
                # accuracy on the one-matrix runs (a stack repeats the same computation)
                polar = polar_factor(g[0]) if count == 1 else None
                accuracy = {name: polar_accuracy(fn()[0].float(), polar) if count == 1 else {}
                            for name, fn in contenders.items()}
                times = timed(contenders, device, rounds) if kind == "gaussian" else {}
                for name in contenders:
                    timing = {"ms": times[name]} if name in times else {}
                    rows.append({"shape": f"{count}x{m}x{n}", "matrices": kind,
                                 "contender": name, **timing, **accuracy[name]})
                log(f"NS {count}x{m}x{n} {kind}: " + ", ".join(
                    f"{k} {v:.3f} ms" for k, v in times.items()))
    return rows


# (iii) -------------------------------------------------------------------------------------

def section_step(device: torch.device, quick: bool, rounds: int) -> list[dict]:
    """One step on GPT-2 small: muon_torch.Muon against torch.optim.Muon + AdamW."""
    import muon_core
    from muon_cli.benchtools import gpt2_shapes
    from muon_core import MuonConfig
    from muon_torch import Muon, _newton_schulz, _triton_syrk
    from muon_torch.bench import SETTINGS, peer_optimizers

    shapes = gpt2_shapes(n_layer=1, d_model=64, vocab=100, context=32) if quick \
        else gpt2_shapes()

    def params(seed: int = 0) -> dict[str, torch.nn.Parameter]:
        generator = torch.Generator(device=device).manual_seed(seed)
        out = {}
        for name, shape in shapes.items():
            scale = 1 / math.sqrt(shape[-1])
            out[name] = torch.nn.Parameter(
                torch.randn(shape, generator=generator, device=device) * scale)
            out[name].grad = torch.randn(shape, generator=generator, device=device) * scale
        return out

    def ours(config: MuonConfig) -> Callable[[], object]:
        return Muon(list(params().items()), config).step

    def peer_defaults() -> Callable[[], object]:
        given = params()
        plan = muon_core.plan(shapes, MuonConfig())
        pair = [torch.optim.Muon([given[e.name] for e in plan.muon]),
                torch.optim.AdamW([given[e.name] for e in plan.adamw])]
        return lambda: [opt.step() for opt in pair]

    def peer_same() -> Callable[[], object]:
        pair = peer_optimizers(params(), SETTINGS)
        return lambda: [opt.step() for opt in pair.values()]

    default = MuonConfig()
    log(f"our defaults: ns_algorithm={default.ns_algorithm}, "
        + muon_core.describe_ns_dtype(default.ns_dtype, _newton_schulz.device_facts(device)))
    comparisons = [("defaults", {"ours (defaults)": ours(default),
                                 "torch.optim.Muon + AdamW (defaults)": peer_defaults()}),
                   ("same settings (bf16, standard, keller-5, no QKV split)",
                    {"ours (same settings)": ours(SETTINGS),
                     "torch.optim.Muon + AdamW (same settings)": peer_same()})]
    if device.type == "cuda" and _triton_syrk.available():
        comparisons[0][1]["ours (defaults) + triton"] = with_kernel(ours(default))
    rows = []
    for title, contenders in comparisons:
        times = timed(contenders, device, rounds, warmup=2)
        peer = [t for n, t in times.items() if n.startswith("torch.optim")][0]
        for name, ms in times.items():
            rows.append({"comparison": title, "contender": name, "ms": ms,
                         "speed-up vs peer": peer / ms})
        log(f"step {title}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in times.items()))
    return rows


def with_kernel(step: Callable[[], object]) -> Callable[[], object]:
    """`step` with `CUDA_SYMMETRIC_PRODUCTS` switched on while it runs."""
    from muon_torch import _newton_schulz

    def call() -> object:
        previous = _newton_schulz.CUDA_SYMMETRIC_PRODUCTS
        _newton_schulz.CUDA_SYMMETRIC_PRODUCTS = True
        try:
            return step()
        finally:
            _newton_schulz.CUDA_SYMMETRIC_PRODUCTS = previous

    return call


# (iv) --------------------------------------------------------------------------------------

def section_jax(device: torch.device, quick: bool, rounds: int) -> list[dict]:
    """The jitted muon_jax update against optax.contrib.muon on GPT-2 small."""
    import jax
    from muon_cli.benchtools import gpt2_shapes, interleaved_times
    from muon_core import MuonConfig
    from muon_jax._transform import muon
    from muon_jax.bench import SETTINGS, _random, _timed_update, in_out_shapes, peer_transform

    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"jax {jax.__version__} devices: {jax.devices()}")
    shapes = gpt2_shapes(n_layer=1, d_model=64, vocab=100, context=32) if quick \
        else gpt2_shapes()
    flax_shapes = in_out_shapes(shapes)
    params, grads = _random(flax_shapes, 0), _random(flax_shapes, 1)
    log("compiling optax.contrib.muon")
    peer = _timed_update(peer_transform(params, SETTINGS), params, grads)
    rows = []
    for what, config in [("same settings (fp32 NS, standard)", SETTINGS),
                         ("our defaults (ns_dtype and ns_algorithm auto, QKV split)",
                          MuonConfig()),
                         ("bf16 NS, standard", SETTINGS.replace(ns_dtype="bfloat16")),
                         ("fp32 NS, gram", SETTINGS.replace(ns_algorithm="gram"))]:
        if over_budget():
            log(f"jax {what}: skipped (budget)")
            continue
        log(f"compiling muon_jax: {what}")
        ours = _timed_update(muon(config), params, grads)
        times = interleaved_times({"ours": ours, "peer": peer}, rounds=rounds, warmup=1)
        rows.append({"comparison": what, "ours ms": times["ours"] * 1e3,
                     "optax.contrib.muon ms": times["peer"] * 1e3,
                     "speed-up vs optax": times["peer"] / times["ours"]})
        log(f"jax {what}: ours {times['ours'] * 1e3:.2f} ms, optax {times['peer'] * 1e3:.2f} ms")
    return rows


# -------------------------------------------------------------------------------------------

SECTIONS = {"syrk": section_syrk, "newton_schulz": section_newton_schulz, "step": section_step,
            "jax": section_jax}


def machine(device: torch.device) -> dict:
    """Versions and the device, for the record."""
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device),
                 "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                 "cuda": torch.version.cuda,
                 "tf32 matmul": torch.backends.cuda.matmul.allow_tf32}
    for module in ("triton", "jax", "optax"):
        try:
            info[module] = __import__(module).__version__
        except Exception as error:  # noqa: BLE001 (recorded, not fatal)
            info[module] = f"not available: {error!r}"
    return info


def markdown(results: dict) -> str:
    """One table per section, then the errors."""
    lines = ["# GPU check", "", "```", json.dumps(results["machine"], indent=1), "```", ""]
    for section, rows in results["sections"].items():
        lines += [f"## {section}", ""]
        if isinstance(rows, dict):
            lines += ["```", rows.get("error", ""), "```", ""]
            continue
        if not rows:
            lines += ["(no rows)", ""]
            continue
        keys = list(dict.fromkeys(k for row in rows for k in row))
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for row in rows:
            cells = [row.get(k, "") for k in keys]
            lines.append("| " + " | ".join(
                f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def save(results: dict, out: str) -> None:
    """results.json and results.md in `out`."""
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown(results))


def main(argv: list[str] | None = None) -> int:
    """Run the sections in order, saving after each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a logic check)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--budget", type=float, default=225.0,
                        help="seconds after which no further section starts")
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    args = parser.parse_args(argv)
    BUDGET[0] = args.budget
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    rounds = args.rounds or (3 if args.quick else 15)
    results = {"machine": machine(device), "sections": {}}
    log(json.dumps(results["machine"]))
    for name in args.sections:
        if over_budget():
            results["sections"][name] = {"error": f"skipped: past the {args.budget} s budget"}
            log(f"{name}: skipped (budget)")
            save(results, args.out)
            continue
        log(f"--- {name}")
        try:
            results["sections"][name] = SECTIONS[name](device, args.quick, rounds)
        except Exception:  # noqa: BLE001 (recorded; the next section still runs)
            results["sections"][name] = {"error": traceback.format_exc()}
            log(f"{name} failed:\n{traceback.format_exc()}")
        save(results, args.out)
    log(f"done; wrote {args.out}/results.json and {args.out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
