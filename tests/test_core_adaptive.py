"""Second moments after Newton-Schulz and cautious weight decay, against independent checks."""

import math

import numpy as np
import pytest

from muon_core import (MuonConfig, Rule, adamuon, apply_second_moment, decayed_param, normuon, plan,
                       reference_step, second_moment_shape)

F64 = dict(ns_dtype="float64")


def loop_normuon(o, v, beta2, eps):
    """NorMuon on one matrix, written with Python floats and loops."""
    rows, cols = len(o), len(o[0])
    new_v = [beta2 * v[i] + (1 - beta2) * sum(x * x for x in o[i]) / cols for i in range(rows)]
    scaled = [[o[i][j] / (math.sqrt(new_v[i]) + eps) for j in range(cols)] for i in range(rows)]
    return _keep_norm_loop(scaled, o), new_v


def loop_adamuon(o, v, beta2, eps):
    """AdaMuon on one matrix, written with Python floats and loops."""
    rows, cols = len(o), len(o[0])
    new_v = [[beta2 * v[i][j] + (1 - beta2) * o[i][j] ** 2 for j in range(cols)]
             for i in range(rows)]
    scaled = [[o[i][j] / (math.sqrt(new_v[i][j]) + eps) for j in range(cols)]
              for i in range(rows)]
    return _keep_norm_loop(scaled, o), new_v


def _keep_norm_loop(scaled, o):
    norm = math.sqrt(sum(x * x for row in o for x in row))
    new_norm = math.sqrt(sum(x * x for row in scaled for x in row))
    return [[x * norm / new_norm for x in row] for row in scaled]


def test_normuon_and_adamuon_equal_a_float64_loop():
    rng = np.random.default_rng(0)
    o = rng.standard_normal((2, 5, 7))
    v_rows, v_full = rng.uniform(0, 1, (2, 5)), rng.uniform(0, 1, (2, 5, 7))
    got, got_v = normuon(o, v_rows, 0.9, 1e-3)
    got_a, got_av = adamuon(o, v_full, 0.8, 1e-3)
    for b in range(2):
        want, want_v = loop_normuon(o[b].tolist(), v_rows[b].tolist(), 0.9, 1e-3)
        np.testing.assert_allclose(got[b], want, rtol=1e-13)
        np.testing.assert_allclose(got_v[b], want_v, rtol=1e-13)
        want, want_v = loop_adamuon(o[b].tolist(), v_full[b].tolist(), 0.8, 1e-3)
        np.testing.assert_allclose(got_a[b], want, rtol=1e-13)
        np.testing.assert_allclose(got_av[b], want_v, rtol=1e-13)


@pytest.mark.parametrize("method", [normuon, adamuon])
def test_each_matrix_keeps_its_frobenius_norm(method):
    rng = np.random.default_rng(1)
    o = rng.standard_normal((3, 6, 4)) * np.array([1e-3, 1.0, 50.0])[:, None, None]
    v = np.zeros((3, 6)) if method is normuon else np.zeros((3, 6, 4))
    out, _ = method(o, v, 0.95, 1e-8)
    np.testing.assert_allclose(np.linalg.norm(out, axis=(1, 2)), np.linalg.norm(o, axis=(1, 2)),
                               rtol=1e-12)


def test_normuon_scales_whole_rows():
    # Each row is multiplied by one positive number: rows keep their direction.
    rng = np.random.default_rng(2)
    o = rng.standard_normal((1, 4, 9))
    out, _ = normuon(o, rng.uniform(0, 1, (1, 4)), 0.5, 1e-8)
    ratio = out / o
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[..., :1], ratio.shape), rtol=1e-12)
    assert np.all(ratio > 0)


def test_cautious_decay_only_where_update_and_parameter_agree():
    cfg = MuonConfig(lr=0.5, weight_decay=0.2, cautious_weight_decay=True)
    p = np.array([1.0, -1.0, 2.0, -2.0, 3.0])
    u = np.array([1.0, 1.0, -1.0, -1.0, 0.0])
    # lr * wd = 0.1: entries 0 and 3 agree in sign, entry 4 has a zero update (u * p >= 0).
    np.testing.assert_array_equal(decayed_param(p, u, cfg), [0.9, -1.0, 2.0, -1.8, 2.7])
    np.testing.assert_array_equal(decayed_param(p, u, cfg.replace(cautious_weight_decay=False)),
                                  p * 0.9)


@pytest.mark.parametrize("method", ["normuon", "adamuon"])
def test_zero_gradients_and_zero_matrices_give_no_nan(method):
    cfg = MuonConfig(second_moment=method, cautious_weight_decay=True, **F64)
    params = {"a.weight": np.zeros((6, 4)), "attn.qkv.weight": np.zeros((12, 4))}
    grads = {name: np.zeros_like(p) for name, p in params.items()}
    new, state = reference_step(params, grads, None, cfg)
    grads["a.weight"][:, 1] = 1.0  # one nonzero column: rows with zero second moment exist
    new, state = reference_step(new, grads, state, cfg)
    for name in params:
        assert np.all(np.isfinite(new[name]))
        assert np.all(np.isfinite(state[name]["second_moment"]))
    np.testing.assert_array_equal(new["attn.qkv.weight"], 0.0)
    assert np.any(new["a.weight"] != 0.0)


def test_state_shapes_follow_the_matrix_view_in_both_layouts():
    cfg = MuonConfig(rules=[{"match": "experts.*", "out_axes": [1], "in_axes": [2]}])
    torch_plan = plan({"w": (8, 3), "experts.w": (4, 6, 5), "conv": (8, 2, 3, 3)}, cfg)
    flax_plan = plan({"w": (3, 8), "conv": (3, 3, 2, 8)}, cfg, layout="in_out")
    assert second_moment_shape(torch_plan["w"], "normuon") == (1, 8)
    assert second_moment_shape(flax_plan["w"], "normuon") == (1, 8)
    assert second_moment_shape(torch_plan["experts.w"], "normuon") == (4, 6)
    assert second_moment_shape(flax_plan["conv"], "normuon") == (1, 8)
    assert second_moment_shape(flax_plan["conv"], "adamuon") == (3, 3, 2, 8)
    assert second_moment_shape(torch_plan["w"], "none") is None


@pytest.mark.parametrize("method", ["normuon", "adamuon"])
def test_in_out_layout_is_the_transpose_of_out_in(method):
    cfg = MuonConfig(second_moment=method, weight_decay=0.1, **F64)
    rng = np.random.default_rng(3)
    p = {"attn.qkv.weight": rng.standard_normal((12, 5)), "fc.weight": rng.standard_normal((7, 5))}
    grads = [{n: rng.standard_normal(x.shape) for n, x in p.items()} for _ in range(3)]
    flax = {n: x.T for n, x in p.items()}
    torch_state = flax_state = None
    flax_plan = plan({n: x.shape for n, x in flax.items()}, cfg, layout="in_out")
    for g in grads:
        p, torch_state = reference_step(p, g, torch_state, cfg)
        flax, flax_state = reference_step(flax, {n: x.T for n, x in g.items()}, flax_state, cfg,
                                          flax_plan)
    for name in p:
        np.testing.assert_allclose(flax[name].T, p[name], rtol=1e-12)
        v_torch, v_flax = torch_state[name]["second_moment"], flax_state[name]["second_moment"]
        np.testing.assert_allclose(v_flax if method == "normuon" else v_flax.T, v_torch,
                                   rtol=1e-12)


def test_qkv_blocks_keep_their_norms_separately():
    # Fused QKV: each 4-row block is orthogonalized and normalised alone, so every block of
    # the matrix view passed through the second moment keeps its own norm.
    config = MuonConfig(rules=[Rule("attn.qkv.weight", split=(4, 4, 4))])
    entry = plan({"attn.qkv.weight": (12, 6)}, config)["attn.qkv.weight"]
    assert entry.blocks == (4, 4, 4)
    rng = np.random.default_rng(4)
    matrices = rng.standard_normal((1, 12, 6)) * np.repeat([1.0, 10.0, 0.1], 4)[None, :, None]
    state = {"second_moment": np.zeros((1, 12))}
    out, _ = apply_second_moment(matrices, state, entry, MuonConfig(second_moment="normuon"))
    for block in range(3):
        rows = slice(4 * block, 4 * block + 4)
        assert np.linalg.norm(out[0, rows]) == pytest.approx(np.linalg.norm(matrices[0, rows]))


def test_config_validates_and_serialises_the_options():
    cfg = MuonConfig(second_moment="adamuon", beta2=0.9, second_moment_eps=1e-6,
                     cautious_weight_decay=True)
    assert MuonConfig.from_toml(cfg.to_toml()) == cfg == MuonConfig.from_json(cfg.to_json())
    for bad, message in ((dict(second_moment="adam"), "second_moment='adam' is invalid"),
                         (dict(beta2=1.0), "beta2=1.0 is invalid"),
                         (dict(second_moment_eps=0.0), "second_moment_eps=0.0 is invalid"),
                         (dict(cautious_weight_decay=1), "cautious_weight_decay=1 is invalid")):
        with pytest.raises(ValueError, match=message):
            MuonConfig(**bad)


def test_defaults_leave_the_step_unchanged():
    cfg = MuonConfig(**F64)
    assert (cfg.second_moment, cfg.cautious_weight_decay) == ("none", False)
    rng = np.random.default_rng(5)
    p = {"fc.weight": rng.standard_normal((6, 4))}
    g = {"fc.weight": rng.standard_normal((6, 4))}
    new, state = reference_step(p, g, None, cfg)
    assert set(state["fc.weight"]) == {"momentum_buffer"}
    # Plain Muon, first step: NS of the Nesterov direction (1-b) g + b (1-b) g, scale sqrt(6/4).
    u, s, vt = np.linalg.svd(g["fc.weight"], full_matrices=False)
    x = s / np.linalg.norm(s)
    for _ in range(5):
        x = 3.4445 * x - 4.7750 * x**3 + 2.0315 * x**5
    want = p["fc.weight"] * (1 - 1e-3 * 0.1) - 1e-3 * math.sqrt(1.5) * (u * x) @ vt
    np.testing.assert_allclose(new["fc.weight"], want, rtol=1e-12)


def test_adamuon_preset_only_adds_the_second_moment():
    cfg = MuonConfig.adamuon(weight_decay=0.01)
    assert cfg == MuonConfig(lr=0.02, weight_decay=0.01, second_moment="adamuon", beta2=0.95)
    assert MuonConfig.from_toml(cfg.to_toml()) == cfg
