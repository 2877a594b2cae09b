"""muon_torch.bench on a tiny parameter set: the rows `muon bench` prints (no timing asserted)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import muon_core  # noqa: E402
import torch.optim._muon as torch_muon  # noqa: E402
from muon_cli.benchtools import gpt2_shapes  # noqa: E402
from muon_torch import bench  # noqa: E402
from torch_helpers import one_thread  # noqa: E402, F401

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_thread")]


def test_compare_on_tiny_gpt2_returns_one_row_per_measurement():
    shapes = gpt2_shapes(n_layer=1, d_model=16, vocab=40, context=8)
    threads = torch.get_num_threads()
    rows = bench.compare_on(shapes, rounds=1, threads=1, ns_shapes=((8, 24),), with_peer=True)
    assert torch.get_num_threads() == threads
    assert [row["peer"] for row in rows] == [bench.PLAIN_NS] * 2 + [bench.PEER] * 2 + \
        [bench.PEER_NS] * 2
    assert [row["peer"] for row in bench.compare_on(shapes, rounds=1, ns_shapes=((8, 24),),
                                                    with_peer=False)] == \
        [bench.PLAIN_NS] * 2 + [bench.PEER_FLOAT32] * len(bench.FLOAT32_ROWS)
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


@pytest.mark.parametrize("change", [{"momentum_kind": "sum"}, {"ns_dtype": "auto"},
                                    {"lr_scaling": "spectral"}])
def test_peer_pair_refuses_settings_torch_muon_would_ignore(change):
    params = {"w": torch.nn.Parameter(torch.zeros(4, 4))}
    (key, value), = change.items()
    with pytest.raises(ValueError, match=rf"{key}='{value}': torch.optim.Muon only has"):
        bench.peer_optimizers(params, bench.SETTINGS.replace(**change))


def test_keller_flops_is_the_standard_count():
    # 5 * (4 m^2 n + 2 m^3) with m = 768, n = 3072: 5 * (4 * 589824 * 3072 + 2 * 452984832)
    assert bench.keller_flops(768, 3072) == bench.keller_flops(3072, 768) == 40768634880


# Muon matrices (wide, tall, square) and AdamW tensors, named as the plan routes them.
SMALL_MODEL = {"h.0.mlp.proj.weight": (32, 96), "h.0.mlp.fc.weight": (128, 48),
               "h.0.attn.proj.weight": (64, 64), "h.0.mlp.fc.bias": (128,),
               "wte.weight": (40, 32)}


def _peer_run(config, steps=4):
    """The peer pair at `config` on SMALL_MODEL for `steps` seeded steps; float64 results."""
    rng = np.random.default_rng(0)
    init = {n: rng.normal(size=s) for n, s in SMALL_MODEL.items()}
    grads = [{n: rng.normal(size=s) for n, s in SMALL_MODEL.items()} for _ in range(steps)]
    params = {n: torch.nn.Parameter(torch.tensor(v, dtype=torch.float32)) for n, v in init.items()}
    peers = bench.peer_optimizers(params, config)
    for step_grads in grads:
        for name, p in params.items():
            p.grad = torch.tensor(step_grads[name], dtype=torch.float32)
        for opt in peers.values():
            opt.step()
    reference, state = init, None
    for step_grads in grads:
        reference, state = muon_core.reference_step(reference, step_grads, state,
                                                    config.replace(ns_dtype="float64"))
    return {n: p.detach().double().numpy() for n, p in params.items()}, reference


def test_float32_peer_is_torch_muon_with_float32_newton_schulz():
    original = torch_muon._zeropower_via_newtonschulz
    peer, reference = _peer_run(bench.FLOAT32_SETTINGS)
    assert torch_muon._zeropower_via_newtonschulz is original
    for name in SMALL_MODEL:
        # float32 tolerance: four steps of float32 arithmetic against the float64 reference step
        # (keller-5 Muon + torch's AdamW), values of order 1
        np.testing.assert_allclose(peer[name], reference[name], atol=2e-5, rtol=1e-5,
                                   err_msg=name)
    # torch.optim.Muon as shipped (bf16 Newton-Schulz) is outside that tolerance (its largest
    # error here is 2.7e-4: bf16 round-off of ~1e-2 on updates times lr 0.02): the float32 peer's
    # agreement comes from its dtype, its only change
    bf16, _ = _peer_run(bench.SETTINGS)
    assert np.abs(bf16["h.0.mlp.proj.weight"] - reference["h.0.mlp.proj.weight"]).max() > 1e-4


def test_float32_peer_restores_torch_newton_schulz_after_a_failed_step():
    original = torch_muon._zeropower_via_newtonschulz
    opt = bench.Float32NSMuon([torch.nn.Parameter(torch.zeros(4, 4))])

    def closure():
        assert torch_muon._zeropower_via_newtonschulz is bench._float32_keller
        raise RuntimeError("closure failed")

    with pytest.raises(RuntimeError, match="closure failed"):
        opt.step(closure)
    assert torch_muon._zeropower_via_newtonschulz is original


def test_float32_accuracy_rows_cover_each_contenders_blocks():
    rows = bench.accuracy_on(gpt2_shapes(n_layer=1, d_model=16, vocab=40, context=8))
    blocks = {what: {r["shape"] for r in rows if r["what"] == what} for what in
              (bench.PEER_FLOAT32, *bench.FLOAT32_ROWS)}
    # torch layout: qkv 48x16 (three 16x16 blocks when split), proj 16x16, fc 64x16, 16x64
    fused = {(48, 16), (16, 16), (64, 16), (16, 64)}
    assert blocks == {bench.PEER_FLOAT32: fused, "full step, fp32 NS, same settings": fused,
                      "full step, fp32 NS, gram": fused,
                      "full step, fp32 NS, our defaults (QKV split, gram)": fused - {(48, 16)},
                      "full step, fp32 NS, our defaults, quintic x4": fused - {(48, 16)}}
    for row in rows:
        # keller-5 and quintic-4 keep the kept directions' gains within (0, 2), away from the
        # polar factor
        assert 0.0 < row["min_sigma"] <= row["max_sigma"] < 2.0
        assert row["distance"] < 1.0
