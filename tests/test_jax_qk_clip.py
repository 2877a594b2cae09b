"""QK-clip in muon_jax: `qk_max` through `has_aux` and the pure `qk_clip` after the update."""

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import muon_core  # noqa: E402
import muon_jax  # noqa: E402
from muon_core import MuonConfig  # noqa: E402
from qk_clip_cases import all_cases, clip_and_check, random_heads, separate  # noqa: E402

pytestmark = pytest.mark.jax


def _jax_clip(params, qk_max, config, layout):
    with jax.enable_x64(True):
        tree = {n: jnp.asarray(p) for n, p in params.items()}
        out = muon_jax.qk_clip(tree, {k: jnp.asarray(v) for k, v in qk_max.items()}, config,
                               layout=layout)
        return {n: np.asarray(p) for n, p in out.items()}


# Flax layout here (the core's tests run every case in both layouts; each JAX case compiles).
@pytest.mark.parametrize("case", [c for c in all_cases() if c.layout == "in_out"],
                         ids=lambda c: c.name)
def test_clipped_logits_reach_tau_per_head(case):
    clip_and_check(case, _jax_clip)


def test_layouts_agree_and_match_the_core():
    # The same heads packed (out, in) and (in, out) clip to transposes of each other.
    torch_layout, flax_layout = separate(4, 2, "out_in", bias=True), separate(4, 2, "in_out",
                                                                              bias=True)
    heads = random_heads(torch_layout, np.random.default_rng(6))
    qk_max = {"attn": np.array([5.0, 0.1, 3.0, 0.2])}
    a = _jax_clip(torch_layout.pack(heads), qk_max, torch_layout.config, "out_in")
    b = _jax_clip(flax_layout.pack(heads), qk_max, flax_layout.config, "in_out")
    core = muon_core.qk_clip(torch_layout.pack(heads), qk_max, torch_layout.config)
    for name in a:
        np.testing.assert_allclose(a[name], b[name].T, rtol=1e-14)
        np.testing.assert_allclose(a[name], core[name], rtol=1e-14)


def _attention(params, x):
    """Causal single-layer attention, flax layout, returning the output and its qk_max."""
    b, t, _ = x.shape
    q = (x @ params["attn"]["query"]["kernel"]).reshape(b, t, 4, -1)
    k = (x @ params["attn"]["key"]["kernel"]).reshape(b, t, 2, -1)
    v = (x @ params["attn"]["value"]["kernel"]).reshape(b, t, 2, -1)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    s_max = muon_jax.qk_max(q, k, mask=causal)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return out.reshape(b, t, -1), {"attn": s_max}


def _explicit_max(params, x):
    q, k = x @ params["attn"]["query"]["kernel"], x @ params["attn"]["key"]["kernel"]
    out = []
    for h in range(4):
        logits = q[..., h * 4:(h + 1) * 4] @ jnp.swapaxes(k[..., (h // 2) * 4:(h // 2 + 1) * 4],
                                                          -1, -2)
        mask = jnp.tril(jnp.ones(logits.shape[-2:], dtype=bool))
        out.append(jnp.where(mask, logits, -jnp.inf).max() / math.sqrt(4))
    return jnp.stack(out)


def test_has_aux_step_then_clip_under_jit():
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"attn": {name: {"kernel": 3 * jax.random.normal(key, (16, rows))}
                       for name, key, rows in (("query", keys[0], 16), ("key", keys[1], 8),
                                               ("value", keys[2], 8))}}
    x = jax.random.normal(keys[3], (2, 6, 16))
    config = MuonConfig(lr=0.0, weight_decay=0.0, ns_dtype="float32",
                        qk_clip={"threshold": 2.0})
    tx = muon_jax.muon(config)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss = lambda p: (_attention(p, x)[0] ** 2).mean()  # noqa: E731
        (_, aux), grads = jax.value_and_grad(lambda p: (loss(p), _attention(p, x)[1]),
                                             has_aux=True)(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return muon_jax.qk_clip(params, aux, config), aux

    before_params = params
    params, aux = step(params, state)
    np.testing.assert_allclose(aux["attn"], _explicit_max(before_params, x), rtol=1e-5)
    after = _explicit_max(params, x)
    for group in range(2):
        b, a = aux["attn"][2 * group:2 * group + 2], after[2 * group:2 * group + 2]
        if b.max() > 2.0:
            assert float(a.max()) == pytest.approx(2.0, rel=1e-5)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5)
    assert float(aux["attn"].max()) > 2.0


def test_nonfinite_logits_raise_outside_jit():
    case = separate(2, 2)
    params = {n: jnp.asarray(p) for n, p in case.pack(
        random_heads(case, np.random.default_rng(0))).items()}
    with pytest.raises(ValueError, match=r"qk_max\['attn'\] holds NaN"):
        muon_jax.qk_clip(params, {"attn": jnp.array([5.0, jnp.nan])}, case.config,
                         layout="out_in")
