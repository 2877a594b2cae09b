"""muon_jax.muon against the core's float64 reference, optax composition and bad input."""

import dataclasses

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import muon_core  # noqa: E402
import muon_jax  # noqa: E402
from muon_core import MuonConfig  # noqa: E402

pytestmark = pytest.mark.jax

# torch layout (out, in[, kh, kw]): tall, wide, fused QKV, conv, embedding, head, 1-D.
TORCH_SHAPES = {
    "embed.weight": (12, 8), "h.0.attn.qkv.weight": (24, 8), "h.0.mlp.fc.weight": (16, 8),
    "h.0.mlp.proj.weight": (8, 16), "h.0.mlp.proj.bias": (8,), "conv.weight": (6, 3, 2, 2),
    "norm.weight": (8,), "head.weight": (5, 8),
}
# flax layout of the same tensors: Dense kernels (in, out), Conv kernels (kh, kw, in, out).
TO_FLAX = {2: (1, 0), 4: (2, 3, 1, 0)}
FLOAT32 = dict(ns_dtype="float32")


def _random(shapes, seed):
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=s) for n, s in shapes.items()}


def _to_flax(tree):
    return {n: np.transpose(x, TO_FLAX[x.ndim]) if x.ndim in TO_FLAX else x
            for n, x in tree.items()}


def _reference(config, steps, shapes=TORCH_SHAPES, seed=0, grads=None):
    """The core's reference in float64 (NS in float64): params after each step."""
    params = _random(shapes, seed)
    grads = grads or [_random(shapes, seed + 1 + i) for i in range(steps)]
    ref_config = config.replace(ns_dtype="float64")
    state, history = None, []
    for g in grads:
        params, state = muon_core.reference_step(params, g, state, ref_config)
        history.append(params)
    return history


def _run_jax(tx, steps, shapes=TORCH_SHAPES, seed=0, convert=lambda t: t, jit=True):
    params = {n: jnp.asarray(x, jnp.float32) for n, x in convert(_random(shapes, seed)).items()}
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    history = []
    for i in range(steps):
        g = {n: jnp.asarray(x, jnp.float32)
             for n, x in convert(_random(shapes, seed + 1 + i)).items()}
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history, state


def _assert_close(got, expected, atol):
    for name in expected:
        np.testing.assert_allclose(np.asarray(got[name], np.float64), expected[name],
                                   atol=atol, err_msg=name)


OPTIONS = [
    {},
    dict(nesterov=False),
    dict(momentum_kind="sum", momentum=0.9),
    dict(ns_coefficients="quintic"),
    dict(ns_coefficients="polar_express", ns_steps=7),
    dict(ns_coefficients=[(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)], ns_steps=3),
    dict(lr_scaling="match_rms_adamw"),
    dict(lr_scaling="spectral"),
    dict(lr_scaling="none", split_qkv=False),
    dict(weight_decay=0.0, adamw=dict(weight_decay=0.0, betas=(0.8, 0.9), eps=1e-6)),
    dict(eps=1e-3, lr=0.05),
    dict(rules=[dict(match="conv.*", out_axes=[0, 1], in_axes=[2, 3]),
                dict(match="embed.*", algorithm="muon"), dict(match="*.fc.*", split=[6, 10])]),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_every_option_matches_reference_torch_layout(options):
    config = MuonConfig(lr=0.02, **FLOAT32).replace(**options)
    expected = _reference(config, steps=4)
    got, _ = _run_jax(muon_jax.muon(config, layout="out_in"), steps=4)
    for g, e in zip(got, expected):
        _assert_close(g, e, atol=2e-5)


def test_flax_layout_matches_reference():
    config = MuonConfig(lr=0.02, **FLOAT32)
    expected = _to_flax(_reference(config, steps=3)[-1])
    got, _ = _run_jax(muon_jax.muon(config), steps=3, convert=_to_flax)
    _assert_close(got[-1], expected, atol=2e-5)


def test_flax_dense_gets_the_torch_linear_lr_scale():
    torch_plan = muon_core.plan(TORCH_SHAPES, MuonConfig())
    params = _to_flax(_random(TORCH_SHAPES, 0))
    flax_plan = muon_jax.plan_for(params)
    for entry in torch_plan:
        assert flax_plan[entry.name].algorithm == entry.algorithm
        assert flax_plan[entry.name].lr_scales == entry.lr_scales
    assert flax_plan["h.0.mlp.fc.weight"].lr_scales == (2.0 ** 0.5,)  # 16 outputs, 8 inputs


def test_flax_style_tree_routes_like_torch_modules():
    params = {"params": {"Embed_0": {"embedding": jnp.ones((50, 8))},
                         "Dense_0": {"kernel": jnp.ones((8, 32)), "bias": jnp.ones(32)},
                         "Dense_1": {"kernel": jnp.ones((32, 50))},
                         "Conv_0": {"kernel": jnp.ones((3, 3, 4, 8))}}}
    plan = muon_jax.plan_for(params)
    assert plan["params.Embed_0.embedding"].algorithm == "adamw"
    assert plan["params.Dense_0.bias"].algorithm == "adamw"
    assert plan["params.Dense_1.kernel"].why == "head module"  # the last Dense: the logits
    dense, conv = plan["params.Dense_0.kernel"], plan["params.Conv_0.kernel"]
    assert (dense.matrix_shape, dense.lr_scales) == ((1, 32, 8), (2.0,))  # torch Linear(8, 32)
    assert conv.matrix_shape == (1, 8, 36)  # torch Conv2d(4, 8, 3): (out, in * kh * kw)


def test_signature_lists_every_config_field_for_inject_hyperparams():
    import inspect

    fields = {f.name for f in dataclasses.fields(MuonConfig)} | {"adamw_lr", "adamw_weight_decay"}
    for factory in (muon_jax.muon, muon_jax.scale_by_muon):
        keywords = set(inspect.signature(factory).parameters) - {"config", "layout", "algorithms",
                                                              "mesh", "axis", "sharded_ns"}
        assert keywords == fields


def test_bad_sharded_ns_is_named():
    for factory in (muon_jax.muon, muon_jax.scale_by_muon):
        with pytest.raises(ValueError, match="sharded_ns='everywhere' is invalid"):
            factory(sharded_ns="everywhere")


def test_bfloat16_close_to_reference():
    config = MuonConfig(lr=0.02, ns_dtype="bfloat16")
    expected = _reference(config, steps=3)[-1]
    got, _ = _run_jax(muon_jax.muon(config, layout="out_in"), steps=3)
    # bf16 NS differs from float64 by a few 1e-2 per entry; lr=0.02 and 3 steps scale that.
    _assert_close(got[-1], expected, atol=3e-3)


def test_bfloat16_params_keep_their_dtype():
    params = {"w": jnp.ones((4, 6), jnp.bfloat16), "b": jnp.ones(6, jnp.bfloat16)}
    tx = muon_jax.muon(MuonConfig())
    state = tx.init(params)
    updates, state = tx.update(jax.tree.map(lambda x: 0.1 * x, params), state, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert state.momentum_buffer["w"].dtype == jnp.bfloat16


def test_bfloat16_gradients_do_not_round_float32_state():
    params = {"w": jnp.ones((4, 6)), "b": jnp.ones(6)}
    grads = {"w": jnp.full((4, 6), 0.1, jnp.bfloat16), "b": jnp.full(6, 1 / 3, jnp.bfloat16)}
    tx = muon_jax.muon(MuonConfig())
    _, state = tx.update(grads, tx.init(params), params)
    g = float(grads["b"][0])
    beta1, beta2 = MuonConfig().adamw.betas
    assert state.mu["b"].dtype == state.nu["b"].dtype == jnp.float32
    np.testing.assert_allclose(state.mu["b"], (1 - beta1) * g, rtol=1e-6)
    np.testing.assert_allclose(state.nu["b"], (1 - beta2) * g * g, rtol=1e-6)
    np.testing.assert_allclose(state.momentum_buffer["w"], (1 - 0.95) * float(grads["w"][0, 0]),
                               rtol=1e-6)


def test_state_maps_to_reference_state():
    config = MuonConfig(lr=0.02, **FLOAT32)
    params = _random(TORCH_SHAPES, 0)
    state = None
    for i in range(2):
        params, state = muon_core.reference_step(params, _random(TORCH_SHAPES, 1 + i), state,
                                                 config.replace(ns_dtype="float64"))
    _, ours = _run_jax(muon_jax.muon(config, layout="out_in"), steps=2)
    for name, st in state.items():
        if "momentum_buffer" in st:
            np.testing.assert_allclose(ours.momentum_buffer[name], st["momentum_buffer"],
                                       rtol=1e-5, atol=1e-7)
        else:
            assert int(ours.count) == st["step"] == 2
            np.testing.assert_allclose(ours.mu[name], st["exp_avg"], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(ours.nu[name], st["exp_avg_sq"], rtol=1e-5, atol=1e-7)
    assert int(ours.nonfinite.count) == 0


def test_matches_optax_contrib_muon_without_nesterov():
    # Without Nesterov, optax's bias correction rescales the momentum, which normalisation removes.
    config = MuonConfig(lr=0.03, nesterov=False, eps=1e-8, weight_decay=0.1, **FLOAT32,
                        adamw=dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05))
    shapes = {"h.0.w": (8, 16), "h.1.w": (16, 8), "h.1.b": (8,)}  # flax (in, out)
    plan = muon_jax.plan_for(shapes := {n: np.zeros(s) for n, s in shapes.items()}, config)
    dims = {e.name: optax.contrib.MuonDimensionNumbers(0, 1) if e.is_muon else None
            for e in plan}
    peer = optax.contrib.muon(
        learning_rate=config.lr, beta=config.momentum, eps=config.eps, nesterov=False,
        weight_decay=config.weight_decay, adam_b1=0.9, adam_b2=0.99,
        adam_weight_decay=0.05, adam_learning_rate=1e-3, muon_weight_dimension_numbers=dims)
    as_shapes = {n: x.shape for n, x in shapes.items()}
    ours, _ = _run_jax(muon_jax.muon(config), steps=5, shapes=as_shapes)
    theirs, _ = _run_jax(peer, steps=5, shapes=as_shapes)
    _assert_close(ours[-1], {n: np.asarray(x) for n, x in theirs[-1].items()}, atol=1e-5)


def test_no_retrace_or_recompile_on_later_steps():
    traces = []
    tx = muon_jax.muon(MuonConfig())

    def step(grads, state, params):
        traces.append(1)
        return tx.update(grads, state, params)

    jitted = jax.jit(step)
    params = {n: jnp.asarray(x, jnp.float32) for n, x in _random(TORCH_SHAPES, 0).items()}
    state = tx.init(params)
    for i in range(3):
        grads = {n: jnp.asarray(x, jnp.float32) for n, x in _random(TORCH_SHAPES, i).items()}
        updates, state = jitted(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert len(traces) == 1
    assert jitted._cache_size() == 1


def test_inject_hyperparams_changes_lr_without_retracing():
    config = MuonConfig(**FLOAT32)
    tx = optax.inject_hyperparams(muon_jax.muon)(config, layout="out_in", lr=0.02,
                                                 momentum=0.9,
                                                 weight_decay=0.05, adamw_lr=1e-3,
                                                 adamw_weight_decay=0.2)
    expected = _reference(config.replace(lr=0.02, momentum=0.9, weight_decay=0.05,
                                         adamw=dict(lr=1e-3, weight_decay=0.2)), steps=2)
    traces = []

    def step(grads, state, params):
        traces.append(1)
        return tx.update(grads, state, params)

    got, state = _run_jax(optax.GradientTransformation(tx.init, step), steps=2)
    _assert_close(got[-1], expected[-1], atol=2e-5)
    state.hyperparams["lr"] = jnp.asarray(0.5)
    params = got[-1]
    updates, _ = jax.jit(step)(params, state, params)
    assert len(traces) == 1 + 1  # one trace for _run_jax's jit, one for this jit: no retrace
    muon_only = muon_jax.muon(config, layout="out_in", lr=0.5, momentum=0.9, weight_decay=0.05,
                              adamw_lr=1e-3, adamw_weight_decay=0.2)
    expected_updates, _ = muon_only.update(params, state.inner_state, params)
    _assert_close(updates, {n: np.asarray(x) for n, x in expected_updates.items()}, atol=1e-6)


def test_inject_hyperparams_follows_an_lr_schedule():
    config = MuonConfig(**FLOAT32)
    schedule = optax.piecewise_constant_schedule(0.02, {1: 0.5})  # 0.02, then 0.01
    tx = optax.inject_hyperparams(muon_jax.muon)(config, lr=schedule)
    params = {"w": jnp.asarray(_random({"w": (4, 6)}, 0)["w"], jnp.float32)}
    grads = [{"w": jnp.asarray(_random({"w": (4, 6)}, s)["w"], jnp.float32)} for s in (1, 2)]
    state = tx.init(params)
    expected_state = muon_jax.muon(config).init(params)
    for g, lr in zip(grads, (0.02, 0.01)):
        updates, state = jax.jit(tx.update)(g, state, params)
        expected, expected_state = muon_jax.muon(config, lr=lr).update(g, expected_state, params)
        np.testing.assert_allclose(updates["w"], expected["w"], atol=1e-7)


def test_inject_hyperparams_refuses_traced_static_field():
    tx = optax.inject_hyperparams(muon_jax.muon)(MuonConfig(), ns_steps=3)
    with pytest.raises(TypeError, match=r"ns_steps got an array, but it is static"):
        tx.init({"w": jnp.ones((3, 4))})
    tx = optax.inject_hyperparams(muon_jax.muon, static_args=("ns_steps",))(MuonConfig(),
                                                                          ns_steps=3)
    assert tx.init({"w": jnp.ones((3, 4))}).inner_state.momentum_buffer["w"].shape == (3, 4)


def test_multisteps_equals_one_step_on_mean_gradient():
    config = MuonConfig(lr=0.02, **FLOAT32)
    params = {n: jnp.asarray(x, jnp.float32) for n, x in _random(TORCH_SHAPES, 0).items()}
    g1, g2 = ({n: jnp.asarray(x, jnp.float32) for n, x in _random(TORCH_SHAPES, s).items()}
              for s in (1, 2))
    multi = optax.MultiSteps(muon_jax.muon(config), every_k_schedule=2)
    state = multi.init(params)
    first, state = multi.update(g1, state, params)
    assert not any(np.asarray(u).any() for u in jax.tree.leaves(first))
    second, _ = multi.update(g2, state, params)
    single = muon_jax.muon(config)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    expected, _ = single.update(mean, single.init(params), params)
    _assert_close(second, {n: np.asarray(x) for n, x in expected.items()}, atol=1e-6)


def test_chain_and_scale_by_muon_primitive():
    config = MuonConfig(lr=0.02, weight_decay=0.1, **FLOAT32)
    shapes = {"a.w": (8, 16), "b.w": (16, 8), "c.w": (3, 2, 4, 6)}
    params = {n: jnp.asarray(x, jnp.float32) for n, x in _random(shapes, 0).items()}
    grads = {n: jnp.asarray(x, jnp.float32) for n, x in _random(shapes, 1).items()}
    chained = optax.chain(optax.scale(0.5), muon_jax.scale_by_muon(config),
                          optax.add_decayed_weights(0.1), optax.scale_by_learning_rate(0.02))
    whole = muon_jax.muon(config)
    got, _ = chained.update(grads, chained.init(params), params)
    half = jax.tree.map(lambda g: 0.5 * g, grads)
    expected, _ = whole.update(half, whole.init(params), params)
    assert muon_jax.plan_for(params, config).adamw == ()
    _assert_close(got, {n: np.asarray(x) for n, x in expected.items()}, atol=1e-7)


def test_scale_by_muon_passes_adamw_leaves_through():
    tx = muon_jax.scale_by_muon(MuonConfig())
    params = {"w": jnp.ones((4, 6)), "b": jnp.arange(6.0)}
    updates, state = tx.update(params, tx.init(params))
    np.testing.assert_array_equal(updates["b"], params["b"])
    # the state is shaped like the params: a buffer for the Muon leaf, a MaskedNode for the other
    assert isinstance(state.momentum_buffer["b"], optax.MaskedNode)
    assert state.momentum_buffer["w"].shape == (4, 6)


def test_leaf_names_from_key_paths():
    @dataclasses.dataclass
    class Block:
        w: jax.Array

    jax.tree_util.register_dataclass(Block, data_fields=["w"], meta_fields=[])
    tree = {"blocks": [{"w": 1.0}, Block(w=2.0)], "a.b": (3.0,)}
    assert muon_jax.leaf_names(tree) == ["a.b.0", "blocks.0.w", "blocks.1.w"]


def test_algorithms_override_routing():
    params = {"h": {"w": jnp.ones((4, 6))}, "lm_head": jnp.ones((6, 9))}
    plan = muon_jax.plan_for(params, algorithms={"h.w": "adamw", "lm_head": "muon"})
    assert [(e.name, e.algorithm) for e in plan] == [("h.w", "adamw"), ("lm_head", "muon")]
    with pytest.raises(ValueError, match=r"\['h\.v'\], which are not leaves"):
        muon_jax.muon(algorithms={"h.v": "adamw"}).init(params)


# -- bad input --------------------------------------------------------------------------------
PARAMS = {"h": {"w": jnp.ones((4, 6)), "b": jnp.ones(6)}}


def _grads(**changes):
    return {"h": {"w": jnp.full((4, 6), 0.1), "b": jnp.full(6, 0.1)} | changes}


@pytest.mark.parametrize("grads, error, match", [
    (_grads(w=jnp.ones((6, 4))), ValueError,
     r"update of 'h\.w' has shape \(6, 4\), expected the parameter's shape \(4, 6\)"),
    (_grads(b=jnp.ones(6, jnp.int32)), TypeError, r"update leaf 'h\.b' \(6\) has dtype int32"),
    ({"h": {"w": jnp.ones((4, 6))}}, ValueError, r"differ in structure"),
])
def test_bad_updates_name_the_leaf(grads, error, match):
    tx = muon_jax.muon()
    with pytest.raises(error, match=match):
        tx.update(grads, tx.init(PARAMS), PARAMS)


def test_state_from_other_params_is_refused():
    tx = muon_jax.muon()
    state = tx.init({"h": {"v": jnp.ones((4, 6)), "b": jnp.ones(6)}})
    with pytest.raises(ValueError, match=r"state.nonfinite was made for leaves \['h\.b', 'h\.v'\]"):
        tx.update(_grads(), state, PARAMS)


def test_weight_decay_needs_params():
    tx = muon_jax.muon()
    with pytest.raises(ValueError, match="weight decay needs the parameters"):
        tx.update(_grads(), tx.init(PARAMS))
    no_decay = muon_jax.muon(weight_decay=0.0, adamw_weight_decay=0.0)
    updates, _ = no_decay.update(_grads(), no_decay.init(PARAMS))
    assert updates["h"]["w"].shape == (4, 6)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr=-1.0), ValueError, r"lr=-1\.0 is invalid"),
    (dict(adamw_lr=float("nan")), ValueError, r"adamw\.lr=nan is invalid"),
    (dict(lr=jnp.ones(2)), TypeError, r"lr must be a real scalar, got shape \(2,\)"),
    (dict(learning_rate=0.1), TypeError, r"unknown keyword\(s\) \['learning_rate'\]"),
    (dict(config={"lr": 0.1}), TypeError, r"config must be a MuonConfig"),
])
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        muon_jax.muon(**kwargs)


def test_duplicate_leaf_names_are_refused():
    with pytest.raises(ValueError, match=r"two leaves share the name 'a\.b'"):
        muon_jax.muon().init({"a.b": jnp.ones((2, 2)), "a": {"b": jnp.ones((2, 2))}})


# -- non-finite gradients ------------------------------------------------------------------------
def _nan_grads():
    return _grads(w=jnp.ones((4, 6)).at[1, 2].set(jnp.nan))


def test_nonfinite_raise_eager_names_the_leaf():
    tx = muon_jax.muon()
    with pytest.raises(FloatingPointError, match=r"'h\.w' \(4x6\); nothing was updated"):
        tx.update(_nan_grads(), tx.init(PARAMS), PARAMS)


def test_nonfinite_raise_under_jit_reports_when_the_step_runs():
    tx = muon_jax.muon()
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"'h\.w' \(4x6\); nothing was updated"):
        jax.block_until_ready(jax.jit(tx.update)(_nan_grads(), tx.init(PARAMS), PARAMS))


@pytest.mark.parametrize("jit", [False, True])
def test_nonfinite_skip_zeroes_updates_and_keeps_state(jit):
    tx = muon_jax.muon(nonfinite="skip")
    update = jax.jit(tx.update) if jit else tx.update
    state0 = tx.init(PARAMS)
    _, state1 = update(_grads(), state0, PARAMS)
    updates, state2 = update(_nan_grads(), state1, PARAMS)
    assert not any(np.asarray(u).any() for u in jax.tree.leaves(updates))
    kept = (state1.count, state1.momentum_buffer, state1.mu, state1.nu)
    again = (state2.count, state2.momentum_buffer, state2.mu, state2.nu)
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(state2.nonfinite.count) == 1
    assert state2.nonfinite.latest.tolist() == [False, True]  # leaves h.b, h.w
    with pytest.raises(FloatingPointError, match=r"in 'h\.w' \(4x6\);"):
        muon_jax.raise_if_nonfinite((optax.EmptyState(), state2))
    _, state3 = update(_grads(), state2, PARAMS)
    muon_jax.raise_if_nonfinite(state3)  # the latest step was finite: no error
    assert int(state3.nonfinite.count) == 1
