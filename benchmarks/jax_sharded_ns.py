"""Per-device Newton-Schulz flops and collective bytes of one JAX update on 1, 2, 4, 8 devices.

Usage: python benchmarks/jax_sharded_ns.py [--devices 1 2 4 8] [--params replicated fsdp]
[--ns-dtype float32]

For each device count a fresh interpreter (the device count is fixed when JAX starts; the
interpreters run side by side, nothing is timed) compiles
one update of the GPT-2 small parameter set (`muon_cli.benchtools.gpt2_shapes`, float32) for abstract
inputs, with the parameters replicated (data parallel) or sharded along their first divisible
axis (FSDP), and reads the compiled per-device HLO:

- NS GFLOP/device: 2 * |result| * |contracted| of every dot, times the trip count of the loops
  around it (XLA's `cost_analysis()` counts a loop body once, so it under-reports a 5-step
  Newton-Schulz loop); the update's other work has no dots.
- MB moved/device: the result bytes of every all-gather, all-to-all, reduce-scatter,
  all-reduce and collective-permute, times loop trip counts.

Contenders: muon_jax with `sharded_ns="owner"` (explicit and auto axes), with
`sharded_ns="replicated"` (every device runs every Newton-Schulz: explicit axes gather the
matrices first; auto axes leave the partitioning to XLA), and optax.contrib.muon (auto axes;
it orthogonalizes a fused QKV as one matrix, so its total flops differ).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys

COLLECTIVES = ("all-gather", "all-to-all", "reduce-scatter", "all-reduce", "collective-permute")
BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1,
         "u8": 1}
SHAPE = re.compile(r"\b(f64|f32|bf16|f16|s32|u32|pred|s8|u8)\[([\d,]*)\]")


def _size(dims: str) -> int:
    return math.prod(int(d) for d in dims.split(",") if d)


def _computations(hlo: str) -> dict[str, list[str]]:
    """Instruction lines of each computation of an HLO module, by name ("ENTRY" for the entry)."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            current = "ENTRY" if header.group(1) else header.group(2)
            comps[current] = [line]
        elif current is not None and line.strip() and line.strip() != "}":
            comps[current].append(line.strip())
    return comps


def _multiplicity(comps: dict[str, list[str]]) -> dict[str, int]:
    """How many times each computation runs per call of the entry (while trip counts)."""
    times = {"ENTRY": 1}
    stack = ["ENTRY"]
    while stack:
        name = stack.pop()
        for line in comps[name][1:]:
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            for key, child in re.findall(r"\b(calls|body|condition|to_apply|branch_computations)"
                                         r"=\{?%([\w.\-]+)", line):
                if child in comps and key != "to_apply":
                    factor = int(trip.group(1)) if trip and key == "body" else 1
                    times[child] = times.get(child, 0) + times[name] * factor
                    stack.append(child)
    return times


def hlo_counts(hlo: str) -> tuple[float, float]:
    """(dot flops, collective result bytes) of one call of a compiled per-device HLO module."""
    comps = _computations(hlo)
    times = _multiplicity(comps)
    flops = moved = 0.0
    for name, lines in comps.items():
        shapes = {m.group(1): m.group(2) for m in re.finditer(
            r"([\w.\-]+): (?:f64|f32|bf16|f16)\[([\d,]*)\]", lines[0])}
        for line in lines[1:]:
            lhs = re.match(r"(?:ROOT )?%([\w.\-]+) = (?:f64|f32|bf16|f16)\[([\d,]*)\]", line)
            if lhs:
                shapes[lhs.group(1)] = lhs.group(2)
            dot = re.search(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+),.*lhs_contracting_dims=\{"
                            r"([\d,]*)\}", line)
            if dot:
                left = [int(d) for d in shapes[dot.group(2)].split(",") if d]
                contracted = math.prod(left[int(i)] for i in dot.group(3).split(",") if i)
                flops += times.get(name, 0) * 2 * _size(dot.group(1)) * contracted
            op = re.search(r"= (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
            if op:
                moved += times.get(name, 0) * sum(
                    BYTES[t] * _size(d) for t, d in SHAPE.findall(op.group(1)))
    return flops, moved


def _worker(ns_dtype: str, kinds: list[str]) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import muon_jax
    from muon_cli.benchtools import gpt2_shapes
    from muon_core import MuonConfig, plan

    n = jax.device_count()
    shapes = gpt2_shapes()
    config = MuonConfig(ns_dtype=ns_dtype)
    dims = {e.name: optax.contrib.MuonDimensionNumbers(1, 0) if e.is_muon else None
            for e in plan(shapes, config, layout="out_in")}

    def spec(shape, kind):
        axis = next((i for i, s in enumerate(shape) if s % n == 0), None)
        return P(*("data" if kind == "fsdp" and i == axis else None for i in range(len(shape))))

    def measure(tx, axis_type, kind):
        mesh = jax.make_mesh((n,), ("data",), axis_types=(getattr(AxisType, axis_type),))
        tx = tx(mesh)
        args = {k: jax.ShapeDtypeStruct(s, jnp.float32,
                                        sharding=NamedSharding(mesh, spec(s, kind)))
                for k, s in shapes.items()}
        step = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))
        return hlo_counts(step.lower(args, args).compile().as_text())

    contenders = {
        "muon_jax owner (explicit axes)": (lambda m: muon_jax.muon(
            config, layout="out_in", mesh=m, axis="data"), "Explicit"),
        "muon_jax owner (auto axes)": (lambda m: muon_jax.muon(
            config, layout="out_in", mesh=m, axis="data"), "Auto"),
        "muon_jax replicated (explicit axes: gather, NS everywhere)": (lambda m: muon_jax.muon(
            config, layout="out_in", mesh=m, axis="data", sharded_ns="replicated"), "Explicit"),
        "muon_jax replicated (auto axes: XLA partitions)": (lambda m: muon_jax.muon(
            config, layout="out_in", sharded_ns="replicated"), "Auto"),
        "optax.contrib.muon (auto axes: XLA partitions)": (lambda m: optax.contrib.muon(
            0.02, muon_weight_dimension_numbers=dims), "Auto"),
    }
    for kind in kinds:
        for name, (tx, axis_type) in contenders.items():
            flops, moved = measure(tx, axis_type, kind)
            print(json.dumps({"devices": n, "params": kind, "contender": name,
                              "gflop": flops / 1e9, "mb": moved / 1e6}), flush=True)


def table(rows: list[dict]) -> str:
    """The markdown table of measured rows. The ratio column divides by (whole update / N),
    the whole update being the largest per-device figure of the same library (a device that
    runs every Newton-Schulz)."""
    whole: dict[str, float] = {}
    for r in rows:
        library = r["contender"].split()[0]
        whole[library] = max(whole.get(library, 0.0), r["gflop"])
    lines = ["| params | devices | contender | NS GFLOP/device | x (whole / N) "
             "| MB moved/device |", "|---|---:|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["params"], r["devices"])):
        base = whole[r["contender"].split()[0]]
        ratio = f"{r['gflop'] / (base / r['devices']):.3f}" if base else "-"
        lines.append(f"| {r['params']} | {r['devices']} | {r['contender']} | {r['gflop']:.1f} | "
                     f"{ratio} | {r['mb']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--ns-dtype", default="float32")
    parser.add_argument("--params", nargs="+", default=["replicated", "fsdp"],
                        choices=["replicated", "fsdp"], help="parameter layouts to measure")
    parser.add_argument("--rows", help="print the table of rows saved from workers' output")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args.ns_dtype, args.params)
    if args.rows:
        return print(table([json.loads(line) for line in open(args.rows) if line.strip()]))
    workers = [subprocess.Popen(
        [sys.executable, __file__, "--worker", "--ns-dtype", args.ns_dtype, "--params",
         *args.params],
        env=dict(os.environ, JAX_PLATFORMS="cpu",
                 XLA_FLAGS=f"--xla_force_host_platform_device_count={n}"),
        stdout=subprocess.PIPE, text=True) for n in args.devices]
    rows = []
    for worker in workers:
        out, _ = worker.communicate()
        if worker.returncode:
            raise RuntimeError(f"a worker failed with exit status {worker.returncode}")
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    print(table(rows))


if __name__ == "__main__":
    main()
