"""Small pure-JAX models as dict pytrees, in flax's layout (kernels are (in, out)).

The names mirror `muon_cli.torch_models` (fc1, head, wte, h.N.attn.qkv, lm_head, ...), so one
TOML config routes the torch and the JAX model the same way.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def dense(key: jax.Array, n_in: int, n_out: int, bias: bool = True) -> dict:
    """A dense layer `{"kernel": (in, out), "bias": (out,)}` with torch's default init."""
    bound = 1.0 / math.sqrt(n_in)
    k1, k2 = jax.random.split(key)
    layer = {"kernel": jax.random.uniform(k1, (n_in, n_out), jnp.float32, -bound, bound)}
    if bias:
        layer["bias"] = jax.random.uniform(k2, (n_out,), jnp.float32, -bound, bound)
    return layer


def apply_dense(layer: dict, x: jax.Array) -> jax.Array:
    """`x @ kernel + bias`."""
    y = x @ layer["kernel"]
    return y + layer["bias"] if "bias" in layer else y


def init_mlp(key: jax.Array, width: int = 256, n_in: int = 64, n_out: int = 10) -> dict:
    """Parameters of the digits MLP: `fc1`, `fc2` (hidden) and `head`."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {"fc1": dense(k1, n_in, width), "fc2": dense(k2, width, width),
            "head": dense(k3, width, n_out)}


def mlp(params: dict, x: jax.Array) -> jax.Array:
    """Logits of the digits MLP for a batch of flattened images."""
    h = jax.nn.relu(apply_dense(params["fc1"], x))
    return apply_dense(params["head"], jax.nn.relu(apply_dense(params["fc2"], h)))


def layer_norm(layer: dict, x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """LayerNorm over the last axis with `scale` and `bias`."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * layer["scale"] + layer["bias"]


def _norm(d: int) -> dict:
    return {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}


def init_char_gpt(key: jax.Array, vocab: int = 96, context: int = 64, d_model: int = 128,
                  n_layer: int = 2, n_head: int = 4) -> dict:
    """Parameters of the GPT-style character model (the twin of `torch_models.CharGPT`)."""
    if d_model % n_head:
        raise ValueError(f"d_model={d_model} is invalid: expected a multiple of {n_head=}")
    keys = iter(jax.random.split(key, 3 + 4 * n_layer))
    d = d_model
    params = {"wte": {"embedding": jax.random.normal(next(keys), (vocab, d))},
              "wpe": {"embedding": jax.random.normal(next(keys), (context, d))}, "h": {}}
    for i in range(n_layer):
        params["h"][str(i)] = {
            "ln_1": _norm(d), "ln_2": _norm(d),
            "attn": {"qkv": dense(next(keys), d, 3 * d), "proj": dense(next(keys), d, d)},
            "mlp": {"fc": dense(next(keys), d, 4 * d), "proj": dense(next(keys), 4 * d, d)}}
    params["ln_f"] = _norm(d)
    params["lm_head"] = dense(next(keys), d, vocab, bias=False)
    return params


def _attention(layer: dict, x: jax.Array, n_head: int) -> jax.Array:
    b, t, d = x.shape
    q, k, v = jnp.split(apply_dense(layer["qkv"], x), 3, axis=-1)
    q, k, v = (z.reshape(b, t, n_head, d // n_head) for z in (q, k, v))
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return apply_dense(layer["proj"], y.reshape(b, t, d))


def char_gpt(params: dict, idx: jax.Array, n_head: int = 4) -> jax.Array:
    """Next-character logits for a batch of index sequences (batch, time)."""
    x = params["wte"]["embedding"][idx] + params["wpe"]["embedding"][: idx.shape[1]]
    for i in range(len(params["h"])):
        block = params["h"][str(i)]
        x = x + _attention(block["attn"], layer_norm(block["ln_1"], x), n_head)
        h = jax.nn.gelu(apply_dense(block["mlp"]["fc"], layer_norm(block["ln_2"], x)))
        x = x + apply_dense(block["mlp"]["proj"], h)
    return apply_dense(params["lm_head"], layer_norm(params["ln_f"], x))
