"""The same GPT-style character model in plain JAX, trained with muon_jax.

    python examples/char_gpt_jax.py --steps 300

Same config file, same parameter names and the same routing as char_gpt_torch.py; the
parameters are a dict pytree in flax's (in, out) layout (`muon_cli.jax_models`).
"""

from pathlib import Path

import jax
import numpy as np
import optax

import muon_jax
from muon_cli.data import (VOCAB, char_example_settings, char_windows, encode_chars,
                           python_source_text)
from muon_cli.jax_models import char_gpt, init_char_gpt

CONFIG = Path(__file__).with_name("muon.toml")


def loss_fn(params, x, y):
    """Mean next-character cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(char_gpt(params, x), y).mean()


def main() -> None:
    """Train and print the loss every 50 steps."""
    steps, cfg = char_example_settings(__doc__.splitlines()[0], str(CONFIG))
    params = init_char_gpt(jax.random.key(0), vocab=VOCAB, context=64)
    tx = muon_jax.muon(cfg)
    print(muon_jax.plan_for(params, cfg))
    state = tx.init(params)

    @jax.jit
    def train_step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    ids, rng = encode_chars(python_source_text()), np.random.default_rng(0)
    for step in range(1, steps + 1):
        params, state, loss = train_step(params, state, *char_windows(ids, 64, 32, rng))
        if step % 50 == 0 or step == 1:
            print(f"step {step:5d}  loss {float(loss):.3f}")


if __name__ == "__main__":
    main()
