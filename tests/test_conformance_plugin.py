"""The conformance suite's plumbing: pytest plugin, known failures, CLI, adapter loading and
failure messages (the checks themselves are exercised in test_conformance_selftest.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from muon_conformance import BackendUnavailable, collect, load_adapter
from muon_conformance.adapters import NumpyAdapter
from muon_conformance.cli import build_parser, main, pytest_args
from muon_conformance.oracle import ConformanceFailure, Tolerance, compare
from muon_conformance.plugin import check_params, read_known_failures

pytest_plugins = ["pytester"]

BROKEN_MODULE = '''
from muon_conformance.adapters import NumpyAdapter

class NesterovIgnored(NumpyAdapter):
    name = "nesterov_ignored"

    def make(self, params, config):
        return super().make(params, config.replace(nesterov=False))
'''


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def test_plugin_imports_nothing_heavy():
    code = ("import sys, muon_conformance, muon_conformance.plugin; "
            "print(sorted(m for m in ('numpy', 'torch', 'jax', 'hypothesis') if m in sys.modules))")
    assert _run("-c", code).stdout.strip() == "[]"


def test_plugin_does_nothing_unless_asked(pytester):
    pytester.makepyfile("def test_plain():\n    assert 1 + 1 == 2\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)


def test_parametrize_with_checks_marks_known_failures(pytester):
    pytester.makepyfile(broken=BROKEN_MODULE)
    pytester.makepyfile(test_third_party='''
from muon_conformance import parametrize_with_checks
from broken import NesterovIgnored

KNOWN = {"trajectory": "nesterov not implemented yet"}

@parametrize_with_checks(NesterovIgnored(), known_failures=KNOWN,
                         checks=["trajectory", "routing"])
def test_muon_conformance(check):
    check()
''')
    result = pytester.runpytest("-rf")
    # trajectory: 17 options fail as declared; no_nesterov and sum_no_nesterov pass although
    # declared, and a strict xfail that passes is a failure. routing uses nesterov too.
    result.assert_outcomes(xfailed=17, failed=4)
    result.stdout.fnmatch_lines(["[[]XPASS(strict)[]] nesterov not implemented yet"])
    result.stdout.fnmatch_lines(["FAILED *trajectory?no_nesterov?*",
                                 "FAILED *routing?defaults?*"])


def test_known_failures_by_case_id(pytester):
    pytester.makepyfile(broken=BROKEN_MODULE)
    pytester.makepyfile(test_third_party='''
from muon_conformance import parametrize_with_checks
from broken import NesterovIgnored

@parametrize_with_checks(NesterovIgnored(), checks=["resume"],
                         known_failures={"resume[defaults]": "declared but passes"})
def test_muon_conformance(check):
    check()
''')
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, failed=1)


def test_unknown_known_failure_key_is_an_error():
    with pytest.raises(ValueError, match=r"known failures name no check or case: \['trajectry'\]"):
        collect(NumpyAdapter(), known_failures={"trajectry": "typo"})


def test_unknown_check_name_is_an_error():
    with pytest.raises(ValueError, match=r"unknown check\(s\) \['nope'\]"):
        collect(NumpyAdapter(), ["nope"])


def test_unknown_capability_is_an_error():
    class Misspelt(NumpyAdapter):
        capabilities = frozenset({"bfloat16"})

    with pytest.raises(ValueError, match="unknown capabilities \\['bfloat16'\\]"):
        collect(Misspelt())


def test_missing_capability_skips_with_reason():
    cases = {c.id: c for c in collect(NumpyAdapter(), ["precision"])}
    assert cases["precision[bfloat16]"].skip == "backend 'numpy' does not declare capability ['bf16']"
    assert cases["precision[float64]"].skip is None


def test_unavailable_backend_skips_the_suite():
    class NotBuilt:
        def __init__(self):
            raise BackendUnavailable("muon_example has no Muon (backend not built yet)")

    (param,) = check_params(NotBuilt)
    (mark,) = param.marks
    assert mark.name == "skip" and "backend not built yet" in mark.kwargs["reason"]


def test_load_adapter_rejects_an_incomplete_adapter():
    class HalfAdapter:
        name = "half"
        capabilities = frozenset()

        def make(self, params, config):
            return None

    with pytest.raises(TypeError, match=r"lacks \['step', 'params', 'state', 'save', 'restore'\]"):
        load_adapter(HalfAdapter)


def test_load_adapter_names_the_registered_backends():
    with pytest.raises(ValueError, match="backend='nope' is not registered: expected one of"):
        load_adapter("nope")


def test_read_known_failures_from_toml_and_json(tmp_path):
    toml = tmp_path / "known.toml"
    toml.write_text('"precision[bfloat16]" = "bf16 matmul differs"\ntrajectory = "wip"\n')
    json_file = tmp_path / "known.json"
    json_file.write_text('{"resume": "checkpoints not written yet"}')
    assert read_known_failures(toml) == {"precision[bfloat16]": "bf16 matmul differs",
                                         "trajectory": "wip"}
    assert read_known_failures(json_file) == {"resume": "checkpoints not written yet"}
    json_file.write_text('["resume"]')
    with pytest.raises(ValueError, match="must map check names to reason strings"):
        read_known_failures(json_file)


def test_compare_names_place_error_and_tolerance():
    tol = Tolerance("float32", rtol=1e-4, atol=1e-7)
    compare(np.array([1.0, 2.00001]), np.array([1.0, 2.0]), tol=tol, where="here")
    with pytest.raises(ConformanceFailure) as info:
        compare(np.array([1.5, 2.0]), np.array([1.0, 2.0]), tol=tol, where="check x[y]: 'w'",
                baseline=np.array([0.0, 0.0]))
    text = str(info.value)
    assert text.startswith("check x[y]: 'w': max abs error 0.5, relative 0.25")
    assert "float32 tolerance rtol=0.0001, atol=1e-07" in text and "got 1.5, expected 1" in text


def test_compare_rejects_nan_and_shape():
    tol = Tolerance("float64", rtol=1e-10, atol=1e-13)
    with pytest.raises(ConformanceFailure, match="1 non-finite value"):
        compare(np.array([np.nan, 1.0]), np.array([1.0, 1.0]), tol=tol, where="w")
    with pytest.raises(ConformanceFailure, match=r"shape \(2,\), expected \(3,\)"):
        compare(np.zeros(2), np.zeros(3), tol=tol, where="w")


def test_cli_builds_the_pytest_command():
    options = build_parser().parse_args(["--backend", "torch", "--checks", "resume",
                                         "--known-failures", "k.toml"])
    args = pytest_args(options, ["-x"])
    assert args[0].endswith("suite.py") and args[-1] == "-x"
    assert args[args.index("--muon-backend") + 1] == "torch"
    assert args[args.index("-m") + 1] == "not slow"
    assert args[args.index("--muon-checks") + 1] == "resume"
    assert args[args.index("--muon-known-failures") + 1] == "k.toml"
    slow = pytest_args(build_parser().parse_args(["--backend", "jax", "--slow"]), [])
    assert slow[slow.index("-m") + 1] == "slow or not slow"


def test_cli_needs_a_backend(capsys):
    with pytest.raises(SystemExit):
        main([])
    assert "--backend NAME is required" in capsys.readouterr().err


def test_cli_lists_backends_and_checks(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "array_api_strict" in out and "resume:" in out


def test_cli_passes_a_correct_backend():
    result = _run("-m", "muon_conformance", "--backend", "numpy", "--checks",
                  "ns_golden,routing", "--", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout


def test_cli_hands_unknown_options_to_pytest():
    # `muon conformance --backend numpy -q -k ...` passes pytest options without `--`.
    result = _run("-m", "muon_conformance", "--backend", "numpy", "-q", "-k", "keller_2x3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed, 1 skipped" in result.stdout  # keller_2x3 in float32, float64; no bf16


def test_cli_reports_a_broken_backend_and_honours_known_failures(tmp_path):
    (tmp_path / "broken.py").write_text(BROKEN_MODULE)
    args = ("-m", "muon_conformance", "--backend", "broken:NesterovIgnored", "--checks",
            "trajectory")
    env_path = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
    run = ("from muon_conformance.cli import main; import sys; "
           "sys.exit(main(sys.argv[1:]))")
    failing = _run("-c", env_path + run, *args[2:], "--", "-q", "-x")
    assert failing.returncode == 1
    assert "check trajectory[defaults]: parameter" in failing.stdout
    assert "exceeds the float32 tolerance" in failing.stdout
    known = tmp_path / "known.toml"
    known.write_text('"trajectory[defaults]" = "nesterov is planned"\n')
    marked = _run("-c", env_path + run, *args[2:], "--known-failures", str(known), "--",
                  "-q", "-k", "defaults")
    assert marked.returncode == 0, marked.stdout + marked.stderr
    assert "1 xfailed" in marked.stdout


def test_numpy_adapter_runs_without_torch_or_jax():
    code = ("import sys, numpy as np; from muon_core import load_backend, MuonConfig; "
            "a = load_backend('numpy')(); h = a.make({'w': np.ones((4, 3), np.float32)}, "
            "MuonConfig()); a.step(h, {'w': np.ones((4, 3), np.float32)}); "
            "print(type(a).__name__, [m for m in ('torch', 'jax') if m in sys.modules])")
    assert _run("-c", code).stdout.strip() == "NumpyAdapter []"


def test_backend_without_its_api_is_unavailable(monkeypatch):
    muon_torch = pytest.importorskip("muon_torch")
    from muon_conformance.adapters import TorchAdapter

    monkeypatch.delattr(muon_torch, "Muon")
    with pytest.raises(BackendUnavailable, match="muon_torch has no Muon"):
        TorchAdapter()
