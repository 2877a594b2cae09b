"""muon_jax under a 4-device mesh with NamedSharding parameters.

JAX reads the device count when it starts, so the check runs in a fresh interpreter
(this file run as a script) with `--xla_force_host_platform_device_count=4`.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

pytestmark = pytest.mark.jax

DEVICES = 4


def test_sharded_update_equals_unsharded():
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for axis_type in ("Auto", "Explicit"):
        assert f"{axis_type}: sharded steps match" in done.stdout
    assert "non-finite raised" in done.stdout


def _check_sharded_steps(axis_type: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import muon_jax
    from muon_core import MuonConfig

    assert jax.device_count() == DEVICES, jax.devices()
    mesh = jax.make_mesh((DEVICES,), ("model",), axis_types=(getattr(AxisType, axis_type),))
    specs = {"embed": P("model", None), "h.0.qkv": P(None, "model"), "h.0.fc": P("model", None),
             "h.1.fc": P(None, "model"), "h.1.bias": P("model"),
             "conv": P(None, None, None, "model")}
    shapes = {"embed": (16, 8), "h.0.qkv": (8, 24), "h.0.fc": (8, 32), "h.1.fc": (32, 8),
              "h.1.bias": (8,), "conv": (3, 3, 4, 8)}
    rng = np.random.default_rng(0)
    params = {n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in shapes.items()}
    grads = [{n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in shapes.items()}
             for _ in range(3)]
    shardings = {n: NamedSharding(mesh, specs[n]) for n in shapes}
    tx = muon_jax.muon(MuonConfig(lr=0.02, ns_dtype="float32"))

    def run(params, grads_list, place):
        params = place(params)
        state = tx.init(params)
        step = jax.jit(tx.update)
        states = [state]
        for g in grads_list:
            updates, state = step(place(g), state, params)
            params = optax.apply_updates(params, updates)
            states.append(state)
        return params, states

    plain_params, _ = run(params, grads, lambda t: t)
    sharded_params, states = run(params, grads, lambda t: jax.device_put(t, shardings))
    for name in shapes:
        np.testing.assert_allclose(sharded_params[name], plain_params[name], atol=1e-5,
                                   err_msg=name)
        assert sharded_params[name].sharding.is_equivalent_to(shardings[name], len(shapes[name]))
    for state in states:
        for field in (state.momentum_buffer, state.mu, state.nu):
            for name, value in field.items():
                if isinstance(value, optax.MaskedNode):  # the other half's leaf
                    continue
                assert value.sharding.is_equivalent_to(shardings[name], value.ndim), (
                    name, value.sharding, shardings[name])
    print(f"{axis_type}: sharded steps match")


def _check_nonfinite_raises() -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import muon_jax

    mesh = jax.make_mesh((DEVICES,), ("model",), axis_types=(AxisType.Auto,))
    params = {"w": jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P("model", None)))}
    grads = {"w": jax.device_put(jnp.ones((8, 8)).at[3, 3].set(jnp.inf), params["w"].sharding)}
    tx = muon_jax.muon()
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    assert not jnp.any(updates["w"]) and not jnp.any(new_state.momentum_buffer["w"])
    try:
        muon_jax.raise_if_nonfinite(new_state)
    except FloatingPointError as error:
        assert "non-finite gradient (NaN or Inf) in 'w' (8x8)" in str(error), error
        print("non-finite raised")


if __name__ == "__main__":
    _check_sharded_steps("Auto")
    _check_sharded_steps("Explicit")
    _check_nonfinite_raises()
