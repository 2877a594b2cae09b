"""muon_torch.Muon on DTensor parameters: FSDP2 (`fully_shard`), tensor parallelism
(`parallelize_module`) in each `tp_mode`, and both on a 2x2 mesh, on gloo processes on
127.0.0.1, against one unsharded process (and blockwise against its core definition)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import muon_core  # noqa: E402
from dtensor_workers import STEPS, TP_PLAN, relative_error, spawn  # noqa: E402
from muon_core import MuonConfig  # noqa: E402
from muon_torch import Muon  # noqa: E402

pytestmark = [pytest.mark.torch]

MODES = ("duplicated", "distributed", "blockwise")
TP_AXIS = {f"{name}.weight": 0 if style == "colwise" else 1 for name, style in TP_PLAN.items()}
FSDP = {"mesh": [2], "names": ["dp"], "config": {"nonfinite": "skip"}, "nan_at": 3}
REFUSALS = {"refusals": True}  # errors for layouts the step cannot route
# second moments and cautious decay, against one process with them and one without them;
# `zero` has a zero gradient at every step under NorMuon (no NaN may appear); `reload`:
# opt.load_state_dict(opt.state_dict()) halfway
OPTIONS = {"fsdp normuon": {"mesh": [2], "names": ["dp"], "baseline": True, "zero": "q.weight",
                            "reload": True,
                            "config": {"second_moment": "normuon"}},
           "fsdp adamuon": {"mesh": [2], "names": ["dp"], "baseline": True, "reload": True,
                            "config": {"second_moment": "adamuon"}},
           "fsdp cautious": {"mesh": [2], "names": ["dp"], "baseline": True,
                             "config": {"cautious_weight_decay": True}},
           "tp duplicated normuon": {"mesh": [2], "names": ["tp"], "baseline": True,
                                     "config": {"tp_mode": "duplicated",
                                                "second_moment": "normuon"}},
           "tp distributed normuon": {"mesh": [2], "names": ["tp"], "baseline": True,
                                      "reload": True, "zero": "proj.weight",
                                      "config": {"tp_mode": "distributed",
                                                 "second_moment": "normuon"}},
           "tp distributed adamuon cautious": {
               "mesh": [2], "names": ["tp"], "baseline": True,
               "config": {"tp_mode": "distributed", "second_moment": "adamuon",
                          "cautious_weight_decay": True}},
           # gradients of the Muon matrices around 1e20: their Gram products overflow float32
           # unless the pieces agree on the power-of-two pre-scale
           "tp distributed huge": {"mesh": [2], "names": ["tp"], "scale": 1e20,
                                   "config": {"tp_mode": "distributed"}}}
TWO_RANK_CASES = [FSDP] + [{"mesh": [2], "names": ["tp"], "config": {"tp_mode": m}}
                           for m in MODES] + list(OPTIONS.values()) + [REFUSALS]
FOUR_RANK_CASES = [{"mesh": [4], "names": ["dp"]}] + [
    {"mesh": [2, 2], "names": ["dp", "tp"], "config": {"tp_mode": m}} for m in MODES] + [
    {"mesh": [2, 2], "names": ["dp", "tp"], "reload": True,
     "config": {"tp_mode": "distributed", "second_moment": "adamuon",
                "cautious_weight_decay": True}}, REFUSALS]


def _blockwise_definition(out, tp):
    """`muon_core.blockwise_reference_step` in float64 from the same start and gradients."""
    config = MuonConfig(ns_dtype="float64", lr=0.05, tp_mode="blockwise")
    params = {n: p.astype(np.float64) for n, p in out["initial"].items()}
    cuts = {name: (axis, tp) for name, axis in TP_AXIS.items()}
    state = None
    for grads in out["grads"]:
        params, state = muon_core.blockwise_reference_step(
            params, {n: g.astype(np.float64) for n, g in grads.items()}, state, config, cuts)
    return params


def _check(outputs, cases, tp_size):
    for rank, per_case in enumerate(outputs):
        for case, out in zip(cases, per_case):
            if case is REFUSALS:
                continue
            assert "error" not in out, f"rank {rank} {case}: {out.get('error')}"
            blockwise = case.get("config", {}).get("tp_mode") == "blockwise"
            expected = _blockwise_definition(out, tp_size) if blockwise else out["plain"]
            # float32 against float64 over 10 steps for blockwise; float32 against float32 else
            tolerance = 1e-4 if blockwise else 1e-5
            for name, value in out["sharded"].items():
                error = relative_error(value, expected[name])
                assert error <= tolerance, f"rank {rank} {case} {name}: {error:.2e}"
            for name, shape in out["momentum"].items():  # momentum is a shard like its param
                assert shape == out["local"][name], (rank, case, name)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn(TWO_RANK_CASES, 2, str(tmp_path_factory.mktemp("dtensor2")))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return spawn(FOUR_RANK_CASES, 4, str(tmp_path_factory.mktemp("dtensor4")))


def test_fsdp2_two_ranks_equal_one_process(two_ranks):
    _check([per[:1] for per in two_ranks], TWO_RANK_CASES[:1], 1)
    local = two_ranks[1][0]["local"]
    assert local["odd.weight"] == (3, 12)  # 7 rows over 2 ranks: uneven shards (4, 3)


@pytest.mark.parametrize("mode", MODES)
def test_tensor_parallel_two_ranks(two_ranks, mode):
    index = 1 + MODES.index(mode)
    _check([[per[index]] for per in two_ranks], [TWO_RANK_CASES[index]], 2)


def _option_outputs(two_ranks, name):
    index = TWO_RANK_CASES.index(OPTIONS[name])
    return [per[index] for per in two_ranks]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_options_two_ranks_equal_one_process(two_ranks, name):
    outputs = _option_outputs(two_ranks, name)
    _check([[out] for out in outputs], [OPTIONS[name]], 2)
    for out in outputs:
        assert all(np.isfinite(v).all() for v in out["sharded"].values()), name
    if OPTIONS[name].get("baseline"):  # the option acts: plain Muon ends elsewhere
        assert max(relative_error(out["plain"][n], out["baseline"][n])
                   for n in TP_AXIS) > 1e-3, name


def _expected_moment(whole, matrix, case, rank):
    """This rank's part of one process's second moment: whole with the owner (FSDP) and under
    "duplicated"; under "distributed" (except `odd`, cut along its short axis: "duplicated")
    AdaMuon's piece of the matrix, NorMuon's own rows when the rows are cut."""
    config = case["config"]
    if config.get("tp_mode") != "distributed" or matrix == "odd.weight":
        return whole
    if config["second_moment"] == "adamuon":
        return np.array_split(whole, 2, axis=TP_AXIS[matrix])[rank]
    return np.array_split(whole, 2, axis=1)[rank] if TP_AXIS[matrix] == 0 else whole


@pytest.mark.parametrize("name", [n for n in OPTIONS if "second_moment" in OPTIONS[n]["config"]])
def test_second_moment_lives_with_the_owner_and_is_saved(two_ranks, name):
    case, outputs = OPTIONS[name], _option_outputs(two_ranks, name)
    for matrix in TP_AXIS:
        holders = [rank for rank, out in enumerate(outputs) if matrix in out["moments"]]
        # FSDP: the one owner rank; tensor parallel: every TP rank
        assert len(holders) == (1 if case["names"] == ["dp"] else 2), (name, matrix, holders)
        for rank in holders:
            moment = outputs[rank]["moments"][matrix]
            expected = _expected_moment(outputs[0]["plain moments"][matrix], matrix, case, rank)
            assert moment.shape == expected.shape, (name, matrix, rank)
            assert relative_error(moment, expected) <= 1e-5, (name, matrix, rank)


def test_blockwise_is_a_different_algorithm(two_ranks):
    blockwise = two_ranks[0][1 + MODES.index("blockwise")]
    assert relative_error(blockwise["sharded"]["fc.weight"], blockwise["plain"]["fc.weight"]) > 1e-2


@pytest.mark.slow
def test_four_ranks_fsdp2_and_2x2_mesh_every_mode(four_ranks):
    _check(four_ranks, FOUR_RANK_CASES, 2)
    assert four_ranks[3][0]["local"]["odd.weight"] == (1, 12)  # 7 rows over 4: (2, 2, 2, 1)


def test_chunk_sizes_follow_torch_chunk():
    for length in range(1, 13):
        for parts in range(1, 6):
            pieces = [len(c) for c in torch.arange(length).chunk(parts)]
            sizes = muon_core.chunk_sizes(length, parts)
            assert tuple(pieces) == tuple(s for s in sizes if s), (length, parts)
            assert len(sizes) == parts and sum(sizes) == length


# -- errors, on a one-process gloo group ---------------------------------------------------

@pytest.fixture(scope="module")
def one_process_group():
    import os
    from datetime import timedelta

    import torch.distributed as dist
    from dtensor_workers import free_port

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=60))
    yield
    dist.destroy_process_group()


def _dtensor(shape, mesh, placements):
    from torch.distributed.tensor import DTensor

    local = torch.randn(shape)
    return torch.nn.Parameter(DTensor.from_local(local, mesh, placements, run_check=False))


def test_unsupported_layouts_are_named(two_ranks):
    refusals = two_ranks[0][-1]["refusals"]
    assert "parameter 'w'" in refusals["partial"] and "Partial" in refusals["partial"]
    assert "expected Shard or Replicate" in refusals["partial"]
    assert "parameter 'conv'" in refusals["blockwise conv"]
    assert "cannot be cut into blockwise pieces" in refusals["blockwise conv"]
    for option in ("normuon", "cautious"):
        message = refusals[f"blockwise {option}"]
        assert "parameter 'w'" in message and "tp_mode='blockwise'" in message, message
        assert "not defined for blockwise Muon" in message, message


@pytest.mark.slow
def test_unsupported_2d_layouts_are_named(four_ranks):
    refusals = four_ranks[0][-1]["refusals"]
    assert "more than one data-parallel mesh dimension" in refusals["two data-parallel"]
    assert "placements (Shard(dim=0), Shard(dim=0))" in refusals["interleaved"]
    assert "does not cut the tensor-parallel piece into contiguous shards" in \
        refusals["interleaved"]


def test_partial_placement_is_named_on_one_process(one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial

    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    with pytest.raises(ValueError, match=r"parameter 'w'.*Partial.*expected Shard or Replicate"):
        Muon([("w", _dtensor((4, 6), mesh, [Partial()]))])
    with pytest.raises(TypeError, match="tp_dim must be a mesh dimension name"):
        Muon([("w", _dtensor((4, 6), mesh, [Partial()]))], tp_dim=0)


def test_dtensors_with_a_process_group_are_refused(one_process_group):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    with pytest.raises(ValueError, match=r"parameter 'w' is a DTensor"):
        Muon([("w", _dtensor((4, 6), mesh, [Shard(0)]))], process_group=dist.group.WORLD)


def test_portable_checkpoints_refuse_dtensor_state(one_process_group, tmp_path):
    import muon_torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    opt = Muon([("w", _dtensor((4, 6), mesh, [Shard(0)]))], second_moment="normuon")
    for call in (muon_torch.save, muon_torch.load):
        with pytest.raises(TypeError, match="DTensor parameters .* portable checkpoints do not"):
            call(tmp_path / "state.ckpt", opt)
    assert not (tmp_path / "state.ckpt").exists()


# -- the example script, under torchrun ----------------------------------------------------

def _torchrun(ranks, *args):
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "fsdp_tp_torch.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={ranks}", str(script), "--check", *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    found = re.search(r"largest relative difference from one process: (\S+)", done.stdout)
    assert found, done.stdout
    return float(found.group(1))


def test_fsdp2_example_matches_one_process():
    # float64 end to end: what remains is rounding of the sharded forward pass
    assert _torchrun(2, "--layout", "fsdp", "--steps", "10") < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("ranks, layout", [(2, "tp"), (4, "2d")])
def test_tensor_parallel_example_matches_one_process(ranks, layout):
    assert _torchrun(ranks, "--layout", layout, "--tp-mode", "distributed", "--steps", "10") \
        < 1e-10
