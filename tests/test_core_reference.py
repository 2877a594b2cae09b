"""The reference step against independent float64 computations."""

import math

import numpy as np
import pytest

import muon_core
from muon_core import MuonConfig, Rule, ns_schedule, plan, reference_step


def svd_newton_schulz(m, preset="keller", steps=5, eps=1e-7):
    """NS written through the SVD: the polynomial acts on each singular value alone."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    schedule = ns_schedule(preset, steps)
    x = s / max(np.linalg.norm(m) * schedule.norm_scale, eps)
    for a, b, c in schedule.coefficients:
        x = a * x + b * x**3 + c * x**5
    return u @ np.diag(x) @ vt


def torch_style_adamw(p, grads, lr, betas, eps, wd):
    """AdamW written out as in Loshchilov & Hutter with torch's bias corrections."""
    m = v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p - lr * wd * p
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0]**t), v / (1 - betas[1]**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


F64 = dict(ns_dtype="float64")


def run(params, grad_seq, cfg, p=None):
    state = None
    for grads in grad_seq:
        params, state = reference_step(params, grads, state, cfg, p)
    return params, state


def test_one_muon_step_is_the_svd_formula():
    rng = np.random.default_rng(0)
    w, g = rng.standard_normal((12, 5)), rng.standard_normal((12, 5))
    cfg = MuonConfig(lr=0.1, weight_decay=0.2, **F64)
    new, state = reference_step({"w": w}, {"w": g}, None, cfg)
    beta = cfg.momentum
    buf = (1 - beta) * g
    direction = (1 - beta) * g + beta * buf  # Nesterov on an EMA buffer
    expected = w * (1 - 0.1 * 0.2) - 0.1 * math.sqrt(12 / 5) * svd_newton_schulz(direction)
    np.testing.assert_allclose(new["w"], expected, atol=1e-12)
    np.testing.assert_allclose(state["w"]["momentum_buffer"], buf, atol=1e-15)


@pytest.mark.parametrize("kind, nesterov", [("ema", True), ("ema", False), ("sum", True),
                                            ("sum", False)])
def test_momentum_variants_over_several_steps(kind, nesterov):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 6))
    grads = [rng.standard_normal((6, 6)) for _ in range(4)]
    cfg = MuonConfig(lr=0.05, weight_decay=0.0, momentum=0.9, nesterov=nesterov,
                     momentum_kind=kind, ns_coefficients="quintic", **F64)
    expected, buf = w, np.zeros_like(w)
    g_weight = 0.1 if kind == "ema" else 1.0
    for g in grads:
        buf = 0.9 * buf + g_weight * g
        direction = g_weight * g + 0.9 * buf if nesterov else buf
        expected = expected - 0.05 * svd_newton_schulz(direction, "quintic")
    new, _ = run({"w": w}, [{"w": g} for g in grads], cfg)
    np.testing.assert_allclose(new["w"], expected, atol=1e-11)


def test_ema_and_sum_momentum_give_the_same_update_without_nesterov():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 4))
    grads = [{"w": rng.standard_normal((8, 4))} for _ in range(5)]
    cfgs = [MuonConfig(nesterov=False, momentum_kind=k, eps=1e-30, **F64) for k in ("ema", "sum")]
    ema, _ = run({"w": w}, grads, cfgs[0])
    total, _ = run({"w": w}, grads, cfgs[1])
    np.testing.assert_allclose(ema["w"], total["w"], atol=1e-12)


def test_adamw_part_matches_the_written_out_formula():
    rng = np.random.default_rng(3)
    b = rng.standard_normal(7)
    grads = [rng.standard_normal(7) for _ in range(6)]
    cfg = MuonConfig(adamw=dict(lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.3))
    new, state = run({"bias": b}, [{"bias": g} for g in grads], cfg)
    np.testing.assert_allclose(new["bias"], torch_style_adamw(b, grads, 0.01, (0.8, 0.9), 1e-6,
                                                              0.3), atol=1e-13)
    assert state["bias"]["step"] == 6


def test_adamw_part_matches_torch_optim_adamw():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    b = rng.standard_normal((3, 4))
    grads = [rng.standard_normal((3, 4)) for _ in range(5)]
    cfg = MuonConfig(adamw=dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1))
    p = torch.tensor(b, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    routing = plan({"emb": b.shape}, cfg, algorithms={"emb": "adamw"})
    new, _ = run({"emb": b}, [{"emb": g} for g in grads], cfg, routing)
    np.testing.assert_allclose(new["emb"], p.detach().numpy(), atol=1e-12)


@pytest.mark.parametrize("scaling", ["original", "match_rms_adamw", "spectral", "none"])
def test_conv_and_split_blocks_are_orthogonalized_alone(scaling):
    rng = np.random.default_rng(5)
    params = {"conv.weight": rng.standard_normal((6, 2, 3, 3)),
              "attn.qkv.weight": rng.standard_normal((24, 5))}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    cfg = MuonConfig(lr=1.0, weight_decay=0.0, momentum=0.0, lr_scaling=scaling,
                     rules=[Rule(match="attn.qkv.weight", split=(8, 8, 8))], **F64)
    new, _ = reference_step(params, grads, None, cfg)
    conv_update = params["conv.weight"] - new["conv.weight"]
    scale = {"original": 1.0, "match_rms_adamw": 0.2 * math.sqrt(18),
             "spectral": math.sqrt(6 / 18), "none": 1.0}[scaling]
    np.testing.assert_allclose(conv_update.reshape(6, 18),
                               scale * svd_newton_schulz(grads["conv.weight"].reshape(6, 18)),
                               atol=1e-12)
    qkv_update = params["attn.qkv.weight"] - new["attn.qkv.weight"]
    scale = {"original": math.sqrt(8 / 5), "match_rms_adamw": 0.2 * math.sqrt(8),
             "spectral": math.sqrt(8 / 5), "none": 1.0}[scaling]
    for i in range(3):
        block = slice(8 * i, 8 * i + 8)
        np.testing.assert_allclose(qkv_update[block],
                                   scale * svd_newton_schulz(grads["attn.qkv.weight"][block]),
                                   atol=1e-12)


def test_batch_axes_are_orthogonalized_one_matrix_each():
    rng = np.random.default_rng(6)
    w, g = rng.standard_normal((3, 4, 6)), rng.standard_normal((3, 4, 6))
    cfg = MuonConfig(lr=1.0, weight_decay=0.0, momentum=0.0, **F64,
                     rules=[Rule(match="experts", out_axes=(1,), in_axes=(2,))])
    new, _ = reference_step({"experts": w}, {"experts": g}, None, cfg)
    for e in range(3):
        np.testing.assert_allclose(w[e] - new["experts"][e], svd_newton_schulz(g[e]), atol=1e-12)


def test_moonlight_update_rms_is_about_adamw():
    # Moonlight's lemma: a full-rank orthogonal (A, B) update has RMS 1/sqrt(max(A, B)).
    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 256))
    cfg = MuonConfig.moonlight(lr=1.0, weight_decay=0.0, ns_coefficients="polar_express",
                               ns_steps=10, momentum=0.0, ns_dtype="float64")
    new, _ = reference_step({"w": w}, {"w": rng.standard_normal((64, 256))}, None, cfg)
    rms = np.sqrt(np.mean((w - new["w"]) ** 2))
    assert abs(rms - 0.2) < 0.01


def test_array_api_strict_gives_the_numpy_result():
    xps = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(8)
    params = {"w": rng.standard_normal((5, 9)), "b": rng.standard_normal(5)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(3)]
    cfg = MuonConfig(**F64)
    expected, _ = run(params, grads, cfg)
    strict, _ = run({k: xps.asarray(v) for k, v in params.items()},
                    [{k: xps.asarray(v) for k, v in g.items()} for g in grads], cfg)
    for k in params:
        np.testing.assert_allclose(np.asarray(strict[k]), expected[k], atol=1e-13)


def test_inputs_are_never_modified_and_none_grads_are_skipped():
    rng = np.random.default_rng(9)
    params = {"w": rng.standard_normal((4, 4)), "b": rng.standard_normal(4)}
    grads = {"w": rng.standard_normal((4, 4)), "b": None}
    copies = {k: v.copy() for k, v in params.items()}
    new, state = reference_step(params, grads, None, MuonConfig())
    for k in params:
        np.testing.assert_array_equal(params[k], copies[k])
    assert new["b"] is params["b"] and state["b"]["step"] == 0
    assert not np.allclose(new["w"], params["w"])


def test_nonfinite_gradients_raise_or_skip_and_change_nothing():
    rng = np.random.default_rng(10)
    params = {"w": rng.standard_normal((4, 4)), "b": rng.standard_normal(4)}
    _, state = reference_step(params, {k: np.ones_like(v) for k, v in params.items()}, None,
                              MuonConfig())
    grads = {"w": np.full((4, 4), np.nan), "b": np.ones(4)}
    with pytest.raises(FloatingPointError, match=r"'w' \(4x4\).*nothing was updated"):
        reference_step(params, grads, state, MuonConfig())
    new, new_state = reference_step(params, grads, state, MuonConfig(nonfinite="skip"))
    assert all(new[k] is params[k] for k in params)
    assert new_state["w"]["momentum_buffer"] is state["w"]["momentum_buffer"]


def test_gradient_shape_and_name_errors():
    params = {"w": np.zeros((3, 4))}
    with pytest.raises(ValueError, match=r"gradient of 'w' has shape \(4, 3\), expected"):
        reference_step(params, {"w": np.zeros((4, 3))}, None, MuonConfig())
    with pytest.raises(KeyError, match="gradient for 'v' has no matching parameter"):
        reference_step(params, {"v": np.zeros((3, 4))}, None, MuonConfig())


def test_momentum_update_keeps_a_wider_buffer_unrounded():
    # float32 buffer, float16 gradient: the buffer is computed in float32 (0.95 * 1 + 0.05 * g
    # written out in float64 and rounded once), the direction comes back in float16.
    grad = np.array([1e-3], np.float16)
    buf = np.array([1.0], np.float32)
    direction, new_buf = muon_core.momentum_update(grad, buf, 0.95, "ema", False)
    assert new_buf.dtype == np.float32 and direction.dtype == np.float16
    expected = np.float32(0.95 * 1.0 + 0.05 * float(grad[0]))
    np.testing.assert_allclose(new_buf, expected, rtol=1e-7)


def test_step_allowed_raises_skips_or_refuses_an_unknown_policy():
    assert muon_core.step_allowed([], {}, "raise")
    assert not muon_core.step_allowed(["w"], {"w": (2, 3)}, "skip")
    with pytest.raises(FloatingPointError, match=r"'w' \(2x3\)"):
        muon_core.step_allowed(["w"], {"w": (2, 3)}, "raise")
    with pytest.raises(ValueError, match=r"nonfinite='ignore' is invalid"):
        muon_core.step_allowed(["w"], {"w": (2, 3)}, "ignore")
