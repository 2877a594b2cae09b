"""Cost model of sharded Muon: bytes sent, optimizer memory and Newton-Schulz work per rank.

Usage: python benchmarks/cost_model.py [--world-sizes 2 4 8 64 1024] [--ns-tflops 100]

Prints, for GPT-2 small and a 7B-shaped model (32 layers, d=4096, ffn 11008), per mode and
world size: bytes each rank sends per step (ring model, float32 gradients and parameters,
bf16 directions in zero1 unless `--ns-bytes 4`), optimizer-state bytes on the fullest rank,
Newton-Schulz flops on the busiest rank and its time at `--ns-tflops`. The formulas are those
of docs/distributed.md; `benchmarks/distributed.py` measures the same quantities.
"""

from __future__ import annotations

import argparse
import math

import muon_core
from muon_cli.benchtools import gpt2_shapes


def llama7b_shapes(n_layer: int = 32, d: int = 4096, ffn: int = 11008,
                   vocab: int = 32000) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a 7B-shaped decoder (separate q/k/v/o, gated MLP, RMS norms)."""
    shapes = {"embed_tokens.weight": (vocab, d)}
    for i in range(n_layer):
        p = f"layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
        shapes |= {p + f"self_attn.{x}_proj.weight": (d, d) for x in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d),
                   p + "mlp.down_proj.weight": (d, ffn)}
    return shapes | {"norm.weight": (d,), "lm_head.weight": (vocab, d)}


def costs(plan: muon_core.Plan, world: int, value_bytes: int = 4,
          ns_bytes: int = 2) -> dict[str, dict[str, float]]:
    """Per mode: `sent` bytes per rank per step, `state` bytes on the fullest rank, `ns`
    flops on the busiest rank."""
    muon = sum(math.prod(e.shape) for e in plan.muon)
    total = muon + sum(math.prod(e.shape) for e in plan.adamw)
    ring = (world - 1) / world
    owners = muon_core.assign_owners(plan, world)
    adamw = muon_core.assign_adamw_owners(plan, world)
    muon_values = {e.name: math.prod(e.shape) for e in plan.muon}
    owned_momentum = max(sum(muon_values[n] for n in owners.owned_by(r)) for r in range(world))
    adamw_state = 2 * max(adamw.load) * value_bytes
    full_ns = muon_core.total_ns_flops(plan)
    # ZeroRedundancyOptimizer(AdamW) keeps moments of every parameter, partitioned by size.
    every_adamw = muon_core.plan({e.name: e.shape for e in plan},
                                 algorithms=dict.fromkeys((e.name for e in plan), "adamw"))
    zero_state = 2 * max(muon_core.assign_adamw_owners(every_adamw, world).load) * value_bytes
    return {
        "ddp-muon": {"sent": 2 * ring * total * value_bytes,
                     "state": (muon + 2 * (total - muon)) * value_bytes, "ns": full_ns},
        "zero1-adamw (torch, + DDP)": {"sent": 3 * ring * total * value_bytes,
                                       "state": zero_state, "ns": 0},
        "layerwise": {"sent": 2 * ring * total * value_bytes,
                      "state": owned_momentum * value_bytes + adamw_state,
                      "ns": max(owners.load)},
        "zero1": {"sent": 2 * ring * total * value_bytes + ring * muon * ns_bytes,
                  "state": math.ceil(muon / world) * value_bytes + adamw_state, "ns": full_ns},
    }


def main() -> None:
    """Print the projection tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8, 64, 1024])
    parser.add_argument("--ns-tflops", type=float, default=100.0,
                        help="sustained Newton-Schulz throughput per rank, TFLOP/s")
    parser.add_argument("--ns-bytes", type=int, default=2, help="bytes per NS value (bf16: 2)")
    args = parser.parse_args()
    models = {"GPT-2 small": gpt2_shapes(), "7B-shaped": llama7b_shapes()}
    for title, shapes in models.items():
        plan = muon_core.plan(shapes)
        print(f"\n{title}: {sum(math.prod(s) for s in shapes.values()) / 1e6:.0f}M values\n")
        print("| ranks | mode | sent MB/step/rank | state MB/rank | NS GFLOP/rank | "
              f"NS ms at {args.ns_tflops:g} TFLOP/s | NS load max/mean |")
        print("|---|---|---|---|---|---|---|")
        for world in args.world_sizes:
            load = muon_core.assign_owners(plan, world).imbalance
            for mode, c in costs(plan, world, ns_bytes=args.ns_bytes).items():
                balance = f"{load:.3f}" if mode == "layerwise" else "-"
                print(f"| {world} | {mode} | {c['sent'] / 1e6:,.0f} | {c['state'] / 1e6:,.0f} | "
                      f"{c['ns'] / 1e9:,.0f} | {c['ns'] / args.ns_tflops / 1e9:,.1f} | "
                      f"{balance} |")


if __name__ == "__main__":
    main()
