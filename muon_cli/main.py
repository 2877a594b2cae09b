"""The `muon` command: demo, plan, bench, checkpoint and conformance."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

EPILOG = "Run 'muon COMMAND --help' for a command's options."


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: expected a positive int")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    from muon_cli.demo import Settings, run_demo, sweep

    optional = {"steps": args.steps, "muon_lr": args.muon_lr, "adamw_lr": args.adamw_lr}
    settings = Settings(backend=args.backend, seed=args.seed,
                        **{k: v for k, v in optional.items() if v is not None})
    progress = False if args.no_progress else None
    if args.sweep:
        sweep(settings, progress)
    else:
        run_demo(settings, Path(args.out), progress)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from muon_cli.plan_cmd import owner_report, run_plan

    plan = run_plan(args.model, args.config, args.layout)
    print(plan)
    if args.world_size is not None:
        print()
        print(owner_report(plan, args.world_size))
    return 0


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from muon_core._checkpoint import read_checkpoint, summary

    print(summary(read_checkpoint(args.path)))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from muon_cli.bench_cmd import collect, format_rows, machine_header
    from muon_cli.benchtools import set_clock

    set_clock(args.clock)
    backends = ["torch", "jax"] if args.backend == "all" else [args.backend]
    rows, notes = collect(backends, args.rounds, args.threads)
    if rows:
        print(machine_header(args.rounds, args.threads) + "\n")
        print(format_rows(rows))
    for note in notes:
        print(note, file=sys.stderr)
    return 0 if rows else 1


def _cmd_conformance(args: argparse.Namespace, extra: list[str]) -> int:
    import muon_conformance

    return muon_conformance.main(["--backend", args.backend, *extra])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `muon` command and its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="muon", epilog=EPILOG,
        description="muon-core: one specification of the Muon optimizer, for torch and JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train a small character-level transformer with Muon "
                          "and with AdamW", description="Train a small character-level "
                          "transformer on Python source with Muon and with AdamW (same init and "
                          "batches), compare held-out loss and accuracy against training time, "
                          "and write loss.png and demo.json.")
    demo.add_argument("--backend", choices=("torch", "jax"), default="torch")
    demo.add_argument("--steps", type=_positive_int, help="default: 60")
    demo.add_argument("--out", default="muon-demo", help="output folder (default: ./muon-demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--muon-lr", type=float, help="Muon's lr (default: the tuned value)")
    demo.add_argument("--adamw-lr", type=float, help="AdamW's lr (default: the tuned value)")
    demo.add_argument("--sweep", action="store_true",
                      help="redo the learning-rate sweep instead of the comparison")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    plan = sub.add_parser("plan", help="print which tensors of a model get Muon and why",
                          description="Print the routing table of a model: a built-in name "
                          "(gpt2, gpt-small, cnn, mlp), 'package.module:factory' returning a "
                          "torch module or a {name: shape} mapping, a .json file of shapes, or "
                          "a .toml file with model = NAME and a [muon] table.")
    plan.add_argument("model", metavar="MODEL_OR_CONFIG")
    plan.add_argument("--config", help="a .toml or .json MuonConfig file (rules, lr_scaling)")
    plan.add_argument("--layout", choices=("out_in", "in_out"), default="out_in",
                      help="axis order of shapes given as a mapping (default: out_in, torch's)")
    plan.add_argument("--world-size", type=int, default=None, metavar="N",
                      help="also print the owner rank of each Muon matrix on N ranks and the "
                      "Newton-Schulz load per rank")

    bench = sub.add_parser("bench", help="time our step against torch.optim.Muon and optax",
                           description="Time Newton-Schulz and the full step of our backends "
                           "against torch.optim.Muon and optax.contrib.muon on GPT-2-small "
                           "shapes, side by side in one run.")
    bench.add_argument("--backend", choices=("all", "torch", "jax"), default="all")
    bench.add_argument("--rounds", type=_positive_int, default=5)
    bench.add_argument("--threads", type=_positive_int, default=1)
    bench.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                       help="wall: elapsed time; cpu: the process's CPU time (steadier when "
                            "other jobs share the cores)")

    checkpoint = sub.add_parser("checkpoint", help="inspect a portable optimizer checkpoint",
                                description="Inspect a checkpoint written by muon_torch.save "
                                "or muon_jax.save: config, plan, steps and sizes.")
    checkpoint_sub = checkpoint.add_subparsers(dest="action", required=True, metavar="ACTION")
    inspect = checkpoint_sub.add_parser("inspect", help="print config, plan, steps and sizes")
    inspect.add_argument("path", metavar="PATH")

    conformance = sub.add_parser("conformance", help="run the conformance suite on a backend",
                                 description="Run the conformance suite; extra arguments go "
                                 "to pytest.")
    conformance.add_argument("--backend", required=True, help="a registered backend name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `muon` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "conformance":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "conformance":
            return _cmd_conformance(args, extra)
        return {"demo": _cmd_demo, "plan": _cmd_plan, "bench": _cmd_bench,
                "checkpoint": _cmd_checkpoint}[args.command](args)
    except (ValueError, TypeError, ImportError, OSError) as exc:
        print(f"muon {args.command}: error: {_with_install_hint(exc)}", file=sys.stderr)
        return 1


def _with_install_hint(exc: Exception) -> str:
    """The error's text, plus the extra to install when an optional module is missing."""
    from muon_core._registry import install_hint

    hint = install_hint(exc.name) if isinstance(exc, ModuleNotFoundError) else None
    return f"{exc}; install it with: {hint}" if hint else str(exc)


if __name__ == "__main__":
    sys.exit(main())
