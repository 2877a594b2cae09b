"""The torch model zoo: `Muon.for_model` on real architectures against reviewed routings.

Each model is built from a tiny transformers configuration (nothing is downloaded); its
expected routing is a file in tests/zoo/, reviewed by reading the architecture (see the
README there), not produced by the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import muon_core  # noqa: E402
from muon_core import MuonConfig  # noqa: E402
from muon_torch import Muon  # noqa: E402
from zoo_models import describe, expected, torch_zoo  # noqa: E402

ZOO = torch_zoo()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {}


def _model(models: dict, name: str):
    if name not in models:
        models[name] = ZOO[name]()
    return models[name]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_for_model_matches_the_reviewed_routing(models, name):
    plan = Muon.for_model(_model(models, name)).plan
    want = expected(name)["tensors"]
    got = {e.name: describe(e) for e in plan}
    assert list(got) == list(want)
    for tensor, entry in want.items():
        assert got[tensor] == entry, tensor


@pytest.mark.parametrize("name", sorted(ZOO))
def test_names_and_shapes_alone_give_the_same_routing(models, name):
    """`muon plan` on `named_parameters()` shapes agrees with the module types, except that a
    grouped fused Q/K/V needs the head count: it stays whole and the table says so."""
    model = _model(models, name)
    by_module = Muon.for_model(model).plan
    by_name = muon_core.plan({n: tuple(p.shape) for n, p in model.named_parameters()})
    for m, s in zip(by_module, by_name):
        if m.groups > 1:
            assert s.blocks == (s.matrix_shape[1],) and "groups" in s.flags[0], m.name
            continue
        assert {**describe(m), "decided_by": ""} == {**describe(s), "decided_by": ""}, m.name


def test_interleaved_qkv_update_orthogonalizes_q_k_v_rows_apart(models):
    # GPT-NeoX: rows of query_key_value are [q_h, k_h, v_h] per head (4 heads of 16). Q's rows
    # are picked here by that index arithmetic, independently of the plan's view.
    model = _model(models, "gpt_neox")
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    param = dict(model.named_parameters())[name]
    cfg = MuonConfig(lr=1.0, weight_decay=0.0, momentum=0.0, ns_dtype="float32")
    opt = Muon.for_model(model, cfg)
    grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(1))
    before = param.detach().clone()
    for p in model.parameters():
        p.grad = None
    param.grad = grad.clone()
    opt.step()
    update = (before - param.detach()).numpy()
    heads, head_dim = 4, 16
    for slot in range(3):  # q, k, v
        rows = np.concatenate([np.arange(h * 3 * head_dim + slot * head_dim,
                                         h * 3 * head_dim + (slot + 1) * head_dim)
                               for h in range(heads)])
        want = muon_core.orthogonalize(grad.numpy()[rows].astype(np.float64), dtype="float64")
        np.testing.assert_allclose(update[rows], want, atol=2e-4)
