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


def _mlp_and_attention(layers: int = 8, width: int = 128) -> dict[str, tuple[int, int]]:
    """Per layer an MLP pair (width x 4 width, 4 width x width) and four width x width
    attention matrices, plus a large AdamW embedding whose moments a copying NaN/Inf gate
    would duplicate."""
    shapes = {"wte": (4096, width)}
    for i in range(layers):
        shapes |= {f"h.{i}.mlp.fc.weight": (width, 4 * width),
                   f"h.{i}.mlp.proj.weight": (4 * width, width)}
        shapes |= {f"h.{i}.attn.{k}.weight": (width, width) for k in "qkvo"}
    return shapes


@pytest.mark.parametrize("algorithm", ["standard", "gram"])
@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_step_scratch_is_the_largest_stack_and_a_few_chunks(nonfinite, algorithm):
    # Two stacks: 16 MLP matrices of 128x512 (the 512x128 ones transposed, 4 MiB of floats)
    # and 32 attention matrices of 128x128 (2 MiB). The second stack is built only after the
    # first one's result is used, so the step needs the largest stack plus one chunk's scratch
    # (a chunk: 2 matrices, 16 cut in eight; its scratch: a few chunk-sized copies).
    stack = 16 * 128 * 512 * 4
    chunk = chunk_size(16) * 128 * 512 * 4
    tx = muon_jax.muon(MuonConfig(ns_dtype="float32", nonfinite=nonfinite,
                                  ns_algorithm=algorithm), layout="in_out")
    assert _scratch(tx, _mlp_and_attention()) <= stack + 4 * chunk


@pytest.mark.parametrize(("batch", "size"), [(24, 3), (48, 6), (13, 1), (4, 1), (1, 1), (64, 8)])
def test_chunk_size_cuts_a_stack_into_at_least_eight_equal_chunks(batch, size):
    assert chunk_size(batch) == size
    assert batch % size == 0 and (batch // size >= 8 or size == 1)
