"""Owner-per-matrix Newton-Schulz (`sharded_ns="owner"`) on forced host devices.

JAX reads the device count when it starts, so each check runs this file as a script in a fresh
interpreter with `--xla_force_host_platform_device_count=N`. Every sharded run is compared with
the same transformation on unsharded arrays (one device).
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

pytestmark = pytest.mark.jax

# name -> shape (flax layout): fused QKV split in three, tall and wide MLP matrices, a conv
# kernel, a stack of 4 matrices orthogonalized one by one (see RULES), and AdamW leaves.
SHAPES = {"embed": (16, 8), "h.0.attn.qkv": (8, 24), "h.0.mlp.fc": (8, 32),
          "h.0.mlp.proj": (32, 8), "h.1.mlp.fc": (8, 32), "h.1.bias": (8,),
          "conv": (3, 3, 4, 8), "layers": (4, 8, 16)}


def _run(devices: int, *checks: str) -> str:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, __file__, *checks], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    return done.stdout


def test_owner_mode_matches_unsharded_on_two_devices():
    out = _run(2, "equal:Explicit:fsdp:3", "equal:Auto:fsdp:3", "wrappers:Explicit:replicated:4",
               "nonfinite", "blockwise", "divided")
    for case in ("Explicit fsdp", "Auto fsdp"):
        assert f"{case}: 3 steps match" in out, out
    assert "wrappers Explicit replicated: 4 steps match" in out, out
    assert "non-finite raised" in out, out
    assert "blockwise matches over 1 steps" in out, out
    assert "work divided on 2 devices" in out, out


ADAPTIVE = [(m, a, k) for m in ("normuon", "adamuon")
            for a, k in (("Explicit", "fsdp"), ("Auto", "fsdp"), ("Explicit", "replicated"))]


def _check_second_moments(cases, blockwise):
    out = _run(2, *(f"adaptive:{a}:{k}:{m}:3" for m, a, k in cases),
               *(f"blockwise:{m}:3" for m in blockwise))
    for method, axis_type, kind in cases:
        assert f"{method} {axis_type} {kind}: 3 steps match" in out, out
    for method in blockwise:
        assert f"blockwise {method} matches over 3 steps" in out, out


def test_second_moments_in_sharded_modes_on_two_devices():
    """NorMuon and AdaMuon (with cautious decay): the owner mode equals the unsharded run, the
    blockwise mode the float64 reference of its definition, parameters and state alike."""
    _check_second_moments(ADAPTIVE[::2], ("normuon",))


@pytest.mark.slow
def test_second_moments_in_sharded_modes_every_layout():
    _check_second_moments(ADAPTIVE[1::2], ("adamuon",))


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 4, 8])
def test_owner_mode_matches_unsharded_over_twenty_steps(devices):
    cases = [f"equal:{a}:{k}:20" for a in ("Explicit", "Auto") for k in ("replicated", "fsdp")]
    out = _run(devices, *cases, "wrappers:Explicit:fsdp:20", "wrappers:Explicit:replicated:20",
               "divided")
    for case in ("Explicit replicated", "Explicit fsdp", "Auto replicated", "Auto fsdp"):
        assert f"{case}: 20 steps match" in out, out
    assert "wrappers Explicit fsdp: 20 steps match" in out, out
    assert "work divided" in out, out


# -- the script side -----------------------------------------------------------------------
def _setup(axis_type: str, kind: str):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("data",), axis_types=(getattr(AxisType, axis_type),))

    def spec(shape):
        """FSDP: the first axis the device count divides; replicated: none."""
        axis = next((i for i, s in enumerate(shape) if s % n == 0), None)
        return P(*("data" if kind == "fsdp" and i == axis else None for i in range(len(shape))))

    def place(tree):
        return {k: jax.device_put(v, NamedSharding(mesh, spec(v.shape))) for k, v in tree.items()}

    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
    return mesh, place, params, rng


def _config(**overrides):
    from muon_core import MuonConfig, Rule

    return MuonConfig(**{"lr": 0.02, "weight_decay": 0.01, "ns_dtype": "float32",
                         "rules": (Rule("layers", out_axes=(2,), in_axes=(1,)),), **overrides})


def _trajectory(tx, params, grads, place):
    import jax
    import optax

    """Final parameters, final state and the state's shardings after the first step (init
    puts scalar counters on one device; the first jitted step places them on the mesh)."""
    params = place(params)
    state = tx.init(params)
    step = jax.jit(tx.update)
    first = None
    for g in grads:
        updates, state = step(place(g), state, params)
        params = optax.apply_updates(params, updates)
        first = first or jax.tree.map(lambda x: x.sharding, state)
    return params, state, first


def _grads(rng, steps):
    import jax.numpy as jnp

    return [{k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
            for _ in range(steps)]


def _compare(label, sharded, plain, state, first, placed):
    """Equal to the unsharded run; the state's shardings the same after the first and the last
    step; under explicit axes the parameters keep their shardings (under `Auto` axes output
    shardings are XLA's choice)."""
    import jax
    import numpy as np

    for name in SHAPES:
        np.testing.assert_allclose(sharded[name], plain[name], rtol=1e-5, atol=2e-6,
                                   err_msg=f"{label}: {name}")
        assert "Explicit" not in label or sharded[name].sharding.is_equivalent_to(
            placed[name], len(SHAPES[name])), (label, name, sharded[name].sharding)
    drift = jax.tree.map(lambda s, x: s.is_equivalent_to(x.sharding, x.ndim), first, state)
    assert all(jax.tree.leaves(drift)), (label, drift)


def _momentum_split(state, kind, n):
    """Each device keeps 1/n of every momentum buffer whose leaf is sharded (fsdp)."""
    import jax

    from muon_jax import MuonState

    muon_states = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, MuonState))
                   if isinstance(s, MuonState)]
    bufs = jax.tree.leaves(muon_states[0].momentum_buffer)  # MaskedNode leaves hold nothing
    assert bufs
    for buf in bufs:
        local = buf.addressable_shards[0].data.size
        assert local * (n if kind == "fsdp" else 1) == buf.size, (buf.shape, local)


def check_equal(axis_type: str, kind: str, steps: str) -> None:
    import jax

    import muon_jax

    mesh, place, params, rng = _setup(axis_type, kind)
    grads = _grads(rng, int(steps))
    plain, _, _ = _trajectory(muon_jax.muon(_config()), params, grads, lambda t: t)
    tx = muon_jax.muon(_config(), mesh=mesh, axis="data")
    sharded, state, first = _trajectory(tx, params, grads, place)
    _compare(f"{axis_type} {kind}", sharded, plain, state, first,
             {k: v.sharding for k, v in place(params).items()})
    if axis_type == "Explicit" or kind == "fsdp":
        # Under Auto axes XLA may shard the momentum of replicated parameters too (less memory,
        # not more); only FSDP's 1/N, and explicit axes' placements, are promised.
        _momentum_split(state, kind, jax.device_count())
    print(f"{axis_type} {kind}: {steps} steps match")


def check_adaptive(axis_type: str, kind: str, method: str, steps: str) -> None:
    """`second_moment=method` with cautious weight decay, owner mode vs one device."""
    import numpy as np

    import muon_jax

    mesh, place, params, rng = _setup(axis_type, kind)
    grads = _grads(rng, int(steps))
    config = _config(second_moment=method, cautious_weight_decay=True, weight_decay=0.5)
    plain, plain_state, _ = _trajectory(muon_jax.muon(config), params, grads, lambda t: t)
    tx = muon_jax.muon(config, mesh=mesh, axis="data")
    sharded, state, first = _trajectory(tx, params, grads, place)
    label = f"{axis_type} {kind}"
    _compare(label, sharded, plain, state, first,
             {k: v.sharding for k, v in place(params).items()})
    expected = plain_state.second_moment
    assert set(state.second_moment) == set(expected) and expected, (label, state.second_moment)
    for name, v in expected.items():
        np.testing.assert_allclose(state.second_moment[name], v, rtol=1e-5, atol=1e-7,
                                   err_msg=f"{label}: second moment of {name}")
    print(f"{method} {label}: {steps} steps match")


def check_wrappers(axis_type: str, kind: str, steps: str) -> None:
    """optax.inject_hyperparams (a learning-rate schedule) inside optax.MultiSteps."""
    import optax

    import muon_jax

    mesh, place, params, rng = _setup(axis_type, kind)
    grads = _grads(rng, int(steps))

    def make(**where):
        schedule = optax.linear_schedule(0.02, 0.002, int(steps))
        inner = optax.inject_hyperparams(muon_jax.muon, static_args=("mesh", "axis"))(
            _config(), lr=schedule, **where)
        return optax.MultiSteps(inner, every_k_schedule=2)

    plain, _, _ = _trajectory(make(), params, grads, lambda t: t)
    sharded, state, first = _trajectory(make(mesh=mesh, axis="data"), params, grads, place)
    _compare(f"wrappers {axis_type} {kind}", sharded, plain, state, first,
             {k: v.sharding for k, v in place(params).items()})
    print(f"wrappers {axis_type} {kind}: {steps} steps match")


def check_nonfinite() -> None:
    import jax
    import jax.numpy as jnp

    import muon_jax

    mesh, place, params, rng = _setup("Explicit", "fsdp")
    tx = muon_jax.muon(_config(), mesh=mesh, axis="data")
    params = place(params)
    grads = _grads(rng, 1)[0]
    grads["h.0.mlp.fc"] = grads["h.0.mlp.fc"].at[1, 2].set(jnp.nan)
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(place(grads), state, params)
    assert not any(jnp.any(u) for u in jax.tree.leaves(updates))
    try:
        muon_jax.raise_if_nonfinite(new_state)
    except FloatingPointError as error:
        assert "'h.0.mlp.fc' (8x32)" in str(error), error
        print("non-finite raised")


def check_blockwise(second_moment: str = "none", steps: str = "1") -> None:
    """Steps of scale_by_muon(sharded_ns="blockwise") on FSDP-sharded leaves: each block of
    the matrix view cut into n equal pieces along the axis its leaf is sharded on, every piece
    orthogonalized alone, then the second moment on each whole block (float64: momentum,
    muon_core.orthogonalize of the pieces and muon_core.apply_second_moment, computed here)."""
    import jax
    import numpy as np

    import muon_core
    import muon_jax

    n = jax.device_count()
    mesh, place, params, rng = _setup("Explicit", "fsdp")
    config = _config(second_moment=second_moment)
    tx = muon_jax.scale_by_muon(config, mesh=mesh, axis="data", sharded_ns="blockwise")
    step, state = jax.jit(tx.update), tx.init(place(params))
    entries = muon_jax.plan_for(params, config).muon
    reference = {e.name: {"momentum_buffer": np.zeros(e.shape)} for e in entries}
    for grads in _grads(rng, int(steps)):
        updates, state = step(place(grads), state)
        # FSDP shards each leaf's first dimension n divides (see _setup); in flax layout that
        # is an input dimension (the matrix view's columns) for the 2-D and conv leaves, and
        # the stacking dimension of "layers", whose matrices each device then holds whole.
        for entry in entries:
            st = reference[entry.name]
            direction, st["momentum_buffer"] = muon_core.momentum_update(
                np.asarray(grads[entry.name], np.float64), st["momentum_buffer"],
                config.momentum, config.momentum_kind, config.nesterov)
            view = muon_core.to_matrices(direction, entry)
            pieces = 1 if entry.name == "layers" else n
            blocks = [np.concatenate([muon_core.orthogonalize(c, config.ns_steps) for c in
                                      np.split(view[:, start:start + rows], pieces, axis=2)],
                                     axis=2)
                      for start, rows in zip(entry.block_offsets, entry.blocks)]
            adapted, moments = muon_core.apply_second_moment(np.concatenate(blocks, axis=1), st,
                                                             entry, config)
            st.update(moments)
            np.testing.assert_allclose(updates[entry.name],
                                       muon_core.scaled_update(adapted, entry), atol=2e-5,
                                       err_msg=entry.name)
    for name, st in reference.items():
        if second_moment != "none":
            np.testing.assert_allclose(state.second_moment[name], st["second_moment"],
                                       rtol=1e-4, atol=1e-7, err_msg=name)
    label = "" if second_moment == "none" else f" {second_moment}"
    print(f"blockwise{label} matches over {steps} steps")


def check_divided() -> None:
    """The compiled owner-mode update's dots (counted in its per-device HLO, loops included)
    are each device's share under muon_core.pack_by_shape; the replicated mode's are the
    whole plan's."""
    import jax

    import muon_core
    import muon_jax

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from jax_sharded_ns import hlo_counts

    n = jax.device_count()
    mesh, place, params, rng = _setup("Explicit", "replicated")
    params, grads = place(params), place(_grads(rng, 1)[0])
    # muon_core.ns_flops counts the standard iteration (Gram Newton-Schulz does fewer products).
    config = _config(ns_algorithm="standard")
    plan = muon_jax.plan_for(params, config)

    def dot_flops(sharded_ns):
        tx = muon_jax.muon(config, mesh=mesh, axis="data", sharded_ns=sharded_ns)
        compiled = jax.jit(tx.update).lower(grads, tx.init(params), params).compile()
        return hlo_counts(compiled.as_text())[0]

    steps = config.ns_steps
    assert dot_flops("owner") == muon_core.packed_ns_flops(muon_core.pack_by_shape(plan, n), steps)
    assert dot_flops("replicated") == muon_core.total_ns_flops(plan)
    print(f"work divided on {n} devices")

if __name__ == "__main__":
    for check in sys.argv[1:]:
        name, *args = check.split(":")
        globals()[f"check_{name}"](*args)
