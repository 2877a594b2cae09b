"""Mutation testing of a backend with the conformance suite as the only test command.

cosmic-ray enumerates every mutant of `backends/muon_<backend>/*.py` (bench.py excluded: it is
benchmark code the suite never runs); a seeded random sample of them is applied one at a time
(the file is rewritten on disk and restored afterwards) and `python -m muon_conformance
--backend <backend> -x -q` runs against each. A mutant is killed when the suite fails or runs
past the timeout. muon_core and muon_conformance (the oracle) are never mutated.

    python benchmarks/mutation.py --backend torch --sample 40 --seed 0
    python benchmarks/mutation.py --backend jax --sample 10 --checks trajectory,state -k defaults
    python benchmarks/mutation.py --backend torch --rerun benchmarks/results/mutation-torch.jsonl

Each mutant's outcome is appended to a JSON-lines file as soon as it is known; `--rerun FILE`
runs the survivors recorded there again (to see which a new check kills).
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EXCLUDED = {"bench.py"}
Z95 = 1.959964


def module_paths(backend: str) -> list[Path]:
    """The backend's source files, relative to the repository root, bench.py excluded."""
    folder = ROOT / "backends" / f"muon_{backend}"
    return [p.relative_to(ROOT) for p in sorted(folder.glob("*.py")) if p.name not in EXCLUDED]


def enumerate_mutants(backend: str) -> list:
    """Every cosmic-ray work item for the backend, in a stable order (file, operator,
    occurrence); cosmic-ray's job ids are random, so they do not enter the order."""
    from cosmic_ray.commands.init import init
    from cosmic_ray.work_db import WorkDB, use_db

    with tempfile.TemporaryDirectory() as folder, \
            use_db(str(Path(folder, "session.sqlite")), WorkDB.Mode.create) as db:
        init(module_paths(backend), db, {})
        items = list(db.work_items)
    return sorted(items, key=lambda item: _key(item.mutations[0]))


def _key(mutation) -> tuple[str, str, int]:
    return str(mutation.module_path), mutation.operator_name, int(mutation.occurrence)


@functools.cache
def annotation_spans(path: Path) -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
    """(start, end) positions of every type annotation in a module that never evaluates them
    (`from __future__ import annotations`); none for any other module."""
    tree = ast.parse(path.read_text())
    lazy = any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
               and any(alias.name == "annotations" for alias in node.names) for node in tree.body)
    if not lazy:
        return ()
    annotations = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations.append(node.returns)
        elif isinstance(node, (ast.arg, ast.AnnAssign)):
            annotations.append(node.annotation)
    return tuple(((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset))
                 for a in annotations if a is not None)


def annotation_only(mutation) -> bool:
    """Whether the mutant changes only a type annotation that Python never evaluates: an
    equivalent mutant (nothing in the project reads annotations with `get_type_hints`)."""
    start, end = tuple(mutation.start_pos), tuple(mutation.end_pos)
    return any(low <= start and end <= high
               for low, high in annotation_spans(ROOT / mutation.module_path))


def wilson_interval(killed: int, total: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion."""
    if total == 0:
        return 0.0, 1.0
    p = killed / total
    centre = (p + Z95**2 / (2 * total)) / (1 + Z95**2 / total)
    half = Z95 * math.sqrt(p * (1 - p) / total + Z95**2 / (4 * total**2)) / (1 + Z95**2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def suite_command(backend: str, checks: str | None, keyword: str | None) -> list[str]:
    """The test command run for every mutant: the suite, stopping at the first failure."""
    command = [sys.executable, "-m", "muon_conformance", "--backend", backend, "-x", "-q"]
    return (command + (["--checks", checks] if checks else [])
            + (["-k", keyword] if keyword else []))


def suite_environment() -> dict[str, str]:
    """This checkout on the path before any installed copy, one thread per process."""
    paths = [str(ROOT), str(ROOT / "backends"), str(ROOT / "conformance")]
    return {"PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}


def require_checkout_imported(backend: str) -> None:
    """Fail unless the suite imports the backend from this checkout (else no mutant could
    ever be seen)."""
    found = subprocess.run([sys.executable, "-c", f"import muon_{backend}; "
                            f"print(muon_{backend}.__file__)"], capture_output=True, text=True,
                           check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(ROOT / "backends"):
        raise SystemExit(f"muon_{backend} is imported from {found}, not from {ROOT}/backends")


def first_failure(output: str) -> str:
    """The first line naming a failed case in pytest's output, or a short tail."""
    for line in output.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            return line[:300]
    return output.strip().splitlines()[-1][:300] if output.strip() else ""


def describe(mutation) -> dict:
    """Where a mutant is: file, operator, occurrence, line, enclosing definition."""
    return {"module": str(mutation.module_path), "operator": mutation.operator_name,
            "occurrence": int(mutation.occurrence), "line": mutation.start_pos[0],
            "definition": mutation.definition_name}


def run_mutant(item, command: str, timeout: float) -> dict:
    """Apply one mutant, run the suite, restore the file; return its record. A mutant of a type
    annotation only is recorded as "equivalent" without running the suite."""
    from cosmic_ray.mutating import mutate_and_test

    mutation = item.mutations[0]
    record = describe(mutation)
    if annotation_only(mutation):
        return {**record, "outcome": "equivalent", "seconds": 0.0, "diff": "",
                "failure": "type annotation only (never evaluated)"}
    start = time.monotonic()
    result = mutate_and_test(item.mutations, command, timeout)
    return {**record, "outcome": _outcome(result), "seconds": round(time.monotonic() - start, 1),
            "diff": result.diff or "", "failure": first_failure(result.output or "")}


def skipped(item, reason: str) -> dict:
    """The record of a mutant not run: it sits in code the suite never executes (`--skip`)."""
    return {**describe(item.mutations[0]), "outcome": "skipped", "seconds": 0.0, "diff": "",
            "failure": reason}


def _outcome(result) -> str:
    if result.worker_outcome.value == "no-test":
        return "no-test"
    if result.output == "timeout":
        return "timeout"
    return result.test_outcome.value if result.test_outcome else result.worker_outcome.value


def summarise(records: list[dict]) -> str:
    """Killed (timeouts included), survived, score and its 95% interval."""
    counted = [r for r in records if r["outcome"] in ("killed", "timeout", "survived")]
    killed = sum(r["outcome"] != "survived" for r in counted)
    low, high = wilson_interval(killed, len(counted))
    equivalent = sum(r["outcome"] == "equivalent" for r in records)
    skipped_count = sum(r["outcome"] == "skipped" for r in records)
    other = len(records) - len(counted) - equivalent - skipped_count
    return (f"{killed}/{len(counted)} killed ({killed / max(1, len(counted)):.1%}, 95% Wilson "
            f"interval {low:.1%} to {high:.1%}); {len(counted) - killed} survived; "
            f"{equivalent} equivalent (annotations) not counted"
            + (f"; {skipped_count} skipped (code the suite never runs)" if skipped_count else "")
            + (f"; {other} not counted (incompetent or no mutation)" if other else ""))


def removed_line(diff: str) -> str:
    """The first non-blank source line a recorded mutant's diff removes, stripped."""
    return next((line[1:].strip() for line in diff.splitlines()
                 if line.startswith("-") and not line.startswith("---") and line[1:].strip()),
                "")


def mutated_line(mutation) -> str:
    """The current source line where a cosmic-ray mutation starts, stripped."""
    lines = (ROOT / mutation.module_path).read_text().splitlines()
    return lines[mutation.start_pos[0] - 1].strip()


def select(args: argparse.Namespace, items: list) -> list:
    """The seeded sample, or the survivors recorded in `args.rerun`: matched by file, operator
    and the text of the line they change (occurrence numbers shift when a file is edited; a
    line holding the same operator twice gives both mutants)."""
    if args.rerun:
        old = [json.loads(line) for line in Path(args.rerun).read_text().splitlines() if line]
        wanted = {(r["module"], r["operator"], removed_line(r["diff"])) for r in old
                  if r["outcome"] == "survived"}
        return [item for item in items
                if (str(item.mutations[0].module_path), item.mutations[0].operator_name,
                    mutated_line(item.mutations[0])) in wanted
                and re.search(args.where, f"{item.mutations[0].module_path}:"
                              f"{item.mutations[0].start_pos[0]}")]
    return random.Random(args.seed).sample(items, min(args.sample, len(items)))


def resumed(out: Path, chosen: list) -> list[dict]:
    """The records in `out` of mutants in `chosen`, annotation-only ones marked equivalent
    (whatever the suite said: it cannot see them)."""
    wanted = {_key(item.mutations[0]): item for item in chosen}
    records = []
    for record in map(json.loads, filter(None, out.read_text().splitlines())):
        item = wanted.get((record["module"], record["operator"], record["occurrence"]))
        if item is not None:
            if annotation_only(item.mutations[0]) and record["outcome"] != "equivalent":
                record = {**record, "outcome": "equivalent", "ran": record["outcome"]}
            records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    """Enumerate, sample, run; print the score."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("torch", "jax"), required=True)
    parser.add_argument("--sample", type=int, default=40, help="mutants to run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant")
    parser.add_argument("--checks", help="comma-separated checks to run (default: all)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression selecting cases")
    parser.add_argument("--rerun", metavar="FILE", help="run the survivors recorded in FILE")
    parser.add_argument("--where", default="", metavar="REGEX",
                        help="with --rerun: only survivors whose FILE:LINE matches")
    parser.add_argument("--out", type=Path, help="JSON-lines output "
                        "(default: benchmarks/results/mutation-BACKEND.jsonl)")
    parser.add_argument("--budget", type=float, default=math.inf,
                        help="start no mutant after this many seconds (the sample is then the "
                        "prefix of mutants run, still a random sample)")
    parser.add_argument("--skip", metavar="REGEX", help="record mutants whose FILE:LINE "
                        "matches as skipped without running the suite (code it never executes, "
                        "e.g. the CUDA-only Triton kernel); they are left out of the score")
    parser.add_argument("--resume", action="store_true",
                        help="keep the records already in the output file, run only the rest")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip running the suite on the unmutated code first")
    args = parser.parse_args(argv)
    os.environ.update(suite_environment())
    os.chdir(ROOT)
    require_checkout_imported(args.backend)
    command = suite_command(args.backend, args.checks, args.keyword)
    if not args.no_baseline:
        base = subprocess.run(command, capture_output=True, text=True)
        if base.returncode != 0:
            raise SystemExit(f"the suite fails without a mutant:\n{base.stdout[-2000:]}")
    items = enumerate_mutants(args.backend)
    chosen = select(args, items)
    out = args.out or RESULTS / f"mutation-{args.backend}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{len(items)} mutants of muon_{args.backend}; running {len(chosen)} "
          f"(seed {args.seed}): {shlex.join(command)}", flush=True)
    started = time.monotonic()
    records = resumed(out, chosen) if args.resume and out.exists() else []
    done = {(r["module"], r["operator"], r["occurrence"]) for r in records}
    with out.open("w") as sink:
        sink.writelines(json.dumps(record) + "\n" for record in records)
        for number, item in enumerate(chosen, start=1):
            if _key(item.mutations[0]) in done:
                continue
            if time.monotonic() - started > args.budget:
                print(f"time budget spent: stopped before mutant {number}", flush=True)
                break
            mutation = item.mutations[0]
            if args.skip and re.search(args.skip, f"{mutation.module_path}:"
                                                  f"{mutation.start_pos[0]}"):
                record = skipped(item, f"not run: matches --skip {args.skip!r}")
            else:
                record = run_mutant(item, shlex.join(command), args.timeout)
            records.append(record)
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            print(f"[{number}/{len(chosen)}] {record['outcome']:9} {record['seconds']:6.1f}s "
                  f"{record['module']}:{record['line']} {record['operator']} "
                  f"#{record['occurrence']}", flush=True)
    print(summarise(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
