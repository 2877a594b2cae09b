"""optax's Adam scaling, with a refused step kept inside it (see `scale_by_adam`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from muon_jax._nonfinite import select


def scale_by_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformationExtraArgs:
    """`optax.scale_by_adam(b1, b2, eps)`, same state and same numbers, whose update takes the
    step's `finite_step` flag: where it is false the moments and the count stay as they were.

    The updates are computed from the kept moments (a refused step's updates are for the
    caller to discard), so each moment is written once, in place, and read back by the update:
    XLA needs no copy of the old moments, as it would for a `where` applied afterwards.
    """
    base = optax.scale_by_adam(b1, b2, eps)

    def update_fn(updates: Any, state: optax.ScaleByAdamState, params: Any = None, *,
                  finite_step: Any = True, **extra_args: Any):
        del params, extra_args
        mu = select(finite_step, optax.tree.update_moment(updates, state.mu, b1, 1), state.mu)
        nu = select(finite_step, optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2),
                    state.nu)
        count = jnp.where(finite_step, optax.safe_increment(state.count), state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        # optax's formula with its default eps_root=0, so the numbers match bit for bit
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + 0.0) + eps), mu_hat, nu_hat)
        return updates, optax.ScaleByAdamState(count=count, mu=mu,
                                               nu=optax.tree.cast_like(nu, state.nu))

    return optax.GradientTransformationExtraArgs(base.init, update_fn)
