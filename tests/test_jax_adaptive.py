"""muon_jax with second moments and cautious weight decay: flax layout, jit, state checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muon_jax
from muon_core import MuonConfig, plan, reference_step

# flax layout (in, out): a fused QKV kernel and a conv kernel (kh, kw, in, out).
SHAPES = {"attn.qkv.kernel": (4, 12), "conv.kernel": (3, 3, 2, 5), "dense.bias": (5,)}
CFG = MuonConfig(lr=0.05, weight_decay=0.3, ns_dtype="float32", cautious_weight_decay=True)


def arrays(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {n: (scale * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}


@pytest.mark.parametrize("method", ["normuon", "adamuon"])
def test_in_out_layout_follows_the_float64_reference(method):
    cfg = CFG.replace(second_moment=method)
    tx = muon_jax.muon(cfg, layout="in_out")
    params = {n: jnp.asarray(p) for n, p in arrays(0).items()}
    state, update = tx.init(params), jax.jit(tx.update)
    ref = {n: np.asarray(p, np.float64) for n, p in params.items()}
    ref_plan = plan({n: p.shape for n, p in ref.items()}, cfg, layout="in_out")
    ref_state = None
    for step in range(4):
        grads = arrays(10 + step)
        updates, state = update({n: jnp.asarray(g) for n, g in grads.items()}, state, params)
        params = optax.apply_updates(params, updates)
        ref, ref_state = reference_step(ref, {n: g.astype(np.float64) for n, g in grads.items()},
                                        ref_state, cfg.replace(ns_dtype="float64"), ref_plan)
    for name in SHAPES:
        np.testing.assert_allclose(params[name], ref[name], rtol=1e-4, atol=1e-5)
    for name in ("attn.qkv.kernel", "conv.kernel"):
        np.testing.assert_allclose(state.second_moment[name], ref_state[name]["second_moment"],
                                   rtol=1e-4, atol=1e-9)
    assert set(state.second_moment) == {"attn.qkv.kernel", "conv.kernel"}


def test_scale_by_muon_carries_the_second_moment_and_zero_gradients_stay_finite():
    tx = muon_jax.scale_by_muon(MuonConfig(second_moment="normuon", ns_dtype="float32"))
    params = {n: jnp.zeros(s) for n, s in SHAPES.items()}
    state = tx.init(params)
    assert state.second_moment["attn.qkv.kernel"].shape == (1, 12)
    out, state = jax.jit(tx.update)({n: jnp.zeros(s) for n, s in SHAPES.items()}, state)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(out))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.second_moment))


def test_a_state_made_for_another_second_moment_is_refused():
    params = {n: jnp.asarray(p) for n, p in arrays(0).items()}
    state = muon_jax.muon(CFG.replace(second_moment="normuon"), layout="in_out").init(params)
    tx = muon_jax.muon(CFG.replace(second_moment="adamuon"), layout="in_out")
    with pytest.raises(ValueError, match=r"state.second_moment\['attn.qkv.kernel'\] has shape "
                                         r"\(1, 12\), expected \(4, 12\)"):
        tx.update(params, state, params)
