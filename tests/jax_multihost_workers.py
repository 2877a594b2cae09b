"""One JAX process of the multi-process checkpoint tests in tests/test_checkpoint_sharded.py.

Run as `python jax_multihost_workers.py JOB PROCESS_ID`; `JOB` is a JSON file naming the
coordinator port, the process count, each parameter's PartitionSpec, the cases (each a
`sharded_ns` mode and a config), the inputs (`.npz` files of the parameters and of two runs
of gradients, one array per step and name) and the output prefix. The parameters and
gradients lie on one mesh of every process's devices, so with several processes the state of
the leaves split over it spans processes.

For each case, with several processes (joined by `jax.distributed`): step through the first
gradients and save; then discard the state, try to load the file with a refused config
(another second moment), and with the file missing on process 1 only; save into a missing
folder (process 0 fails to write); load the file into a fresh `tx.init` state and step through
the second gradients. With one process (the single-process run of the same mesh size, for
the modes whose result depends on it): step through both gradients uninterrupted; step
through the first, save; load the file the processes saved, with their parameters at the
save, and step through the second. Each process writes a JSON report (with the errors each
raised); process 0 writes the parameters at each stage, `OUT-CASE-STAGE.npz`.
"""

import json
import sys

import jax
import numpy as np


def _placed(value: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _split_over_processes(state) -> list[str]:
    """The paths of the state arrays whose shards lie on several processes."""
    return sorted(jax.tree_util.keystr(path)
                  for path, leaf in jax.tree_util.tree_leaves_with_path(state)
                  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
                  and not leaf.is_fully_replicated)


def _error(action) -> str | None:
    """The error `action()` raises, as "Type: message"; None when it returns."""
    try:
        action()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def main(job_path: str, process_id: int) -> None:
    job = json.loads(open(job_path).read())
    if job["processes"] > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{job['port']}",
                                   num_processes=job["processes"], process_id=process_id,
                                   initialization_timeout=60)
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    import muon_jax
    from muon_core import MuonConfig

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    shardings = {name: NamedSharding(mesh, P(*spec)) for name, spec in job["specs"].items()}
    report = {"process": jax.process_index(), "devices": jax.device_count()}

    def place(path: str) -> dict:
        stored = np.load(path)
        return {n: _placed(stored[n], sharding) for n, sharding in shardings.items()}

    def run_case(case: str, mode: str, config: MuonConfig) -> dict:
        tx = muon_jax.muon(config, mesh=mesh, sharded_ns=mode)
        step = jax.jit(tx.update)
        out = f"{job['out']}-{case}"

        def train(state, params, grads_paths: list[str], stage: str):
            for grads in map(np.load, grads_paths):
                for i in range(len(grads.files) // len(shardings)):
                    updates, state = step({n: _placed(grads[f"{i}/{n}"], s)
                                           for n, s in shardings.items()}, state, params)
                    params = optax.apply_updates(params, updates)
            whole = {n: np.asarray(multihost_utils.process_allgather(p, tiled=True))
                     for n, p in params.items()}
            if jax.process_index() == 0:
                np.savez(f"{out}-{stage}.npz", **whole)
            return state, params

        params = place(job["params"])
        if job["processes"] == 1:
            train(tx.init(params), params, job["grads"], "uninterrupted")
            state, _ = train(tx.init(params), params, job["grads"][:1], "saved")
            muon_jax.save(f"{out}.safetensors", state, params, config)
            params = place(f"{job['resume']}-{case}-saved.npz")
            state = muon_jax.load(f"{job['resume']}-{case}.safetensors", tx.init(params),
                                  params, config)
            train(state, params, job["grads"][1:], "resumed")
            return {}
        found = {}
        state, params = train(tx.init(params), params, job["grads"][:1], "saved")
        found["split"] = _split_over_processes(state)
        checkpoint = f"{out}.safetensors"
        muon_jax.save(checkpoint, state, params, config)
        del state
        template = tx.init(params)
        other = "normuon" if config.second_moment == "none" else "none"
        refused = config.replace(second_moment=other)
        found["refused"] = _error(lambda: muon_jax.load(checkpoint, template, params, refused))
        lonely = checkpoint + (".absent" if jax.process_index() == 1 else "")
        found["missing"] = _error(lambda: muon_jax.load(lonely, template, params, config))
        unwritable = f"{job['out']}-absent/{case}.safetensors"
        found["unwritable"] = _error(lambda: muon_jax.save(unwritable, template, params,
                                                           config))
        state = muon_jax.load(checkpoint, template, params, config)
        found["split_loaded"] = _split_over_processes(state)
        train(state, params, job["grads"][1:], "resumed")
        return found

    for case in job["cases"]:
        report[case["name"]] = run_case(case["name"], case["mode"],
                                        MuonConfig.from_dict(case["config"]))
    with open(f"{job['out']}-{process_id}.json", "w") as file:
        json.dump(report, file)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
