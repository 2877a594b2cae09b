"""muon_torch.bench on a tiny parameter set: the rows `muon bench` prints (no timing asserted)."""

import pytest

torch = pytest.importorskip("torch")

import muon_core  # noqa: E402
from muon_cli.benchtools import gpt2_shapes  # noqa: E402
from muon_torch import bench  # noqa: E402

pytestmark = pytest.mark.torch


def test_compare_on_tiny_gpt2_returns_one_row_per_measurement():
    shapes = gpt2_shapes(n_layer=1, d_model=16, vocab=40, context=8)
    threads = torch.get_num_threads()
    rows = bench.compare_on(shapes, rounds=1, threads=1, ns_shapes=((8, 24),), with_peer=True)
    assert torch.get_num_threads() == threads
    assert [row["peer"] for row in rows] == [bench.PLAIN_NS] * 2 + [bench.PEER] * 2 + \
        [bench.PEER_NS] * 2
    assert [row["peer"] for row in bench.compare_on(shapes, rounds=1, ns_shapes=((8, 24),),
                                                    with_peer=False)] == [bench.PLAIN_NS] * 2
    for row in rows:
        assert set(row) == {"what", "ours_s", "peer_s", "ratio", "peer"}
        assert row["ours_s"] > 0 and row["peer_s"] > 0
        assert row["ratio"] == pytest.approx(row["ours_s"] / row["peer_s"])


def test_peer_pair_takes_our_routing():
    shapes = gpt2_shapes(n_layer=1, d_model=16, vocab=40, context=8)
    params = {n: torch.nn.Parameter(torch.zeros(s)) for n, s in shapes.items()}
    peers = bench.peer_optimizers(params, bench.SETTINGS)
    plan = muon_core.plan(shapes, bench.SETTINGS)
    assert peers["muon"].param_groups[0]["params"] == [params[e.name] for e in plan.muon]
    assert peers["adamw"].param_groups[0]["params"] == [params[e.name] for e in plan.adamw]
    assert peers["muon"].param_groups[0]["adjust_lr_fn"] == "original"


def test_peer_pair_refuses_a_per_iteration_schedule():
    params = {"w": torch.nn.Parameter(torch.zeros(4, 4))}
    with pytest.raises(ValueError, match="ns_coefficients='quintic'"):
        bench.peer_optimizers(params, bench.SETTINGS.replace(ns_coefficients="quintic"))


@pytest.mark.parametrize("change", [{"momentum_kind": "sum"}, {"ns_dtype": "float32"},
                                    {"lr_scaling": "spectral"}])
def test_peer_pair_refuses_settings_torch_muon_would_ignore(change):
    params = {"w": torch.nn.Parameter(torch.zeros(4, 4))}
    (key, value), = change.items()
    with pytest.raises(ValueError, match=rf"{key}='{value}': torch.optim.Muon only has"):
        bench.peer_optimizers(params, bench.SETTINGS.replace(**change))


def test_keller_flops_is_the_standard_count():
    # 5 * (4 m^2 n + 2 m^3) with m = 768, n = 3072: 5 * (4 * 589824 * 3072 + 2 * 452984832)
    assert bench.keller_flops(768, 3072) == bench.keller_flops(3072, 768) == 40768634880
