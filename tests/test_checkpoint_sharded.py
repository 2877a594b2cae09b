"""Portable checkpoints of sharded optimizers: torch `Muon(process_group=...)` on 2 gloo
processes gathers to a whole file and loads one; JAX states sharded over a forced 2-device
mesh save and load whole, and so do JAX states spanning 2 processes (`jax.distributed`).

The torch runs pass single process -> 2 ranks -> single process through portable files and
must end where one process ends without interruption; every rank gets the same gradient, so
the group's average is that gradient exactly.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from muon_conformance.adapters import free_port, run_torch_workers  # noqa: E402
from muon_core import MuonConfig, read_checkpoint  # noqa: E402
from muon_torch import Muon, load, save  # noqa: E402
from test_torch_distributed import GQA, SHAPES  # noqa: E402

STEPS = 15  # 5 in one process, 5 on two ranks, 5 in one process again


def _inputs():
    rng = np.random.default_rng(3)
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    grads = [{n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
             for _ in range(STEPS)]
    return params, grads


def _single_process(params, grads, config, resume=None, saves=None):
    """`Muon` in this process: load `resume`, step, saving after step i to `saves[i]`."""
    named = {n: torch.nn.Parameter(torch.tensor(p)) for n, p in params.items()}
    opt = Muon(list(named.items()), config)
    if resume is not None:
        load(resume, opt)
    for i, step_grads in enumerate(grads, start=1):
        for name, param in named.items():
            param.grad = torch.tensor(step_grads[name])
        opt.step()
        if saves and i in saves:
            save(saves[i], opt)
    return {n: p.detach().numpy().copy() for n, p in named.items()}


def _assert_close(got, expected, what):
    for name in expected:
        error = np.max(np.abs(got[name] - expected[name])) / np.max(np.abs(expected[name]))
        assert error <= 1e-6, f"{what} {name}: relative error {error:.2e}"


def _assert_same_content(path, reference, moment_tolerance=1e-6):
    """Same metadata, tensor names, dtypes and shapes; values to float32 rounding: 1e-6
    relative (and of the largest value), `moment_tolerance` for the second moments."""
    ours, theirs = read_checkpoint(path), read_checkpoint(reference)
    assert (ours.config, ours.plan, ours.steps, ours.layout) == (
        theirs.config, theirs.plan, theirs.steps, theirs.layout)
    assert list(ours.tensors) == list(theirs.tensors)
    for name, tensor in ours.tensors.items():
        other = theirs.tensors[name]
        assert (tensor.dtype, tensor.shape) == (other.dtype, other.shape), name
        a, b = (np.frombuffer(t.data, np.float32) for t in (tensor, other))
        tolerance = moment_tolerance if name.endswith("/second_moment") else 1e-6
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max(),
                                   err_msg=name)


@pytest.mark.torch
@pytest.mark.parametrize("shard, second_moment", [("layerwise", "normuon"), ("zero1", "none")])
def test_sharded_torch_saves_and_loads_whole_files(tmp_path, shard, second_moment):
    config = MuonConfig(ns_dtype="float32", rules=(GQA,), second_moment=second_moment)
    params, grads = _inputs()
    files = {i: str(tmp_path / f"{name}.safetensors") for i, name in
             ((5, "single5"), (10, "single10"))}
    uninterrupted = _single_process(params, grads, config, saves=files)
    after5 = _single_process(params, grads[:5], config)
    sharded = str(tmp_path / "sharded10.safetensors")
    outputs = run_torch_workers({"params": after5, "grads": grads[5:10],
                                 "config": config.to_dict(), "shard": shard,
                                 "portable_resume": files[5], "portable_checkpoint": sharded}, 2)
    assert all("error" not in out for out in outputs), outputs
    _assert_same_content(sharded, files[10])
    resumed = _single_process(outputs[0]["params"], grads[10:], config, resume=sharded)
    _assert_close(resumed, uninterrupted, f"{shard}: 1 -> 2 ranks -> 1")


@pytest.mark.torch
def test_sharded_load_refusal_raises_on_every_rank(tmp_path):
    config = MuonConfig(ns_dtype="float32", rules=(GQA,))
    params, grads = _inputs()
    path = str(tmp_path / "a.safetensors")
    _single_process(params, grads[:1], config.replace(second_moment="normuon"), saves={1: path})
    outputs = run_torch_workers({"params": params, "grads": grads[:1], "config": config.to_dict(),
                                 "shard": "layerwise", "portable_resume": path}, 2)
    for out in outputs:
        assert "second_moment is normuon in the checkpoint, none here" in out["error"]


JAX_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import muon_jax
    from muon_core import MuonConfig

    mesh = jax.make_mesh((2,), ("data",))
    rng = np.random.default_rng(0)
    shapes = {"a": (8, 6), "b": (6, 4), "bias": (4,)}
    place = {n: NamedSharding(mesh, P() if n == "bias" else P("data")) for n in shapes}
    report = {"devices": jax.device_count()}
    for mode, second_moment in (("owner", "none"), ("replicated", "normuon"),
                                ("blockwise", "adamuon")):
        config = MuonConfig(ns_dtype="float32", second_moment=second_moment)
        params = {n: jax.device_put(jnp.asarray(rng.standard_normal(s), jnp.float32), place[n])
                  for n, s in shapes.items()}
        tx = muon_jax.muon(config, mesh=mesh, sharded_ns=mode)
        state = tx.init(params)
        grads = {n: jax.device_put(jnp.asarray(rng.standard_normal(s), jnp.float32), place[n])
                 for n, s in shapes.items()}
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
        path = f"{sys.argv[1]}-{mode}.safetensors"
        muon_jax.save(path, state, params, config)
        template = tx.init(params)
        loaded = muon_jax.load(path, template, params, config)
        equal = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                             loaded.inner_state,
                             state.inner_state)
        placed = jax.tree.map(lambda a, b: a.sharding == b.sharding, loaded.inner_state,
                              template.inner_state)
        stepped = [jax.jit(tx.update)(grads, s, params)[0] for s in (loaded, state)]
        report[mode] = {"equal": all(jax.tree.leaves(equal)),
                        "placed": all(jax.tree.leaves(placed)),
                        "steps": all(jax.tree.leaves(jax.tree.map(np.array_equal, *stepped))),
                        "sharded": template.momentum_buffer["a"].sharding.spec[0] == "data"}
    print(json.dumps(report))
""")


@pytest.mark.jax
def test_jax_state_sharded_over_two_devices_saves_whole_and_loads_sharded(tmp_path):
    pytest.importorskip("jax")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", JAX_SCRIPT, str(tmp_path / "jax")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    sharded = {"equal": True, "placed": True, "steps": True, "sharded": True}
    assert report == {"devices": 2, "owner": sharded, "replicated": sharded,
                      "blockwise": sharded}, report
    # Whole tensors, in the canonical (out, in) layout; NorMuon keeps one value per row of
    # each matrix, AdaMuon one per entry.
    for mode, moment_shape in (("owner", None), ("replicated", (1, 6)), ("blockwise", (6, 8))):
        stored = read_checkpoint(tmp_path / f"jax-{mode}.safetensors").tensors
        assert stored["a/momentum_buffer"].shape == (6, 8)
        assert getattr(stored.get("a/second_moment"), "shape", None) == moment_shape, mode


# The multi-process JAX run: 2 processes with 2 CPU devices each, one 4-device mesh "data".
# Leaves split over it (by rows or by columns) have their state on both processes; the bias
# and the head stay replicated. Routing: embed, h.0.bias and head take AdamW, the rest Muon.
JAX_SHAPES = {"embed": (16, 8), "h.0.fc": (8, 16), "h.0.proj": (16, 8), "h.1.fc": (8, 16),
              "h.0.bias": (8,), "head": (8, 16)}
JAX_SPECS = {"embed": ["data"], "h.0.fc": ["data"], "h.0.proj": ["data"],
             "h.1.fc": [None, "data"], "h.0.bias": [], "head": []}
JAX_DEVICES = 4
JAX_STEPS = 3  # 3 steps, save, load, 3 more steps
WORKERS = os.path.join(os.path.dirname(__file__), "jax_multihost_workers.py")
# (sharded_ns, second_moment): the default run takes each mode and each second moment once,
# in one launch of the processes; the slow run the rest of the cross product.
JAX_CASES = [("owner", "normuon"), ("replicated", "adamuon"), ("blockwise", "none")]
JAX_OTHER_CASES = [(mode, moment) for mode in ("owner", "replicated", "blockwise")
                   for moment in ("none", "normuon", "adamuon")
                   if (mode, moment) not in JAX_CASES]


def _jax_inputs(folder):
    """Parameters and 2 * JAX_STEPS steps of gradients, in memory and as the workers' files:
    `params.npz`, `grads0.npz` (before the save) and `grads1.npz` (after it)."""
    rng = np.random.default_rng(5)
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in JAX_SHAPES.items()}
    grads = [{n: rng.standard_normal(s).astype(np.float32) for n, s in JAX_SHAPES.items()}
             for _ in range(2 * JAX_STEPS)]
    np.savez(folder / "params.npz", **params)
    for half in (0, 1):
        steps = grads[half * JAX_STEPS:(half + 1) * JAX_STEPS]
        np.savez(folder / f"grads{half}.npz",
                 **{f"{i}/{n}": v for i, step in enumerate(steps) for n, v in step.items()})
    return params, grads


def _jax_single_process(tx, config, params, grads, resume=None, save=None):
    """`tx` (unsharded `muon_jax.muon(config)`) on this process's device: load `resume`,
    step, save to `save`; the final parameters."""
    import jax
    import muon_jax
    import optax

    params = {n: jax.numpy.asarray(p) for n, p in params.items()}
    state = tx.init(params)
    if resume is not None:
        state = muon_jax.load(resume, state, params, config)
    for step_grads in grads:
        updates, state = jax.jit(tx.update)(step_grads, state, params)
        params = optax.apply_updates(params, updates)
    if save is not None:
        muon_jax.save(save, state, params, config)
    return {n: np.asarray(p) for n, p in params.items()}


def _jax_processes(job, folder, name, processes=2, timeout=900):
    """Run `jax_multihost_workers.py` on `processes` processes joined by `jax.distributed`
    on 127.0.0.1, with JAX_DEVICES CPU devices in all, its outputs named `folder/name-...`;
    each process's report."""
    job = {**job, "port": free_port(), "processes": processes, "out": str(folder / name)}
    (folder / f"{name}.json").write_text(json.dumps(job))
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={JAX_DEVICES // processes}")
    workers = [subprocess.Popen([sys.executable, WORKERS, str(folder / f"{name}.json"), str(i)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for i in range(processes)]
    try:
        logs = [w.communicate(timeout=timeout)[0] for w in workers]
    finally:
        for worker in workers:
            worker.kill()
    failed = [i for i, w in enumerate(workers) if w.returncode != 0]
    assert not failed, "\n".join(f"--- process {i}:\n{logs[i][-3000:]}" for i in failed)
    return [json.loads((folder / f"{name}-{i}.json").read_text()) for i in range(processes)]


def _npz(path):
    with np.load(path) as stored:
        return {n: stored[n] for n in JAX_SHAPES}


def _check_errors_on_both_processes(reports, name, second_moment):
    """The state of the 3 split Muon leaves spans the processes, saved and loaded; a refused
    load, a file missing on process 1 and an unwritable path raise on both processes."""
    other = "normuon" if second_moment == "none" else "none"
    for report in reports:
        assert report["devices"] == JAX_DEVICES
        found = report[name]
        for key in ("split", "split_loaded"):
            assert sum("momentum_buffer" in path for path in found[key]) == 3, found
        refusal = f"second_moment is {second_moment} in the checkpoint, {other} here"
        assert refusal in found["refused"], found
    # An error on one process raises there, and on the other as "process i failed: ...".
    for failing, key in ((1, "missing"), (0, "unwritable")):
        error, other_error = reports[failing][name][key], reports[1 - failing][name][key]
        assert error is not None and not error.startswith("RuntimeError: process"), error
        assert other_error == f"RuntimeError: process {failing} failed: {error}", (
            other_error, error)


def _check_jax_processes(folder, cases):
    """Each `(sharded_ns, second_moment)` case: 3 steps on 2 processes, save; resume for 3
    steps on one process and, from a fresh state, on the 2 processes: both end where 6
    uninterrupted single-process steps end, and the 2-process file holds what the
    single-process one does. The single process is unsharded (one device), except for
    "blockwise", whose result depends on the mesh: there it holds the same 4-device mesh."""
    import muon_jax

    params, grads = _jax_inputs(folder)
    named = {f"{mode}-{moment}": (mode, MuonConfig(ns_dtype="float32", second_moment=moment))
             for mode, moment in cases}
    job = {"specs": JAX_SPECS, "params": str(folder / "params.npz"),
           "grads": [str(folder / "grads0.npz"), str(folder / "grads1.npz")],
           "cases": [{"name": name, "mode": mode, "config": config.to_dict()}
                     for name, (mode, config) in named.items()]}
    reports = _jax_processes(job, folder, "multi")
    blockwise = [case for case in job["cases"] if case["mode"] == "blockwise"]
    if blockwise:
        _jax_processes({**job, "cases": blockwise, "resume": str(folder / "multi")}, folder,
                       "single", processes=1)
    for name, (mode, config) in named.items():
        _check_errors_on_both_processes(reports, name, config.second_moment)
        multi, single = (str(folder / f"{run}-{name}.safetensors") for run in ("multi", "single"))
        saved = _npz(folder / f"multi-{name}-saved.npz")
        if mode == "blockwise":
            uninterrupted, after3, resumed = (_npz(folder / f"single-{name}-{stage}.npz")
                                              for stage in ("uninterrupted", "saved", "resumed"))
        else:
            tx = muon_jax.muon(config)
            uninterrupted = _jax_single_process(tx, config, params, grads)
            after3 = _jax_single_process(tx, config, params, grads[:JAX_STEPS], save=single)
            resumed = _jax_single_process(tx, config, saved, grads[JAX_STEPS:], resume=multi)
        _assert_close(saved, after3, f"{name}: 3 steps on 2 processes")
        # The second moments follow the Newton-Schulz output, which another program (the
        # unsharded one) rounds otherwise in float32, and square it: in the recorded runs
        # "replicated" differed by up to 1.0e-6 (NorMuon) and 2.0e-6 (AdaMuon) of the
        # largest value, 9.2e-6 relative on one AdaMuon entry.
        _assert_same_content(multi, single, moment_tolerance=1e-5)
        _assert_close(resumed, uninterrupted, f"{name}: 2 processes -> 1")
        _assert_close(_npz(folder / f"multi-{name}-resumed.npz"), uninterrupted,
                      f"{name}: 2 processes -> 2 processes")


@pytest.mark.jax
def test_jax_state_spanning_two_processes_saves_one_file_and_resumes_anywhere(tmp_path):
    """Every sharded_ns mode and every second moment, once each (see `_check_jax_processes`)."""
    pytest.importorskip("jax")
    _check_jax_processes(tmp_path, JAX_CASES)


@pytest.mark.jax
@pytest.mark.slow
def test_jax_state_spanning_two_processes_every_mode_and_second_moment(tmp_path):
    """The rest of the (sharded_ns, second_moment) cross product."""
    pytest.importorskip("jax")
    _check_jax_processes(tmp_path, JAX_OTHER_CASES)
