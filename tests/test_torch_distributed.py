"""muon_torch.Muon(process_group=...): gloo processes on 127.0.0.1 end where one process does."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import muon_core  # noqa: E402
from muon_conformance.adapters import TorchAdapter, run_torch_workers  # noqa: E402
from muon_core import MuonConfig, Rule  # noqa: E402
from muon_torch import Muon  # noqa: E402
from muon_torch._distributed import TrafficCounter, make_buckets, slice_bounds  # noqa: E402

pytestmark = [pytest.mark.torch]

# Mixed shapes: same-shape groups, fused QKV, a GQA split by rule, a conv, an embedding,
# norms, and a 1-row matrix (fewer rows than the world size).
SHAPES = {"wte.weight": (40, 16), "h.0.attn.qkv.weight": (48, 16), "h.1.attn.qkv.weight": (48, 16),
          "h.0.attn.proj.weight": (16, 16), "h.1.attn.proj.weight": (16, 16),
          "h.0.mlp.fc.weight": (64, 16), "h.1.mlp.fc.weight": (64, 16),
          "h.0.mlp.out.weight": (16, 64), "h.0.gqa.weight": (32, 16), "conv.weight": (8, 3, 3, 3),
          "tiny.weight": (1, 16), "ln.weight": (16,), "ln.bias": (16,)}
GQA = Rule(match="*gqa*", split=(16, 8, 8))


def _inputs(world_size, steps, nan_at=None, seed=0):
    """Parameters and per-rank gradients (a NaN in rank 1's gradient at step `nan_at`)."""
    rng = np.random.default_rng(seed)
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    grads = [[{n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
              for _ in range(world_size)] for _ in range(steps)]
    if nan_at is not None:
        grads[nan_at][min(1, world_size - 1)]["h.0.mlp.fc.weight"][3, 5] = np.nan
    return params, grads


def _single_process(params, grads, config):
    """One process stepping on the mean gradient (float64 mean, rounded once)."""
    adapter = TorchAdapter()
    handle = adapter.make(params, config)
    for per_rank in grads:
        mean = {n: np.mean([g[n].astype(np.float64) for g in per_rank], axis=0).astype(np.float32)
                for n in SHAPES}
        handle = adapter.step(handle, mean)
    return adapter.params(handle)


def _state_size(entry, method, world_size, shard):
    """Values of an entry's state summed over ranks: momentum, plus the second moment (whole
    on every rank for NorMuon under ZeRO-1, sliced for AdaMuon)."""
    numel = int(np.prod(entry.shape))
    moment = {"none": 0, "adamuon": numel,
              "normuon": int(np.prod(muon_core.second_moment_shape(entry, "normuon")))}[method]
    copies = world_size if shard == "zero1" and method == "normuon" else 1
    return numel + copies * moment


def _check_equivalence(world_size, steps, shard, tolerance=1e-6, **options):
    config = MuonConfig(ns_dtype="float32", nonfinite="skip", rules=(GQA,), **options)
    params, grads = _inputs(world_size, steps, nan_at=1)
    outputs = run_torch_workers({"params": params, "grads": grads, "config": config.to_dict(),
                                 "shard": shard}, world_size)
    expected = _single_process(params, grads, config)
    for rank, out in enumerate(outputs):
        assert "error" not in out, out
        for name in SHAPES:
            scale = np.max(np.abs(expected[name]))
            error = np.max(np.abs(out["params"][name] - expected[name])) / scale
            assert error <= tolerance, f"rank {rank} {name}: relative error {error:.2e}"
    plan = muon_core.plan(SHAPES, config)
    for entry in plan.muon:
        holders = [out["state_sizes"].get(entry.name, 0) for out in outputs]
        total = _state_size(entry, config.second_moment, world_size, shard)
        if shard == "layerwise":  # one rank keeps the whole state
            assert sorted(holders) == [0] * (world_size - 1) + [total], entry.name
        else:  # every rank keeps its slices
            assert sum(holders) == total, entry.name
    return expected


@pytest.mark.parametrize("shard", ["layerwise", "zero1"])
def test_two_ranks_equal_one_process(shard):
    _check_equivalence(2, 3, shard)


@pytest.mark.slow
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shard", ["layerwise", "zero1"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_many_ranks_twenty_steps_equal_one_process(world_size, shard, nesterov):
    _check_equivalence(world_size, 20, shard, nesterov=nesterov,
                       momentum_kind="ema" if nesterov else "sum")


ADAPTIVE = {"normuon": {"second_moment": "normuon"}, "adamuon": {"second_moment": "adamuon"},
            "cautious": {"cautious_weight_decay": True, "lr": 0.05, "weight_decay": 0.5}}


@pytest.mark.parametrize("variant", sorted(ADAPTIVE))
@pytest.mark.parametrize("shard", ["layerwise", "zero1"])
def test_adaptive_variants_on_two_ranks_equal_one_process(shard, variant):
    expected = _check_equivalence(2, 3, shard, **ADAPTIVE[variant])
    # the variant changes the trajectory, so the comparison above is not the plain one's
    plain = {k: v for k, v in ADAPTIVE[variant].items() if k in ("lr", "weight_decay")}
    config = MuonConfig(ns_dtype="float32", nonfinite="skip", rules=(GQA,), **plain)
    baseline = _single_process(*_inputs(2, 3, nan_at=1), config)
    assert not np.allclose(expected["h.0.mlp.fc.weight"], baseline["h.0.mlp.fc.weight"])


@pytest.mark.parametrize("shard", ["layerwise", "zero1"])
def test_bfloat16_newton_schulz_is_bit_identical_on_two_ranks(shard):
    # Two ranks: the gloo sum of two float32 gradients, halved, is the float64 mean rounded
    # once, so each parameter's owner (layer-wise) or every rank (ZeRO-1) runs the very
    # arithmetic of one process, bfloat16 Newton-Schulz included.
    config = MuonConfig(ns_dtype="bfloat16", rules=(GQA,))
    params, grads = _inputs(2, 2)
    outputs = run_torch_workers({"params": params, "grads": grads, "config": config.to_dict(),
                                 "shard": shard}, 2)
    expected = _single_process(params, grads, config)
    for out in outputs:
        for name in SHAPES:
            np.testing.assert_array_equal(out["params"][name], expected[name], err_msg=name)


def test_differing_configs_raise_on_every_rank():
    params, grads = _inputs(2, 1)
    configs = [MuonConfig(ns_dtype="float32").to_dict(),
               MuonConfig(ns_dtype="float32", lr=0.5).to_dict()]
    outputs = run_torch_workers({"params": params, "grads": grads, "configs": configs}, 2)
    for out in outputs:
        assert "config differ between group rank 0 and group ranks [1]" in out["error"]


@pytest.mark.slow
def test_differing_parameter_shapes_raise_on_every_rank():
    params, grads = _inputs(2, 1)
    other = {**params, "tiny.weight": np.zeros((2, 16), np.float32)}
    outputs = run_torch_workers({"params": [params, other], "grads": grads,
                                 "config": MuonConfig().to_dict()}, 2)
    for out in outputs:
        assert "parameter names, shapes, dtypes or order differ" in out["error"]


@pytest.mark.slow
def test_a_group_without_this_rank_is_refused():
    params, grads = _inputs(2, 1)
    config = MuonConfig(ns_dtype="float32", rules=(GQA,))
    outputs = run_torch_workers({"params": params, "grads": grads, "config": config.to_dict(),
                                 "group_ranks": [0]}, 2)
    assert "error" not in outputs[0]  # rank 0 forms the group alone and steps
    assert "process_group does not contain this process (global rank 1)" in outputs[1]["error"]


def test_shard_without_group_is_refused():
    with pytest.raises(ValueError, match="shard='zero1' needs a process_group"):
        Muon([torch.nn.Parameter(torch.ones(4, 4))], shard="zero1")


def test_group_without_distributed_is_refused():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        Muon([torch.nn.Parameter(torch.ones(4, 4))], process_group=object())


def test_reduce_gradients_needs_a_group():
    with pytest.raises(RuntimeError, match="process_group"):
        Muon([torch.nn.Parameter(torch.ones(4, 4))]).reduce_gradients()


@pytest.mark.parametrize("numel", [0, 1, 5, 8, 13])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_slices_cover_the_tensor_once(numel, world_size):
    covered = [i for r in range(world_size) for i in range(*slice_bounds(numel, world_size, r))]
    assert covered == list(range(numel))


def test_buckets_respect_the_limit_and_keep_order():
    params = [torch.zeros(n) for n in (10, 10, 30, 5, 5)]
    owners = {id(p): i % 2 for i, p in enumerate(params)}
    buckets = make_buckets(params, lambda p: (owners[id(p)], False), limit=80)
    # float32: 40, 40, 120, 20, 20 bytes; a bucket closes when the next one would pass 80
    assert [[p.numel() for p in b.params] for b in buckets] == [[10], [10, 5], [30], [5]]
    assert [b.owner for b in buckets] == [0, 1, 0, 0]


def test_traffic_counter_uses_the_ring_model():
    counter = TrafficCounter(world_size=4)
    counter.add("all_reduce", 1000)
    counter.add("broadcast", 1000)
    # ring all-reduce: 2 (N-1)/N of the tensor per rank; broadcast/reduce: (N-1)/N
    assert counter.total == 1500 + 750


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["layerwise", "zero1"])
def test_checkpoint_from_four_ranks_resumes_on_two_and_one(tmp_path, shard):
    config = MuonConfig(ns_dtype="float32", rules=(GQA,))
    params, grads = _inputs(4, 6)
    expected = _single_process(params, grads, config)
    folder = str(tmp_path / "checkpoint")
    first = run_torch_workers({"params": params, "grads": grads[:3], "config": config.to_dict(),
                               "shard": shard, "checkpoint": folder}, 4)
    # The resumed runs see, on every rank, the mean of the four ranks' gradients.
    _assert_resumes_match(first[0]["params"], grads[3:], config, folder,
                          ((2, shard), (1, "layerwise"), (2, "zero1")), expected)


def _assert_resumes_match(params, per_rank_grads, config, folder, runs, expected):
    """Resume from the DCP checkpoint in `folder` for each `(world_size, shard)` of `runs`,
    every rank taking the mean of the per-rank gradients, and compare with `expected`."""
    means = [{n: np.mean([g[n].astype(np.float64) for g in per_rank], axis=0).astype(np.float32)
              for n in SHAPES} for per_rank in per_rank_grads]
    for world_size, shard in runs:
        resumed = run_torch_workers({"params": params, "grads": means, "config": config.to_dict(),
                                     "shard": shard, "resume": folder}, world_size)
        for name in SHAPES:
            error = np.max(np.abs(resumed[0]["params"][name] - expected[name]))
            assert error <= 1e-6 * np.max(np.abs(expected[name])), (world_size, name, error)


def _one_rank_group_step(overlap, timeline):
    """A 1-process gloo group: the layer-wise step with small buckets, recorded or not."""
    import torch.distributed as dist

    from muon_torch._distributed import make_buckets, record_timeline

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        params, grads = _inputs(1, 1)
        named = [(n, torch.nn.Parameter(torch.tensor(p))) for n, p in params.items()]
        opt = Muon(named, MuonConfig(ns_dtype="float32", rules=(GQA,)),
                   process_group=dist.group.WORLD)
        sharding = opt._sharding
        sharding.overlap = overlap
        sharding.buckets = make_buckets(list(opt._entries), lambda p: (0, False), limit=4096)
        for (name, p) in named:
            p.grad = torch.tensor(grads[0][0][name])
        if timeline:
            with record_timeline(opt) as events:
                opt.reduce_gradients()
                opt.step()
        else:
            opt.reduce_gradients()
            opt.step()
            events = None
        assert sharding.events is None  # recording is off outside the context
        return {n: p.detach().numpy().copy() for n, p in named}, events, len(sharding.buckets)
    finally:
        dist.destroy_process_group()


def test_overlapped_step_equals_serial_step_and_records_its_timeline():
    overlapped, events, buckets = _one_rank_group_step(overlap=True, timeline=True)
    serial, _, _ = _one_rank_group_step(overlap=False, timeline=False)
    for name in SHAPES:
        np.testing.assert_array_equal(overlapped[name], serial[name], err_msg=name)
    times = [t for t, *_ in events]
    assert times == sorted(times)
    order = [(kind, event, bucket) for _, kind, event, bucket in events]
    assert buckets > 2
    for bucket in range(buckets):
        issued = order.index(("broadcast", "issue", bucket))
        assert order.index(("broadcast", "wait", bucket)) > issued
        if ("ns", "end", bucket) in order:  # its Newton-Schulz ends before its broadcast
            assert order.index(("ns", "end", bucket)) < issued
    # the broadcasts are awaited after every Newton-Schulz: nothing blocks in between
    last_ns = max(i for i, (kind, *_) in enumerate(order) if kind == "ns")
    assert last_ns < min(i for i, (_, event, _) in enumerate(order) if event == "wait"
                         and order[i][0] == "broadcast")


def test_record_timeline_needs_a_group():
    from muon_torch._distributed import record_timeline

    with pytest.raises(ValueError, match="record_timeline needs a Muon built with"):
        record_timeline(Muon([torch.nn.Parameter(torch.ones(4, 4))]))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["normuon", "adamuon"])
def test_zero1_second_moment_checkpoint_resumes_on_one_and_two(tmp_path, method):
    config = MuonConfig(ns_dtype="float32", rules=(GQA,), second_moment=method)
    params, grads = _inputs(2, 4)
    expected = _single_process(params, grads, config)
    folder = str(tmp_path / "checkpoint")
    first = run_torch_workers({"params": params, "grads": grads[:2], "config": config.to_dict(),
                               "shard": "zero1", "checkpoint": folder}, 2)
    _assert_resumes_match(first[0]["params"], grads[2:], config, folder,
                          ((1, "layerwise"), (2, "zero1")), expected)
