"""optax's common optimizer checks, run against muon_jax.

The checks follow the shapes of optax's own shared optimizer tests (dtype preservation,
inject_hyperparams, MultiSteps, tree_map_params, extra args, jit against no jit, chain and
apply_updates). Where muon_jax departs from optax's conventions on purpose, the check is
kept and marked xfail(strict=True) with the reason, as listed in docs/jax.md.
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import muon_jax  # noqa: E402
from muon_core import MuonConfig  # noqa: E402

pytestmark = pytest.mark.jax

# A Muon matrix, an AdamW bias and an AdamW embedding (by name), flax layout.
SHAPES = {"dense": {"kernel": (4, 6), "bias": (6,)}, "embed": {"embedding": (5, 4)}}
CONFIG = MuonConfig(lr=0.02, weight_decay=0.1, ns_dtype="float32",
                    adamw={"lr": 1e-3, "weight_decay": 0.05})


def _tree(seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), dtype), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))


def _close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   atol=atol)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_updates_keep_the_params_dtype(dtype):
    tx = muon_jax.muon(CONFIG)
    params = _tree(0, dtype)
    updates, _ = jax.jit(tx.update)(_tree(1, dtype), jax.jit(tx.init)(params), params)
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_state_dtypes_and_shapes_are_stable_across_steps(dtype):
    # lax.cond needs both branches to give the same state types, as in optax's check.
    tx = muon_jax.muon(CONFIG)
    params = _tree(0, dtype)
    state = tx.init(params)

    @jax.jit
    def step(params, state, take):
        updates, new_state = tx.update(_tree(1, dtype), state, params)
        return jax.lax.cond(take, lambda: new_state, lambda: state), updates

    for take in (True, False):
        new_state, _ = step(params, state, take)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
            assert (a.dtype, a.shape) == (b.dtype, b.shape)


def test_inject_hyperparams_matches_plain_and_never_retraces():
    values = [dict(lr=0.02, momentum=0.9, weight_decay=0.1, adamw_lr=1e-3),
              dict(lr=0.01, momentum=0.8, weight_decay=0.0, adamw_lr=5e-4)]
    tx = optax.inject_hyperparams(muon_jax.muon)(CONFIG, **values[0])
    traces = []

    @jax.jit
    def step(grads, state, params):
        traces.append(1)
        return tx.update(grads, state, params)

    params, state = _tree(0), tx.init(_tree(0))
    plain_state = muon_jax.muon(CONFIG).init(params)
    for i, hyper in enumerate(values):
        for name, value in hyper.items():
            state.hyperparams[name] = jnp.asarray(value)
        updates, state = step(_tree(1 + i), state, params)
        plain = muon_jax.muon(CONFIG, **hyper)
        expected, plain_state = plain.update(_tree(1 + i), plain_state, params)
        _close(updates, expected, atol=1e-6)
        _close(state.inner_state, plain_state, atol=1e-6)
    assert len(traces) == 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_multisteps_accumulates_with_zero_updates_between(dtype):
    tx = optax.MultiSteps(muon_jax.muon(CONFIG), every_k_schedule=4)
    params = _tree(0, dtype)
    updates, _ = jax.jit(tx.update)(_tree(1, dtype), jax.jit(tx.init)(params), params)
    for u in jax.tree.leaves(updates):
        assert u.dtype == dtype and not np.asarray(u, np.float32).any()


def test_tree_map_params_reaches_every_params_shaped_tree():
    tx = muon_jax.muon(CONFIG)
    params = _tree(0)
    _, state = tx.update(_tree(1), tx.init(params), params)
    same = optax.tree.map_params(tx, lambda v: v, state)
    _close(same, state, atol=0)
    # As for sharding specs: a label per parameter replaces each params-shaped tree.
    labels = jax.tree.map(lambda x: f"spec{x.ndim}", params)
    specs = optax.tree_utils.tree_map_params(
        tx, lambda _, label: label, state, labels, transform_non_params=lambda _: None,
        is_leaf=lambda v: isinstance(v, optax.MaskedNode))
    assert specs.momentum_buffer["dense"]["kernel"] == "spec2"
    assert specs.mu["dense"]["bias"] == "spec1"
    assert specs.nu["embed"]["embedding"] == "spec2"
    assert specs.count is None and specs.nonfinite.count is None


def test_extra_args_are_accepted_and_ignored_without_recompiling():
    for tx in (muon_jax.muon(CONFIG), muon_jax.scale_by_muon(CONFIG)):
        assert isinstance(tx, optax.GradientTransformationExtraArgs)
        params = _tree(0)

        @jax.jit
        def step(params, state, tx=tx):
            updates, state = tx.update(_tree(1), state, params, unexpected_extra_arg=1)
            return optax.apply_updates(params, updates), state

        state = tx.init(params)
        expected, _ = tx.update(_tree(1), state, params)
        params1, state = step(params, state)
        _close(params1, optax.apply_updates(params, expected), atol=1e-6)
        step(params1, state)
        assert step._cache_size() == 1


def test_jit_and_no_jit_give_the_same_steps():
    tx = muon_jax.muon(CONFIG)
    eager = jitted = _tree(0)
    eager_state = jitted_state = tx.init(eager)
    update = jax.jit(tx.update)
    for seed in (1, 2, 3):
        u, eager_state = tx.update(_tree(seed), eager_state, eager)
        eager = optax.apply_updates(eager, u)
        u, jitted_state = update(_tree(seed), jitted_state, jitted)
        jitted = optax.apply_updates(jitted, u)
    _close(eager, jitted, atol=1e-6)
    _close(eager_state, jitted_state, atol=1e-6)


def test_chain_with_clipping_then_apply_updates():
    clip = 0.5
    tx = optax.chain(optax.clip_by_global_norm(clip), muon_jax.muon(CONFIG))
    params, grads = _tree(0), _tree(1)
    updates, _ = tx.update(grads, tx.init(params), params)
    clipped = jax.tree.map(lambda g: g * clip / optax.tree.norm(grads), grads)
    alone = muon_jax.muon(CONFIG)
    expected, _ = alone.update(clipped, alone.init(params), params)
    _close(optax.apply_updates(params, updates), optax.apply_updates(params, expected), 1e-6)


# -- deliberate differences from optax's conventions (docs/jax.md, "Differences from optax") --
@pytest.mark.xfail(strict=True, raises=TypeError,
                   reason="hyper-parameters are named as in torch.optim and MuonConfig (lr), "
                          "not optax's learning_rate, so one config serves both backends")
def test_learning_rate_keyword_as_optax_names_it():
    muon_jax.muon(learning_rate=0.02)


@pytest.mark.xfail(strict=True, raises=ValueError,
                   reason="the config holds plain numbers (serialisable, shared with torch); "
                          "a schedule goes through optax.inject_hyperparams")
def test_schedule_passed_directly_as_lr():
    tx = muon_jax.muon(CONFIG, lr=optax.linear_schedule(0.02, 0.0, 10))
    tx.init(_tree(0))


@pytest.mark.xfail(strict=True, raises=TypeError,
                   reason="complex parameters are refused: Newton-Schulz here is defined for "
                          "real matrices, and the reference step has no complex form")
def test_complex_parameters():
    params = {"w": jnp.ones((4, 6), jnp.complex64)}
    muon_jax.muon(CONFIG).init(params)


def test_partial_adamw_override_keeps_the_other_adamw_fields():
    # An `adamw` mapping in the overrides used to replace the whole AdamWConfig with defaults.
    from muon_jax._hyper import resolve

    base = MuonConfig(adamw={"lr": 1e-3, "betas": (0.8, 0.9), "weight_decay": 0.0})
    config, hyper = resolve(base, {"adamw": {"eps": 1e-6}, "adamw_lr": 2e-3})
    assert config.adamw.betas == (0.8, 0.9) and config.adamw.weight_decay == 0.0
    assert config.adamw.eps == 1e-6 and hyper.adamw_lr == config.adamw.lr == 2e-3


def test_docs_inject_hyperparams_example_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "jax.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S)
                 if "inject_hyperparams" in b)
    namespace: dict = {}
    exec(compile(block, "docs/jax.md", "exec"), namespace)
    assert float(namespace["state"].hyperparams["lr"]) == pytest.approx(0.01)
