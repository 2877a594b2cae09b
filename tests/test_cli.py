"""The `muon` command: plan, demo, bench and conformance wiring, and the bundled data."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from muon_cli import bench_cmd, demo
from muon_cli.data import char_split, digits_split, load_digits
from muon_cli.main import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(output: str, name: str) -> list[str]:
    return next(line.split() for line in output.splitlines() if line.startswith(name + " "))


def test_bundled_digits_match_the_uci_test_set():
    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() == 1.0
    # Class sizes of the UCI optdigits test set.
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_digits_split_is_a_seeded_partition():
    x_train, y_train, x_test, y_test = digits_split(seed=3)
    again = digits_split(seed=3)
    assert len(y_train) + len(y_test) == 1797 and len(y_test) == 359
    assert np.array_equal(again[0], x_train) and np.array_equal(again[3], y_test)
    with pytest.raises(ValueError, match="test_fraction=1.5"):
        digits_split(test_fraction=1.5)


def test_plan_gpt2_routes_hidden_matrices_to_muon(capsys):
    assert main(["plan", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert _row(out, "h.0.attn.qkv.weight")[2] == "muon"
    assert _row(out, "wte.weight")[2] == "adamw"
    assert _row(out, "lm_head.weight")[2] == "adamw"
    # 12 layers x (qkv, attn.proj, mlp.fc, mlp.proj).
    assert "48 of 149 tensors" in out


def test_plan_world_size_prints_owners_and_load(capsys):
    assert main(["plan", "gpt2", "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    owner_rows = [line.split() for line in out.split("owner  NS GFLOP/step")[1].splitlines()
                  if line.startswith("h.")]
    assert len(owner_rows) == 48  # every Muon matrix has one owner
    assert {int(row[1]) for row in owner_rows} == {0, 1, 2, 3}
    # Each of the 12 layers has the same four matrices, so 4 ranks can share them evenly.
    assert "world size 4: load max/mean 1.000" in out


def test_plan_cnn_flattens_convolutions(capsys):
    assert main(["plan", "cnn"]) == 0
    out = capsys.readouterr().out
    assert _row(out, "conv2.weight")[:4] == ["conv2.weight", "64x32x3x3", "muon", "64x288"]
    assert _row(out, "classifier.weight")[2] == "adamw"


def test_plan_toml_names_its_model_and_rules(tmp_path, capsys):
    path = tmp_path / "muon.toml"
    path.write_text('model = "gpt-small"\n\n[muon]\nlr = 0.02\n\n'
                    '[[muon.rules]]\nmatch = "h.*.mlp.*"\nalgorithm = "adamw"\n')
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert _row(out, "h.1.mlp.fc.weight")[2:] == ["adamw", "-", "-", "rule", "rule",
                                                   "match='h.*.mlp.*'"]
    assert _row(out, "h.1.attn.proj.weight")[2] == "muon"


def test_plan_json_shapes_in_flax_layout(tmp_path, capsys):
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps({"dense.kernel": [64, 256], "dense.bias": [256]}))
    assert main(["plan", str(path), "--layout", "in_out"]) == 0
    row = _row(capsys.readouterr().out, "dense.kernel")
    # (in, out) = (64, 256): 256 rows of 64, so the original scale is sqrt(256 / 64) = 2.
    assert row[2] == "muon" and row[row.index("256x64") + 1] == "2"


def test_plan_import_path(capsys):
    assert main(["plan", "muon_cli.torch_models:DigitsMLP"]) == 0
    out = capsys.readouterr().out
    assert _row(out, "fc2.weight")[2] == "muon" and _row(out, "head.weight")[2] == "adamw"


def test_plan_errors_name_the_value(tmp_path, capsys):
    assert main(["plan", "resnet9000"]) == 1
    assert "model='resnet9000' is not known" in capsys.readouterr().err
    path = tmp_path / "bare.toml"
    path.write_text("lr = 0.02\n")
    assert main(["plan", str(path)]) == 1
    assert "no top-level model" in capsys.readouterr().err


def test_demo_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    assert "--steps: 0 is invalid" in capsys.readouterr().err
    with pytest.raises(ValueError, match="backend='mxnet'"):
        demo.Settings(backend="mxnet")


def test_demo_data_batches_come_from_training_text_and_eval_from_held_out():
    settings = demo.Settings(steps=3, batch_size=2)
    data = demo.demo_data(settings)
    assert data.x.shape == data.y.shape == (3, 2, demo.CONTEXT)
    assert data.test_x.shape == (demo.EVAL_SEQUENCES, demo.CONTEXT)
    # Targets are the inputs shifted by one character.
    np.testing.assert_array_equal(data.x[..., 1:], data.y[..., :-1])
    train_ids, test_ids = char_split()
    text = "".join(map(chr, train_ids + 31))  # ids are offsets of 31 from ASCII, enough to match
    assert "".join(map(chr, data.x[0, 0] + 31)) in text
    assert "".join(map(chr, data.test_x[0] + 31)) in "".join(map(chr, test_ids + 31))
    # Seeded: the same settings give the same batches.
    np.testing.assert_array_equal(demo.demo_data(settings).x, data.x)


def test_char_split_holds_out_the_end_of_the_text():
    train_ids, test_ids = char_split(test_fraction=0.25)
    assert len(test_ids) == pytest.approx((len(train_ids) + len(test_ids)) / 4, abs=1)
    with pytest.raises(ValueError, match="test_fraction=0"):
        char_split(test_fraction=0)


def test_summary_counts_steps_to_adamw_best():
    curves = {"muon": {"step": [0, 10, 20, 30], "seconds": [0.0, 0.5, 1.0, 1.5],
                       "cpu_seconds": [0.0, 0.4, 0.8, 1.2],
                       "test_loss": [2.0, 0.5, 0.2, 0.1], "test_accuracy": [0.1, 0.8, 0.9, 0.95],
                       "train_seconds": 1.5},
              "adamw": {"step": [0, 10, 20, 30], "seconds": [0.0, 0.2, 0.4, 0.6],
                        "cpu_seconds": [0.0, 0.2, 0.4, 0.6],
                        "test_loss": [2.0, 1.0, 0.4, 0.3], "test_accuracy": [0.1, 0.6, 0.8, 0.9],
                        "train_seconds": 0.6}}
    summary = demo.summarize(curves)
    assert summary["adamw"]["steps_to_adamw_best"] == 30
    assert summary["muon"]["steps_to_adamw_best"] == 20
    assert summary["muon"]["seconds_to_adamw_best"] == 1.0
    assert summary["adamw"]["seconds_to_adamw_best"] == 0.6
    assert summary["muon"]["cpu_seconds_to_adamw_best"] == 0.8
    assert summary["muon"]["final_test_loss"] == 0.1 and summary["adamw"]["best_test_loss"] == 0.3
    line = demo.speedup_line(summary)
    assert "1.5x fewer steps" in line and "0.6x less time" in line
    table = demo.format_table(summary)
    assert table.splitlines()[2].split() == ["muon", "0.1000", "0.1000", "95.0%", "20", "1.00",
                                             "s", "0.80", "s", "1.50", "s"]


def test_speedup_line_says_when_muon_never_reaches_adamw_best():
    summary = {"muon": {"steps_to_adamw_best": None}, "adamw": {"steps_to_adamw_best": 30}}
    assert "did not reach AdamW's best held-out loss (step 30)" in demo.speedup_line(summary)


def _check_demo_outputs(out_dir, steps):
    assert (out_dir / "loss.png").read_bytes()[:8] == PNG_MAGIC
    record = json.loads((out_dir / "demo.json").read_text())
    assert set(record["summary"]) == {"muon", "adamw"}
    for curve in record["curves"].values():
        assert curve["step"][0] == 0 and curve["step"][-1] == steps
        assert all(np.isfinite(curve["test_loss"]))
        assert all(0.0 <= a <= 1.0 for a in curve["test_accuracy"])
        assert len(curve["cpu_seconds"]) == len(curve["step"])
    return record


@pytest.mark.torch
def test_demo_torch_writes_table_plot_and_record(tmp_path, capsys):
    pytest.importorskip("muon_torch", exc_type=ImportError).Muon
    assert main(["demo", "--steps", "12", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "steps to AdamW best" in out and "wrote" in out
    record = _check_demo_outputs(tmp_path, 12)
    assert record["settings"]["backend"] == "torch"
    assert record["torch"] == pytest.importorskip("torch").__version__
    # Training lowers the held-out loss from its starting point for both optimizers.
    for curve in record["curves"].values():
        assert curve["test_loss"][-1] < curve["test_loss"][0]


@pytest.mark.torch
def test_sweep_reports_every_learning_rate(monkeypatch, capsys):
    pytest.importorskip("muon_torch", exc_type=ImportError).Muon
    monkeypatch.setattr(demo, "SWEEP_LR", {"muon": (0.01, 0.02), "adamw": (1e-3,)})
    assert main(["demo", "--sweep", "--steps", "5", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["muon", "lr=0.01"], ["muon", "lr=0.02"],
                                                    ["adamw", "lr=0.001"]]


@pytest.mark.jax
def test_demo_jax_writes_outputs(tmp_path, capsys):
    pytest.importorskip("muon_jax")
    assert main(["demo", "--backend", "jax", "--steps", "10", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    record = _check_demo_outputs(tmp_path, 10)
    assert record["muon_config"]["lr"] == demo.TUNED_LR["muon"]


def test_bench_table_shows_peer_over_ours():
    rows = [{"backend": "torch", "what": "NS 768x3072", "peer": "torch.optim.Muon",
             "ours_s": 0.002, "peer_s": 0.005, "ratio": 2.5}]
    last = bench_cmd.format_rows(rows).splitlines()[-1]
    assert last.split("|")[-2].strip() == "2.50x" and "| 5.0 |" in last


def test_accuracy_table_rounds_to_three_decimals_per_shape():
    rows = [{"shape": (768, 3072), "what": "ours", "min_sigma": 0.68214, "max_sigma": 1.1336,
             "distance": 0.31849}]
    header, _, line = bench_cmd.format_accuracy(rows, "block").splitlines()
    assert header.startswith("| block (out x in) |")
    assert line == "| 768x3072 | ours | 0.682 | 1.134 | 0.318 |"


def test_bench_reports_a_missing_backend(monkeypatch, capsys):
    monkeypatch.setitem(bench_cmd.BENCH_MODULES, "torch", "muon_no_such_module.bench")
    assert main(["bench", "--backend", "torch"]) == 1
    assert 'pip install "muon-core[torch]"' in capsys.readouterr().err


def test_conformance_passes_backend_and_pytest_arguments(monkeypatch):
    import muon_conformance

    seen = []
    monkeypatch.setattr(muon_conformance, "main", lambda argv: seen.append(argv) or 0,
                        raising=False)
    assert main(["conformance", "--backend", "numpy", "-x", "-q"]) == 0
    assert seen == [["--backend", "numpy", "-x", "-q"]]


def test_console_script_module_runs():
    result = subprocess.run([sys.executable, "-m", "muon_cli.main", "plan", "gpt2"],
                            capture_output=True, text=True, check=True)
    assert "h.11.mlp.proj.weight" in result.stdout


def test_plan_reads_hugging_face_names_and_flags_shape_only_heads(tmp_path, capsys):
    # Hugging Face GPT-2 names and (in, out) Conv1D shapes, a GPT-NeoX fused projection and an
    # unnamed vocabulary-sized projection, as a user would dump them to JSON.
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps({
        "transformer.wte.weight": [50257, 768], "transformer.h.0.attn.c_attn.weight": [768, 2304],
        "transformer.h.0.mlp.c_fc.weight": [768, 3072], "transformer.lm_head.weight": [50257, 768],
        "gpt_neox.layers.0.attention.query_key_value.weight": [2304, 768],
        "decoder.proj.weight": [50257, 768]}))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "perm[1, 0] -> 2304x768 split 768+768+768" in " ".join(
        _row(out, "transformer.h.0.attn.c_attn.weight"))
    fc = _row(out, "transformer.h.0.mlp.c_fc.weight")
    assert fc[fc.index("3072x768") + 1] == "2"  # sqrt(3072 / 768)
    assert _row(out, "transformer.lm_head.weight")[2] == "adamw"
    assert _row(out, "gpt_neox.layers.0.attention.query_key_value.weight")[3] == "2304x768"
    assert "! gpt_neox.layers.0.attention.query_key_value.weight: fused Q/K/V left whole" in out
    assert "! decoder.proj.weight: 50257x768 matrix routed to Muon by shape alone" in out


def test_bench_clock_choice_is_checked_and_used():
    from muon_cli import benchtools

    with pytest.raises(ValueError, match=r"clock='gpu' is invalid: expected one of"):
        benchtools.set_clock("gpu")
    try:
        benchtools.set_clock("cpu")
        assert benchtools.clock_name() == "cpu"
        assert "cpu clock" in bench_cmd.machine_header(rounds=1, threads=1)
        times = benchtools.interleaved_times({"a": lambda: sum(range(1000))}, rounds=2)
        assert times["a"] >= 0
    finally:
        benchtools.set_clock("wall")


def test_missing_optional_dependency_names_its_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if the cli extra were not installed
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert main(["demo", "--steps", "1", "--out", str(tmp_path), "--no-progress"]) == 1
    assert 'pip install "muon-core[cli]"' in capsys.readouterr().err


def test_conformance_accepts_the_package_index_spelling(monkeypatch):
    seen = []
    monkeypatch.setattr(pytest, "main", lambda args: seen.append(args) or 0)
    assert main(["conformance", "--backend", "array-api-strict"]) == 0
    assert seen[0][seen[0].index("--muon-backend") + 1] == "array_api_strict"


def test_conformance_unknown_backend_is_one_line_listing_the_names(monkeypatch, capsys):
    monkeypatch.setattr(pytest, "main", lambda args: pytest.fail("pytest should not run"))
    assert main(["conformance", "--backend", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "backend='nope' is not registered: expected one of" in err and "'numpy'" in err


def test_polar_errors_of_exact_and_scaled_polar_factors():
    from muon_cli.benchtools import polar_errors

    g = np.random.default_rng(0).standard_normal((6, 9))
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    # The exact polar factor U V^T has unit gains and distance 0; half of it has gains 1/2 and
    # distance 1/2 (computed by hand from the definition).
    np.testing.assert_allclose(polar_errors(g, u @ vt), (1.0, 1.0, 0.0), atol=1e-12)
    np.testing.assert_allclose(polar_errors(g, 0.5 * u @ vt), (0.5, 0.5, 0.5), atol=1e-12)
