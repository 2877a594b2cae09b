"""QK-clip for JAX: the per-head largest logit returned with the loss (`has_aux`), and a pure
function rescaling the parameters after `optax.apply_updates` (see `muon_core.qk_clip`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

import muon_core
from muon_core import MuonConfig


def qk_max(q: jax.Array, k: jax.Array, scale: float | None = None,
           mask: jax.Array | None = None) -> jax.Array:
    """The largest pre-softmax logit of each query head, shape `(heads,)`, without gradient.

    `q` `(..., length, heads, dim)` and `k` `(..., length, kv_heads, dim)` as flax's
    `dot_product_attention` takes them; `scale` defaults to `1/sqrt(dim)`; `mask` (True where a
    query may attend) broadcasts against `(..., heads, queries, keys)`. Return it from the loss
    function through `has_aux`, keyed by the attention layer's name.
    """
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    return muon_core.max_logits(q, k, scale=scale, mask=mask, heads_axis=-2)


def qk_clip(params: Any, qk_max: Mapping[str, Any], config: MuonConfig, *,
            layout: str = "in_out", algorithms: Mapping[str, str] | None = None) -> Any:
    """QK-clip: `params` (the pytree after `optax.apply_updates`) with the query and key rows of
    every head whose logit in `qk_max` (layer name -> per-head maxima) exceeded
    `config.qk_clip.threshold` scaled down; routed as `muon(config, layout=..., algorithms=...)`
    routes them. Works under `jit`; outside it, non-finite logits raise ValueError (under
    `jit` they are not checked: the loss they come with is then non-finite too)."""
    from muon_jax import leaf_names, plan_for

    leaves, treedef = jax.tree_util.tree_flatten(params)
    names = leaf_names(params)
    plan = plan_for(params, config, layout=layout, algorithms=algorithms)
    qk_max = {layer: jnp.asarray(s) for layer, s in qk_max.items()}
    traced = any(isinstance(s, jax.core.Tracer) for s in qk_max.values())
    scales = muon_core.qk_clip_scales(plan, qk_max, config, layout=layout, check=not traced)
    new = [leaf * scales[name].astype(leaf.dtype) if name in scales else leaf
           for name, leaf in zip(names, leaves)]
    return jax.tree_util.tree_unflatten(treedef, new)
