"""The pytest plugin: loaded in every pytest run through the `pytest11` entry point, it only
adds options and acts when a test asks for the `muon_check` fixture or a test module uses
`parametrize_with_checks`. It imports numpy and the checks only then.

Two ways to run the suite:

- `python -m muon_conformance --backend NAME` (or `pytest --muon-backend NAME` on the
  package's `suite.py`);
- inside a project's own tests::

      from muon_conformance import parametrize_with_checks

      @parametrize_with_checks(MyAdapter(), known_failures={"precision[bfloat16]": "why"})
      def test_muon_conformance(check):
          check()
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

FIXTURE = "muon_check"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Options of the conformance suite."""
    group = parser.getgroup("muon_conformance", "Muon conformance suite")
    group.addoption("--muon-backend", default=None, metavar="NAME",
                    help="backend to check: a registered name (muon_core.backends entry point) "
                         "or module:attribute of an adapter")
    group.addoption("--muon-known-failures", default=None, metavar="FILE",
                    help="JSON or TOML file mapping check names (or check[case] ids) to reasons")
    group.addoption("--muon-checks", default=None, metavar="NAMES",
                    help="comma-separated check names to run (default: all)")


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers the suite sets."""
    config.addinivalue_line("markers", "slow: long conformance variants (run with -m slow)")
    config.addinivalue_line("markers", "muon_conformance: a Muon conformance check")


def read_known_failures(path: str | Path) -> dict[str, str]:
    """Read a `{check or check[case]: reason}` mapping from a .json or .toml file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    if not isinstance(data, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"known failures file {str(path)!r} must map check names to reason "
                         f"strings, got {type(data).__name__} {data!r:.200}")
    return dict(data)


def check_params(adapter: Any, known_failures: Mapping[str, str] | None = None,
                 checks: Sequence[str] | None = None) -> list[Any]:
    """`pytest.param`s, one per case, marked skip (missing capability or backend), xfail
    (known failure, strict: a known failure that passes fails) or slow."""
    from muon_conformance.adapter import BackendUnavailable, load_adapter

    try:
        adapter = load_adapter(adapter)
    except BackendUnavailable as exc:
        return [pytest.param(None, id="backend_unavailable",
                             marks=pytest.mark.skip(reason=f"backend not available: {exc}"))]
    from muon_conformance.checks import collect

    params = []
    for case in collect(adapter, checks, known_failures):
        marks = [pytest.mark.muon_conformance]
        if case.skip:
            marks.append(pytest.mark.skip(reason=case.skip))
        if case.known_failure:
            marks.append(pytest.mark.xfail(reason=case.known_failure, strict=True))
        if case.slow:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


def parametrize_with_checks(adapter: Any, known_failures: Mapping[str, str] | None = None,
                            checks: Sequence[str] | None = None) -> Any:
    """Decorator giving a test one `check` argument per conformance case of `adapter` (an
    adapter instance or class, a registered backend name or "module:attribute"); call
    `check()` in the test. `known_failures` maps check names or `check[case]` ids to
    reasons; `checks` restricts the run to some check names."""
    return pytest.mark.parametrize("check", check_params(adapter, known_failures, checks))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize the `muon_check` fixture from the command-line options."""
    if FIXTURE not in metafunc.fixturenames:
        return
    options = metafunc.config.option
    if not options.muon_backend:
        raise pytest.UsageError("the Muon conformance suite needs --muon-backend NAME "
                                "(or run: python -m muon_conformance --backend NAME)")
    known = read_known_failures(options.muon_known_failures) \
        if options.muon_known_failures else None
    checks = options.muon_checks.split(",") if options.muon_checks else None
    metafunc.parametrize(FIXTURE, check_params(options.muon_backend, known, checks))
