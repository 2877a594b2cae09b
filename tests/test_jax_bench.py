"""The JAX benchmark's plumbing on a tiny GPT-2 (no timing is asserted)."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

from muon_cli.benchtools import gpt2_shapes  # noqa: E402
import muon_jax  # noqa: E402
from muon_jax import bench  # noqa: E402

pytestmark = pytest.mark.jax

TINY = gpt2_shapes(n_layer=1, d_model=16, vocab=40, context=8)


def test_in_out_shapes_transpose_matrices_only():
    shapes = bench.in_out_shapes(TINY)
    assert shapes["h.0.mlp.fc.weight"] == (16, 64) and shapes["h.0.ln_1.bias"] == (16,)


def test_peer_routes_the_same_leaves_as_ours():
    # Without Nesterov optax's bias correction drops out of the direction, so the same routing
    # gives the same update; a leaf routed differently would differ by far more than 1e-5.
    config = bench.SETTINGS.replace(nesterov=False, eps=1e-8)
    params = bench._random(bench.in_out_shapes(TINY), 0)
    grads = bench._random(bench.in_out_shapes(TINY), 1)
    ours, peer = muon_jax.muon(config), bench.peer_transform(params, config)
    ours_updates, _ = ours.update(grads, ours.init(params), params)
    peer_updates, _ = peer.update(grads, peer.init(params), params)
    assert len(muon_jax.plan_for(params, config).muon) == 4
    for name in params:
        np.testing.assert_allclose(ours_updates[name], peer_updates[name], atol=1e-5,
                                   err_msg=name)


def test_compare_rows():
    rows = bench.compare_on(TINY, rounds=1, threads=None)
    assert [r["what"] for r in rows] == list(bench.ROWS)
    for row in rows:
        assert row["peer"] == "optax.contrib.muon"
        assert row["ours_s"] > 0 and row["peer_s"] > 0
        assert row["ratio"] == pytest.approx(row["ours_s"] / row["peer_s"])


def test_accuracy_rows_cover_every_shape_and_contender():
    rows = bench.accuracy_on(TINY)
    shapes = {r["shape"] for r in rows}
    # TINY's Muon matrices in torch layout: qkv 48x16, proj 16x16, fc 64x16, mlp.proj 16x64.
    assert shapes == {(48, 16), (16, 16), (64, 16), (16, 64)}
    contenders = {r["what"] for r in rows}
    assert contenders == {bench.PEER} | {w for w, c in bench.ROWS.items()
                                           if not c.config.split_qkv}
    for row in rows:
        # Every five- or four-step schedule keeps the kept directions' gains within (0, 2).
        assert 0.0 < row["min_sigma"] <= row["max_sigma"] < 2.0
        assert row["distance"] < 1.0


@pytest.mark.parametrize("change", [{"ns_coefficients": "quintic"}, {"momentum_kind": "sum"},
                                    {"ns_dtype": "bfloat16"}, {"split_qkv": True},
                                    {"lr_scaling": "spectral"}])
def test_peer_refuses_settings_optax_would_ignore(change):
    params = bench._random(bench.in_out_shapes(TINY), 0)
    (key, value), = change.items()
    with pytest.raises(ValueError, match=rf"{key}={value!r}: "):
        bench.peer_transform(params, bench.SETTINGS.replace(**change))
