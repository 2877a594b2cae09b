"""One JAX process of the multi-process checkpoint tests (tests/test_checkpoint_multihost.py).

Run as `python jax_multihost_workers.py JOB PROCESS_ID`: `JOB` is a JSON file naming the
coordinator port, the process count, the config, the sharded mode, the inputs (`.npz` files of
the parameters and of each step's gradients) and what to load, refuse, step and save. The
parameters and gradients are laid over one mesh of every process's devices, so arrays sharded
over it span processes; each process writes a JSON report and process 0 the final parameters.
"""

import json
import sys

import jax
import numpy as np


def _placed(value: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def main(job_path: str, process_id: int) -> None:
    job = json.loads(open(job_path).read())
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
    config = MuonConfig.from_dict(job["config"])
    params = {n: _placed(v, shardings[n]) for n, v in np.load(job["params"]).items()}
    params = {n: params[n] for n in job["specs"]}
    tx = muon_jax.muon(config, mesh=mesh, sharded_ns=job["mode"])
    state = tx.init(params)
    report = {"process": jax.process_index(), "devices": jax.device_count()}
    if job.get("refuse"):
        try:
            muon_jax.load(job["resume"], state, params, MuonConfig.from_dict(job["refuse"]))
        except ValueError as error:
            report["refused"] = str(error)
    if job.get("resume"):
        state = muon_jax.load(job["resume"], state, params, config)
    step = jax.jit(tx.update)
    grads = np.load(job["grads"])
    for i in range(job["steps"]):
        updates, state = step({n: _placed(grads[f"{i}/{n}"], shardings[n]) for n in params},
                              state, params)
        params = optax.apply_updates(params, updates)
    report["split"] = sorted(  # state arrays whose shards lie on several processes
        jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(state)
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
        and not leaf.is_fully_replicated)
    if job.get("save"):
        muon_jax.save(job["save"], state, params, config)
    whole = {n: np.asarray(multihost_utils.process_allgather(p, tiled=True))
             for n, p in params.items()}
    if jax.process_index() == 0:
        np.savez(job["out"] + "-params.npz", **whole)
    with open(f"{job['out']}-{process_id}.json", "w") as file:
        json.dump(report, file)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
