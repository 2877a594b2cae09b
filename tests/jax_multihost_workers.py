"""One JAX process of the multi-process checkpoint test in tests/test_checkpoint_sharded.py.

Run as `python jax_multihost_workers.py JOB PROCESS_ID`; `JOB` is a JSON file naming the
coordinator port, the process count, each parameter's PartitionSpec, the config, the inputs
(`.npz` files of the parameters and of two runs of gradients, one array per step and name)
and the checkpoint path. The parameters and gradients lie on one mesh of every process's
devices, so the state of the leaves split over it spans processes. The processes step through
the first gradients and save; then discard their state, try to load the file with a refused
config, and with the file missing on process 1 only; save into a missing folder (process 0
fails to write); load the file into a fresh `tx.init` state and step through the second
gradients. Each process writes a JSON report (with the errors each raised); process 0 writes
the parameters at the save and at the end.
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
    stored = np.load(job["params"])
    params = {n: _placed(stored[n], sharding) for n, sharding in shardings.items()}
    tx = muon_jax.muon(config, mesh=mesh, sharded_ns=job["mode"])
    step = jax.jit(tx.update)
    report = {"process": jax.process_index(), "devices": jax.device_count()}

    def train(state, params, grads_path: str, name: str):
        grads = np.load(grads_path)
        for i in range(len(grads.files) // len(shardings)):
            updates, state = step({n: _placed(grads[f"{i}/{n}"], s)
                                   for n, s in shardings.items()}, state, params)
            params = optax.apply_updates(params, updates)
        whole = {n: np.asarray(multihost_utils.process_allgather(p, tiled=True))
                 for n, p in params.items()}
        if jax.process_index() == 0:
            np.savez(f"{job['out']}-{name}.npz", **whole)
        return state, params

    state, params = train(tx.init(params), params, job["grads"][0], "saved")
    report["split"] = _split_over_processes(state)
    muon_jax.save(job["checkpoint"], state, params, config)
    del state
    template = tx.init(params)
    refused = MuonConfig.from_dict(job["refuse"])
    report["refused"] = _error(lambda: muon_jax.load(job["checkpoint"], template, params,
                                                     refused))
    lonely = job["checkpoint"] + (".absent" if jax.process_index() == 1 else "")
    report["missing"] = _error(lambda: muon_jax.load(lonely, template, params, config))
    report["unwritable"] = _error(lambda: muon_jax.save(job["unwritable"], template, params,
                                                        config))
    state = muon_jax.load(job["checkpoint"], template, params, config)
    report["split_loaded"] = _split_over_processes(state)
    train(state, params, job["grads"][1], "resumed")
    with open(f"{job['out']}-{process_id}.json", "w") as file:
        json.dump(report, file)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
