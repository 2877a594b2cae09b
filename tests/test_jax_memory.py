"""XLA's scratch for a jitted muon_jax step stays near the largest stack of same-shape matrices."""

import jax
import jax.numpy as jnp
import optax
import pytest

import muon_jax
from muon_core import MuonConfig
from muon_jax._chunks import chunk_size


def _scratch(tx, params) -> int:
    abstract = {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in params.items()}
    state = jax.eval_shape(tx.init, abstract)

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(abstract, state, abstract).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_step_scratch_is_within_twice_the_largest_stack(nonfinite):
    # 16 MLP-like matrices of 128x512 (the 512x128 ones transposed): one stack of 16 x 128 x 512
    # floats; a large AdamW embedding whose moments a copying NaN/Inf gate would duplicate.
    shapes = {"wte": (4096, 128)}
    for i in range(8):
        shapes |= {f"h.{i}.mlp.fc.weight": (128, 512), f"h.{i}.mlp.proj.weight": (512, 128)}
    stack = 16 * 128 * 512 * 4
    tx = muon_jax.muon(MuonConfig(ns_dtype="float32", nonfinite=nonfinite), layout="in_out")
    assert _scratch(tx, shapes) <= 2 * stack


@pytest.mark.parametrize(("batch", "size"), [(24, 3), (48, 6), (13, 1), (4, 1), (1, 1), (64, 8)])
def test_chunk_size_cuts_a_stack_into_at_least_eight_equal_chunks(batch, size):
    assert chunk_size(batch) == size
    assert batch % size == 0 and (batch // size >= 8 or size == 1)
