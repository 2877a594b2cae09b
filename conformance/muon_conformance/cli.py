"""`python -m muon_conformance --backend NAME [options] [-- pytest args]`: a thin wrapper that
runs the package's `suite.py` under pytest with the plugin; the exit code is pytest's.
Options it does not know (`-x`, `-q`, ...) and everything after `--` go to pytest."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

SUITE = Path(__file__).with_name("suite.py")
PLUGIN = "muon_conformance.plugin"


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (pytest's own go after `--`)."""
    parser = argparse.ArgumentParser(
        prog="python -m muon_conformance", allow_abbrev=False,
        description="Check a Muon backend against the muon_core specification.",
        epilog="Other options and everything after -- go to pytest, e.g. -- -x -k trajectory.")
    parser.add_argument("--backend", metavar="NAME",
                        help="registered backend name or module:attribute of an adapter")
    parser.add_argument("--known-failures", metavar="FILE",
                        help="JSON or TOML file mapping check names or check[case] ids to reasons")
    parser.add_argument("--checks", metavar="NAMES", help="comma-separated check names")
    parser.add_argument("--slow", action="store_true",
                        help="also run the slow variants (many hypothesis examples)")
    parser.add_argument("--list", action="store_true",
                        help="list the registered backends and the checks, then exit")
    return parser


def pytest_args(options: argparse.Namespace, extra: Sequence[str]) -> list[str]:
    """The pytest command line for the parsed options; `extra` comes last, so it wins."""
    args = [str(SUITE), "--muon-backend", options.backend, "-p", "no:cacheprovider",
            "-m", "slow or not slow" if options.slow else "not slow"]
    if not any(ep.value == PLUGIN for ep in entry_points(group="pytest11")):
        args += ["-p", PLUGIN]
    if options.known_failures:
        args += ["--muon-known-failures", options.known_failures]
    if options.checks:
        args += ["--muon-checks", options.checks]
    return args + list(extra)


def listing() -> str:
    """The registered backends and every check with its cases."""
    from muon_core import available_backends
    from muon_conformance.checks import CHECKS

    lines = ["backends: " + ", ".join(available_backends()), "checks:"]
    for check in CHECKS.values():
        lines.append(f"  {check.name}: {check.summary}")
        lines.append("    cases: " + ", ".join(case.name for case in check.cases))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite for one backend; return pytest's exit code."""
    import sys

    import pytest

    argv = list(sys.argv[1:] if argv is None else argv)
    ours, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    parser = build_parser()
    options, unknown = parser.parse_known_args(ours)
    if options.list:
        print(listing())
        return 0
    if not options.backend:
        parser.error("--backend NAME is required (see --list for the registered names)")
    if ":" not in options.backend:  # module:attribute names an adapter directly
        from muon_core._registry import registered_name

        try:
            options.backend = registered_name(options.backend)
        except ValueError as exc:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
            return 2
    return int(pytest.main(pytest_args(options, unknown + extra)))
