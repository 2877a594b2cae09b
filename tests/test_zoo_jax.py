"""The JAX model zoo: `muon_jax.plan_for` on flax linen, flax nnx and equinox models against
reviewed routings (tests/zoo/, see the README there), and the same MLP in torch and flax."""

from __future__ import annotations

import optax
import pytest

pytest.importorskip("jax")

import muon_jax  # noqa: E402
from zoo_models import describe, expected, jax_zoo  # noqa: E402

ZOO = jax_zoo()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_plan_for_matches_the_reviewed_routing(name):
    pytest.importorskip("equinox" if name.startswith("equinox") else "flax")
    build, layout = ZOO[name]
    want = expected(name)
    assert want["layout"] == layout
    plan = muon_jax.plan_for(build(), layout=layout)
    got = {e.name: describe(e) for e in plan}
    assert list(got) == list(want["tensors"])
    for tensor, entry in want["tensors"].items():
        assert got[tensor] == entry, tensor


def test_the_same_mlp_routes_alike_in_torch_and_flax():
    pytest.importorskip("flax")
    torch = pytest.importorskip("torch")
    from muon_torch import Muon

    build, layout = ZOO["flax_linen_mlp"]
    flax_plan = muon_jax.plan_for(build(), layout=layout)
    torch_mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 1000))
    torch_plan = Muon.for_model(torch_mlp).plan
    for index, torch_index in enumerate((0, 2, 4, 6)):
        f = flax_plan[f"params.Dense_{index}.kernel"]
        t = torch_plan[f"{torch_index}.weight"]
        assert (f.algorithm, f.matrix_shape, f.lr_scales) == \
            (t.algorithm, t.matrix_shape, t.lr_scales), index
    assert not flax_plan["params.Dense_3.kernel"].is_muon


def test_muon_transform_routes_an_auto_named_head_to_adamw():
    pytest.importorskip("flax")
    build, _ = ZOO["flax_linen_mlp"]
    params = build()
    state = muon_jax.muon(weight_decay=0.0, adamw_weight_decay=0.0).init(params)
    # The state is shaped like the params: each half holds arrays at its own leaves only.
    dense = state.mu["params"]
    assert not isinstance(dense["Dense_3"]["kernel"], optax.MaskedNode)
    assert isinstance(dense["Dense_2"]["kernel"], optax.MaskedNode)
    assert not isinstance(state.momentum_buffer["params"]["Dense_2"]["kernel"], optax.MaskedNode)
