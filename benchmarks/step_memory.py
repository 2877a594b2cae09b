"""Peak extra memory of one optimizer step on GPT-2 small, ours against the peers, as markdown.

    python benchmarks/step_memory.py [--n-layer 12] [--ns-steps 1] [--backend all|torch|jax]

torch: every contender runs in a fresh process that builds the parameters and gradients, takes
one step (which creates the state) and then the measured one; the kernel's high-water mark of the resident set (`VmHWM`, reset through
`/proc/self/clear_refs` just before the step) gives the peak. "extra" is that peak minus the
larger of the memory before and after the step. glibc is told to map
every allocation above 128 KiB, so freed buffers leave the resident set. Newton-Schulz
temporaries do not depend on the number of iterations, so `--ns-steps 1` (the default) keeps
the peer's emulated bfloat16 products within minutes on CPUs without native bfloat16.

JAX: XLA's own count (`memory_analysis().temp_size_in_bytes`, the scratch it allocates
beyond the inputs and outputs) for the compiled step `update` then `optax.apply_updates`, with
the parameters and the state donated, as a training step donates them; and for `update`
alone with the state donated (JAX pairs donated buffers with outputs by shape and dtype, so
the updates, which come first, can take the state's buffers: that count includes copies a
training step does not make).

"largest stack" is the bound a batched step is held to: the bytes of the largest batch of
same-shape matrices that one Newton-Schulz call takes, in that call's dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MB = 2**20
TORCH = ("muon_torch.Muon, defaults", "muon_torch.Muon, same settings, float32 NS",
         "torch.optim.Muon + torch.optim.AdamW")
JAX = ("muon_jax.muon, defaults", "muon_jax.muon, same settings, float32 NS",
       "optax.contrib.muon")


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_during(fn) -> tuple[int, int, int]:
    """(resident bytes before, peak during, after) one call of `fn`: the kernel's high-water
    mark of the resident set (VmHWM), reset just before the call."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # 5: reset the peak resident set size to the current one
    before = _status_kib("VmRSS") * 1024
    fn()
    return before, _status_kib("VmHWM") * 1024, _status_kib("VmRSS") * 1024


def largest_stack(shapes, config, itemsize: int) -> int:
    """Bytes of the largest batch of same-oriented-shape Muon blocks `config` routes."""
    import muon_core

    batches: dict[tuple[int, int], int] = {}
    for entry in muon_core.plan(shapes, config).muon:
        for rows in entry.blocks:
            key = tuple(sorted((rows, entry.matrix_shape[2])))
            batches[key] = batches.get(key, 0) + entry.matrix_shape[0]
    return max(count * m * n * itemsize for (m, n), count in batches.items())


def torch_worker(name: str, n_layer: int, ns_steps: int) -> dict:
    """One torch contender's step, measured in this (fresh) process."""
    import torch
    from muon_cli.benchtools import gpt2_shapes
    from muon_core import MuonConfig
    from muon_torch import Muon
    from muon_torch._newton_schulz import ns_dtype
    from muon_torch.bench import SETTINGS, _named_tensors, _with_grads, peer_optimizers

    torch.set_num_threads(1)
    shapes = gpt2_shapes(n_layer=n_layer)
    params = _with_grads(_named_tensors(shapes, 0), _named_tensors(shapes, 1))
    if name == TORCH[0]:
        config = MuonConfig(ns_steps=ns_steps)
        opt = Muon(list(params.items()), config)
        dtype = ns_dtype(config.ns_dtype, torch.device("cpu"))
        step, itemsize = opt.step, torch.empty((), dtype=dtype).element_size()
    elif name == TORCH[1]:
        config = SETTINGS.replace(ns_dtype="float32", ns_steps=ns_steps)
        step, itemsize = Muon(list(params.items()), config).step, 4
    else:
        config = SETTINGS.replace(ns_steps=ns_steps)
        peers = peer_optimizers(params, config)
        step, itemsize = (lambda: [opt.step() for opt in peers.values()]), 2
    step()  # the first step creates the state
    before, peak, after = peak_during(step)
    return {"name": name, "before": before, "peak": peak, "after": after,
            "extra": peak - max(before, after), "largest_stack": largest_stack(
                shapes, config, itemsize) if name != TORCH[2] else None}


def jax_worker(name: str, n_layer: int, ns_steps: int) -> dict:
    """One JAX contender's compiled update: XLA's temporary bytes."""
    from muon_jax import bench

    bench.pin_threads(1)
    import jax
    import jax.numpy as jnp
    import optax
    from muon_cli.benchtools import gpt2_shapes

    shapes = gpt2_shapes(n_layer=n_layer)
    flax = bench.in_out_shapes(shapes)
    abstract = {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in flax.items()}
    settings = bench.SETTINGS.replace(ns_steps=ns_steps)
    if name == JAX[2]:
        tx = bench.peer_transform(abstract, settings)
    else:
        config = (settings.replace(ns_dtype="auto", ns_algorithm="gram", split_qkv=True)
                  if name == JAX[0] else settings)
        tx = bench.muon(config)
    state = jax.eval_shape(tx.init, abstract)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def scratch(fn, donate) -> int:
        compiled = jax.jit(fn, donate_argnums=donate).lower(abstract, state, abstract).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    config = settings if name == JAX[2] else config
    return {"name": name, "extra": scratch(step, (0, 1)),
            "update_alone": scratch(lambda p, s, g: tx.update(g, s, p), 1),
            "largest_stack": largest_stack(shapes, config.replace(ns_dtype="float32"), 4)}


def run_worker(backend: str, name: str, args: argparse.Namespace) -> dict:
    """Measure one contender in a fresh interpreter; return its JSON line."""
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--worker", backend, name, "--n-layer",
                          str(args.n_layer), "--ns-steps", str(args.ns_steps)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    """Print one table row per contender (each measured in its own process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--ns-steps", type=int, default=1)
    parser.add_argument("--backend", choices=("all", "torch", "jax"), default="all")
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        backend, name = args.worker
        worker = torch_worker if backend == "torch" else jax_worker
        print(json.dumps(worker(name, args.n_layer, args.ns_steps)))
        return
    print("| backend | contender | peak extra memory of a step (MB) | largest stack (MB) "
          "| extra / largest stack | JAX: update alone (MB) |")
    print("|---|---|---|---|---|---|")
    chosen = {"torch": TORCH, "jax": JAX}
    for backend in ("torch", "jax") if args.backend == "all" else (args.backend,):
        for name in chosen[backend]:
            row = run_worker(backend, name, args)
            stack, ratio = ("-", "-") if row["largest_stack"] is None else (
                f"{row['largest_stack'] / MB:.1f}", f"{row['extra'] / row['largest_stack']:.2f}")
            alone = f"{row['update_alone'] / MB:.1f}" if "update_alone" in row else "-"
            print(f"| {backend} | {name} | {row['extra'] / MB:.1f} | {stack} | {ratio} | {alone} |",
                  flush=True)


if __name__ == "__main__":
    main()
