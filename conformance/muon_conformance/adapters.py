"""The in-tree adapters: the numpy reference, array-api-strict, torch and JAX.

torch and JAX are imported inside the adapters' methods, so loading this module (or the numpy
adapter) never imports them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from muon_core import MuonConfig, Plan, plan, qk_clip, reference_step
from muon_conformance.adapter import (
    BF16, DISTRIBUTED, FLOAT64, LEGACY_STATE, LR_SCHEDULE, OWNERS, PARAM_GROUPS, PORTABLE, QK_CLIP,
    QK_MAX, TENSOR_PARALLEL, BackendUnavailable,
)


def _numpy_copies(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {name: np.array(a, copy=True) for name, a in arrays.items()}


@dataclasses.dataclass
class ReferenceHandle:
    """Parameters, state, config and plan of a reference-step optimizer."""

    params: dict[str, Any]
    state: dict[str, dict[str, Any]] | None
    config: MuonConfig
    plan: Plan


class NumpyAdapter:
    """`muon_core.reference_step` on numpy arrays, in the arrays' own dtype."""

    name = "numpy"
    capabilities = frozenset({FLOAT64, QK_CLIP})

    def to_native(self, array: np.ndarray) -> Any:
        """A native array holding a copy of `array`."""
        return np.array(array, copy=True)

    def to_numpy(self, array: Any) -> np.ndarray:
        """A numpy copy of a native array."""
        return np.array(array, copy=True)

    def _native(self, arrays: Mapping[str, Any]) -> dict[str, Any]:
        return {name: self.to_native(np.asarray(a)) for name, a in arrays.items()}

    def make(self, params: Mapping[str, Any], config: MuonConfig) -> ReferenceHandle:
        """A handle over native copies of `params` with empty state."""
        shapes = {name: tuple(np.shape(p)) for name, p in params.items()}
        return ReferenceHandle(self._native(params), None, config, plan(shapes, config))

    def step(self, handle: ReferenceHandle, grads: Mapping[str, Any]) -> ReferenceHandle:
        """One `reference_step`."""
        handle.params, handle.state = reference_step(
            handle.params, self._native(grads), handle.state, handle.config, handle.plan)
        return handle

    def qk_clip(self, handle: ReferenceHandle, qk_max: Mapping[str, Any],
                config: MuonConfig) -> ReferenceHandle:
        """`muon_core.qk_clip` on the native arrays."""
        handle.params = qk_clip(handle.params, self._native(qk_max), config, handle.plan)
        return handle

    def params(self, handle: ReferenceHandle) -> dict[str, np.ndarray]:
        """numpy copies of the parameters."""
        return {name: self.to_numpy(p) for name, p in handle.params.items()}

    def state(self, handle: ReferenceHandle) -> dict[str, dict[str, Any]]:
        """The reference state with numpy arrays."""
        return {name: {key: value if key == "step" else self.to_numpy(value)
                       for key, value in entry.items()}
                for name, entry in (handle.state or {}).items()}

    def save(self, handle: ReferenceHandle) -> dict[str, dict[str, Any]]:
        """The state as numpy arrays (picklable)."""
        return self.state(handle)

    def restore(self, params: Mapping[str, Any], config: MuonConfig,
                saved: Mapping[str, Mapping[str, Any]]) -> ReferenceHandle:
        """A handle over `params` with the saved state."""
        handle = self.make(params, config)
        handle.state = {name: {key: value if key == "step" else self.to_native(value)
                               for key, value in entry.items()}
                        for name, entry in copy.deepcopy(dict(saved)).items()}
        return handle


class StrictAdapter(NumpyAdapter):
    """`muon_core.reference_step` on array-api-strict arrays: proves the core uses only the
    Array API standard."""

    name = "array_api_strict"

    def __init__(self) -> None:
        try:
            import array_api_strict
        except ImportError as exc:
            raise BackendUnavailable(f"array-api-strict is not installed ({exc}); "
                                     "try: pip install array-api-strict") from exc
        self.xp = array_api_strict

    def to_native(self, array: np.ndarray) -> Any:
        """An array-api-strict copy of `array`."""
        return self.xp.asarray(np.array(array, copy=True))

    def to_numpy(self, array: Any) -> np.ndarray:
        """A numpy copy through DLPack."""
        return np.array(np.from_dlpack(array), copy=True)


def _require(module: str, attribute: str, install: str) -> Any:
    """Import `module` and return its `attribute`, or raise BackendUnavailable saying why."""
    import importlib

    try:
        found = importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(f"{module} cannot be imported ({exc}); try: {install}") from exc
    if not hasattr(found, attribute):
        raise BackendUnavailable(f"{module} has no {attribute} (backend not built yet)")
    return getattr(found, attribute)


def torch_device() -> str:
    """The device the torch adapter runs on: `MUON_CONFORMANCE_DEVICE` (e.g. "cuda"), else cpu."""
    return os.environ.get("MUON_CONFORMANCE_DEVICE", "cpu")


def _torch_tensor(array: Any) -> Any:
    """A torch tensor on `torch_device()` from a numpy array; bfloat16 (ml_dtypes) through its
    16-bit pattern. On the CPU it shares the numpy memory."""
    import torch

    array = np.asarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).to(torch_device())
    return torch.from_numpy(array).to(torch_device())


def _numpy_array(tensor: Any) -> np.ndarray:
    """A numpy copy of a tensor on any device; bfloat16 becomes ml_dtypes' bfloat16."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return tensor.numpy().copy()


@dataclasses.dataclass
class TorchHandle:
    """A `muon_torch.Muon` and its parameters by name; with a schedule, the 0-d learning-rate
    tensors the optimizer was given, the (Muon, AdamW) rates per step and the steps taken."""

    optimizer: Any
    params: dict[str, Any]
    lr_tensors: tuple[Any, Any] | None = None
    lrs: Sequence[tuple[float, float]] = ()
    steps: int = 0


class TorchAdapter:
    """`muon_torch.Muon` over `torch.nn.Parameter`s (torch layout, as the suite uses)."""

    name = "torch"
    capabilities = frozenset({BF16, FLOAT64, QK_CLIP, DISTRIBUTED, QK_MAX, LR_SCHEDULE,
                              PARAM_GROUPS, LEGACY_STATE, PORTABLE, OWNERS, TENSOR_PARALLEL})
    # `Muon(process_group=...)` keywords of each way to distribute the step
    DISTRIBUTED_MODES = {"layerwise": {"shard": "layerwise"}, "zero1": {"shard": "zero1"},
                         "replicated_adamw": {"shard": "layerwise", "shard_adamw": False},
                         "dtensor": {"dtensor": True}}
    distributed_modes = tuple(DISTRIBUTED_MODES)
    tp_modes = ("duplicated", "distributed", "blockwise")

    def __init__(self) -> None:
        self.muon_class = _require("muon_torch", "Muon", 'pip install "muon-core[torch]"')

    def make(self, params: Mapping[str, Any], config: MuonConfig) -> TorchHandle:
        """A `Muon` over parameters copied from `params`."""
        import torch

        named = {name: torch.nn.Parameter(_torch_tensor(p).clone())
                 for name, p in params.items()}
        return TorchHandle(self.muon_class(list(named.items()), config=config), named)

    def step(self, handle: TorchHandle, grads: Mapping[str, Any]) -> TorchHandle:
        """Set `.grad` (sharing the numpy memory, so any in-place change would show) and step."""
        import torch

        unknown = sorted(set(grads) - set(handle.params))
        if unknown:
            raise KeyError(f"gradients for {unknown} have no matching parameter")
        for name, param in handle.params.items():
            grad = grads.get(name)
            try:
                param.grad = None if grad is None else _torch_tensor(grad)
            except RuntimeError as exc:
                raise ValueError(f"gradient of {name!r} has shape {tuple(np.shape(grad))}, "
                                 f"expected {tuple(param.shape)} (torch: {exc})") from exc
        if handle.lr_tensors is not None:  # as a scheduler does with tensor learning rates
            for tensor, lr in zip(handle.lr_tensors, handle.lrs[handle.steps]):
                tensor.fill_(lr)
        handle.optimizer.step()
        handle.steps += 1
        return handle

    def make_scheduled(self, params: Mapping[str, Any], config: MuonConfig,
                       lrs: Sequence[tuple[float, float]]) -> TorchHandle:
        """A `Muon` given its two learning rates as 0-d tensors, filled with `lrs[i]` before
        step `i` (a compiled step reads them without recompiling)."""
        return self.make_groups(params, config, None, lrs)

    def make_groups(self, params: Mapping[str, Any], config: MuonConfig,
                    groups: Sequence[tuple[Sequence[str], Mapping[str, Any]]] | None,
                    lrs: Sequence[tuple[float, float]] | None = None) -> TorchHandle:
        """A `Muon` with one param group per `(names, overrides)` (all parameters in one
        without `groups`); with `lrs`, the optimizer-wide learning rates are 0-d tensors."""
        import torch

        handle = TorchHandle(None, {name: torch.nn.Parameter(_torch_tensor(p).clone())
                                    for name, p in params.items()})
        groups = groups or ((tuple(params), {}),)
        specs = [{"params": [handle.params[n] for n in names], "param_names": list(names),
                  **overrides} for names, overrides in groups]
        keywords = {}
        if lrs is not None:
            handle.lr_tensors = tuple(torch.tensor(lr, device=torch_device()) for lr in lrs[0])
            handle.lrs = lrs
            keywords = {"lr": handle.lr_tensors[0], "adamw": {"lr": handle.lr_tensors[1]}}
        handle.optimizer = self.muon_class(specs, config=config, **keywords)
        return handle

    def qk_clip(self, handle: TorchHandle, qk_max: Mapping[str, Any],
                config: MuonConfig) -> TorchHandle:
        """`Muon.qk_clip` with the maxima as tensors (the optimizer holds `config`)."""
        handle.optimizer.qk_clip({layer: _torch_tensor(np.asarray(s)) for layer, s in
                                  qk_max.items()})
        return handle

    def params(self, handle: TorchHandle) -> dict[str, np.ndarray]:
        """numpy copies of the parameters."""
        return {name: _numpy_array(p) for name, p in handle.params.items()}

    def state(self, handle: TorchHandle) -> dict[str, dict[str, Any]]:
        """`optimizer.state[param]` by name, tensors as numpy, `step` as an int."""
        state = handle.optimizer.state
        return {name: {key: int(value) if key == "step" else _numpy_array(value)
                       for key, value in state[p].items()}
                for name, p in handle.params.items() if p in state}

    def save(self, handle: TorchHandle) -> dict[str, Any]:
        """A deep copy of `optimizer.state_dict()`."""
        return copy.deepcopy(handle.optimizer.state_dict())

    def restore(self, params: Mapping[str, Any], config: MuonConfig,
                saved: Mapping[str, Any]) -> TorchHandle:
        """A fresh `Muon` that loads `saved` with `load_state_dict`."""
        handle = self.make(params, config)
        handle.optimizer.load_state_dict(saved)
        return handle

    def save_legacy(self, handle: TorchHandle) -> dict[str, Any]:
        """`save`'s state dict with each AdamW `step` a Python float, as older releases of
        torch's optimizers stored it."""
        saved = self.save(handle)
        for group in saved["param_groups"]:
            if group["algorithm"] == "adamw":
                for index in group["params"]:
                    entry = saved["state"].get(index, {})
                    if "step" in entry:
                        entry["step"] = float(entry["step"])
        return saved

    def save_portable(self, handle: TorchHandle, path: str) -> None:
        """`muon_torch.save`: the portable checkpoint file."""
        importlib.import_module("muon_torch").save(path, handle.optimizer)

    def restore_portable(self, params: Mapping[str, Any], config: MuonConfig,
                         path: str) -> TorchHandle:
        """A fresh `Muon` that loads the portable checkpoint at `path` (`muon_torch.load`)."""
        handle = self.make(params, config)
        importlib.import_module("muon_torch").load(path, handle.optimizer)
        return handle

    def qk_max(self, q: np.ndarray, k: np.ndarray, scale: float | None = None,
               mask: np.ndarray | None = None) -> np.ndarray:
        """`muon_torch.record_qk_max` on tensors of `q`, `k` (and `mask`)."""
        store: dict[str, Any] = {}
        importlib.import_module("muon_torch").record_qk_max(
            store, "attn", _torch_tensor(q), _torch_tensor(k), scale,
            None if mask is None else _torch_tensor(mask))
        return _numpy_array(store["attn"])

    def owners(self, params: Mapping[str, Any], config: MuonConfig,
               world_size: int) -> dict[str, int]:
        """`Muon(process_group=...).owners` (layer-wise) read on rank 0 of `world_size` gloo
        processes."""
        payload = {"params": dict(params), "grads": [], "config": config.to_dict()}
        return run_torch_workers(payload, world_size)[0]["owners"]

    def run_distributed(self, params: Mapping[str, Any], config: MuonConfig,
                        grads: Sequence[Mapping[str, Any]], world_size: int,
                        mode: str = "layerwise") -> dict:
        """The final parameters after `grads` with `Muon(process_group=...)` on `world_size`
        gloo processes on 127.0.0.1, each seeing the same gradients; `mode` names the sharding
        (`DISTRIBUTED_MODES`: layer-wise owners, ZeRO-1 slices, AdamW replicated, or DTensor
        parameters and gradients sharded on their first axis, as FSDP2 holds them)."""
        payload = {"params": dict(params), "grads": [dict(g) for g in grads],
                   "config": config.to_dict(), **self.DISTRIBUTED_MODES[mode]}
        return run_torch_workers(payload, world_size)[0]["params"]

    def run_tensor_parallel(self, params: Mapping[str, Any], grads: Sequence[Mapping[str, Any]],
                            world_size: int, runs: Sequence[tuple[MuonConfig, Mapping[str, int]]]
                            ) -> list[dict]:
        """The final parameters of each run `(config, cuts)`, all on the same `world_size` gloo
        processes holding a 1-d device mesh named "tp": each parameter in `cuts` a DTensor
        `Shard(axis)` on it (as `parallelize_module` shards column- and row-parallel layers),
        the others plain tensors; `Muon` with no process group steps in `config.tp_mode`."""
        payload = {"params": dict(params), "grads": [dict(g) for g in grads],
                   "runs": [(config.to_dict(), dict(cuts)) for config, cuts in runs]}
        outputs = run_torch_workers(payload, world_size, worker="torch_tensor_parallel_run")[0]
        if "error" in outputs:
            raise RuntimeError(outputs["error"])
        return outputs["runs"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torch_workers(payload: Mapping[str, Any], world_size: int, timeout: float = 600,
                      worker: str = "torch_distributed_run") -> list[dict]:
    """Run `worker` (a function of this module) on `world_size` fresh interpreters joined by
    gloo on 127.0.0.1; returns each rank's outputs. `torch_distributed_run`'s `payload`:
    "params", "grads" (per step, a dict or a list with one dict per rank), "config" (or
    "configs", one per rank), optional "shard", "shard_adamw", "dtensor" (DTensor parameters on
    a 1-d mesh, no process group), "group_ranks" (a subgroup instead of the world), "resume"
    and "checkpoint" (torch.distributed.checkpoint folders to load the optimizer state from
    before the steps, and to save it to after them), "portable_resume" and
    "portable_checkpoint" (the same with portable checkpoint files, `muon_torch.load`/`save`)."""
    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder, "inputs.pkl")
        inputs.write_bytes(pickle.dumps({**payload, "world_size": world_size,
                                         "port": free_port()}))
        code = (f"import sys; from muon_conformance.adapters import {worker}; "
                f"{worker}(sys.argv[1], sys.argv[2], int(sys.argv[3]))")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        workers = [subprocess.Popen([sys.executable, "-c", code, str(inputs),
                                     str(Path(folder, f"out{rank}.pkl")), str(rank)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for rank in range(world_size)]
        logs = [w.communicate(timeout=timeout)[0] for w in workers]
        failed = [rank for rank, w in enumerate(workers) if w.returncode != 0]
        if failed:
            tails = "\n".join(f"--- rank {r}:\n{logs[r][-2000:]}" for r in failed)
            raise RuntimeError(f"torch workers {failed} failed:\n{tails}")
        return [pickle.loads(Path(folder, f"out{rank}.pkl").read_bytes())
                for rank in range(world_size)]


def _load_checkpoint(opt: Any, folder: str) -> None:
    """`dcp.load` into the template `opt.state_dict()`, then `opt.load_state_dict`."""
    import torch.distributed.checkpoint as dcp

    state = opt.state_dict()
    dcp.load(state, checkpoint_id=folder)
    opt.load_state_dict(state)


def _dtensor_placer(world_size: int, cuts: Mapping[str, int] | None = None
                    ) -> Callable[[str, np.ndarray], Any]:
    """A function placing a named numpy array on a 1-d CPU mesh of `world_size`. Without `cuts`
    (FSDP2's layout): a DTensor sharded on its first axis (unevenly if need be), replicated
    when it is a scalar. With `cuts` (tensor parallelism, the mesh dimension named "tp"): a
    DTensor sharded along `cuts[name]`, or a plain tensor for a name not in `cuts`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import torch

    names = None if cuts is None else ("tp",)  # FSDP2's mesh must not name its dimension "tp"
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=names)

    def place(name: str, array: np.ndarray) -> Any:
        tensor = torch.tensor(array)
        if cuts is None:
            return distribute_tensor(tensor, mesh, [Shard(0) if array.ndim else Replicate()])
        return distribute_tensor(tensor, mesh, [Shard(cuts[name])]) if name in cuts else tensor
    return place


@contextlib.contextmanager
def _gloo_rank(inputs: str, rank: int) -> Iterator[dict]:
    """This rank of a gloo process group on 127.0.0.1 for the duration, one thread; yields the
    pickled inputs."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    data = pickle.loads(Path(inputs).read_bytes())
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{data['port']}", rank=rank,
                            world_size=data["world_size"], timeout=timedelta(seconds=60))
    try:
        yield data
    finally:
        # every rank done before any tears gloo down: a rank that closed its connections while
        # its peer was still finishing could make that peer's process terminate
        dist.barrier()
        dist.destroy_process_group()


def torch_distributed_run(inputs: str, outputs: str, rank: int) -> None:
    """One rank of `run_torch_workers`: gloo on 127.0.0.1, `Muon(process_group=WORLD)`, then
    per step `reduce_gradients()` and `step()`; writes the parameters, or the error raised."""
    import torch
    import torch.distributed as dist

    muon_class = _require("muon_torch", "Muon", 'pip install "muon-core[torch]"')
    with _gloo_rank(inputs, rank) as data:
        config = MuonConfig.from_dict(data["configs"][rank] if "configs" in data
                                      else data["config"])
        params = data["params"][rank] if isinstance(data["params"], list) else data["params"]
        place = (_dtensor_placer(data["world_size"]) if data.get("dtensor")
                 else lambda _, array: torch.tensor(array))
        named = {n: torch.nn.Parameter(place(n, np.array(p))) for n, p in params.items()}
        try:
            group = (dist.new_group(data["group_ranks"]) if "group_ranks" in data
                     else dist.group.WORLD)
            opt = (muon_class(list(named.items()), config) if data.get("dtensor") else
                   muon_class(list(named.items()), config, process_group=group,
                              shard=data.get("shard"), shard_adamw=data.get("shard_adamw", True)))
            if "resume" in data:
                _load_checkpoint(opt, data["resume"])
            if "portable_resume" in data:
                importlib.import_module("muon_torch").load(data["portable_resume"], opt)
            for grads in data["grads"]:
                grads = grads[rank] if isinstance(grads, list) else grads
                for name, param in named.items():
                    param.grad = place(name, np.array(grads[name]))
                if not data.get("dtensor"):
                    opt.reduce_gradients()
                opt.step()
            if "checkpoint" in data:
                import torch.distributed.checkpoint as dcp

                dcp.save(opt.state_dict(), checkpoint_id=data["checkpoint"])
            if "portable_checkpoint" in data:
                importlib.import_module("muon_torch").save(data["portable_checkpoint"], opt)
        except (ValueError, FloatingPointError) as exc:
            Path(outputs).write_bytes(pickle.dumps({"error": f"{type(exc).__name__}: {exc}"}))
            return
        owners = opt.owners
        whole = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in named.items()}
        Path(outputs).write_bytes(pickle.dumps({
            "params": {n: p.detach().numpy().copy() for n, p in whole.items()},
            "state_sizes": {opt.plan.entries[i].name: sum(t.numel() for t in opt.state[p].values())
                            for i, p in enumerate(named.values()) if opt.state.get(p)},
            "owners": None if owners is None else dict(owners.owner)}))


def torch_tensor_parallel_run(inputs: str, outputs: str, rank: int) -> None:
    """One rank of `TorchAdapter.run_tensor_parallel`: for each run `(config, cuts)` a `Muon`
    over parameters placed by `_dtensor_placer(world_size, cuts)`, stepped through "grads";
    writes each run's whole parameters, or the error raised."""
    import torch

    muon_class = _require("muon_torch", "Muon", 'pip install "muon-core[torch]"')
    with _gloo_rank(inputs, rank) as data:
        finals = []
        try:
            for config, cuts in data["runs"]:
                place = _dtensor_placer(data["world_size"], cuts)
                named = {n: torch.nn.Parameter(place(n, np.array(p)))
                         for n, p in data["params"].items()}
                opt = muon_class(list(named.items()), MuonConfig.from_dict(config))
                for grads in data["grads"]:
                    for name, param in named.items():
                        param.grad = place(name, np.array(grads[name]))
                    opt.step()
                finals.append({n: (p.full_tensor() if hasattr(p, "full_tensor") else p)
                               .detach().numpy().copy() for n, p in named.items()})
        except (ValueError, FloatingPointError) as exc:
            Path(outputs).write_bytes(pickle.dumps({"error": f"{type(exc).__name__}: {exc}"}))
            return
        Path(outputs).write_bytes(pickle.dumps({"runs": finals}))


@dataclasses.dataclass
class JaxHandle:
    """An optax transformation, the parameter dict and the optimizer state."""

    update: Any
    params: dict[str, Any]
    state: Any
    x64: bool
    config: MuonConfig | None = None


class JaxAdapter:
    """`muon_jax.muon(config, layout="out_in")` over a dict of jnp arrays, its update jitted;
    float64 runs inside `jax.enable_x64`; `run_distributed` shards the parameters over host
    devices in a fresh interpreter."""

    name = "jax"
    capabilities = frozenset({BF16, FLOAT64, DISTRIBUTED, QK_CLIP, QK_MAX, LR_SCHEDULE, PORTABLE})
    # "owner": parameters sharded over a mesh, each device orthogonalizing its share;
    # "unsharded": whole parameters on one device of a several-device host, no mesh
    distributed_modes = ("owner", "unsharded")

    known_failures = {
        "bad_inputs[nonfinite_raise]": "under jit a NaN gradient cannot raise a Python "
        "FloatingPointError: muon_jax raises it from a host callback, which JAX reports as "
        "JaxRuntimeError with the same message (eager calls raise FloatingPointError)"}

    def __init__(self) -> None:
        self.muon = _require("muon_jax", "muon", 'pip install "muon-core[jax]"')
        self._compiled: dict[MuonConfig, tuple[Any, Any]] = {}

    def _transformation(self, config: MuonConfig) -> tuple[Any, Any]:
        """`(tx, jitted tx.update)` for `config`, built once so compilations are reused."""
        if config not in self._compiled:
            import jax

            tx = self.muon(config, layout="out_in")
            self._compiled[config] = tx, jax.jit(tx.update)
        return self._compiled[config]

    def _x64(self, enabled: bool) -> Any:
        import jax

        return jax.enable_x64(enabled)

    def make(self, params: Mapping[str, Any], config: MuonConfig) -> JaxHandle:
        """Parameters as jnp arrays and `tx.init` state."""
        import jax.numpy as jnp

        x64 = any(np.asarray(p).dtype == np.float64 for p in params.values())
        tx, update = self._transformation(config)
        with self._x64(x64):
            native = {name: jnp.asarray(np.array(p)) for name, p in params.items()}
            return JaxHandle(update, native, tx.init(native), x64, config)

    def step(self, handle: JaxHandle, grads: Mapping[str, Any]) -> JaxHandle:
        """`tx.update` then `optax.apply_updates`; returns a new handle."""
        import jax.numpy as jnp
        import optax

        with self._x64(handle.x64):
            native = {name: jnp.asarray(np.asarray(g)) for name, g in grads.items()}
            updates, state = handle.update(native, handle.state, handle.params)
            params = optax.apply_updates(handle.params, updates)
            return dataclasses.replace(handle, params=params, state=state)

    def make_scheduled(self, params: Mapping[str, Any], config: MuonConfig,
                       lrs: Sequence[tuple[float, float]]) -> JaxHandle:
        """`optax.inject_hyperparams(muon)` with `lr` and `adamw_lr` schedules reading `lrs`
        by the step count."""
        import jax
        import jax.numpy as jnp
        import optax

        table = np.asarray(lrs, dtype=np.float32)
        tx = optax.inject_hyperparams(self.muon)(
            config, layout="out_in", lr=lambda count: jnp.asarray(table[:, 0])[count],
            adamw_lr=lambda count: jnp.asarray(table[:, 1])[count])
        native = {name: jnp.asarray(np.array(p)) for name, p in params.items()}
        return JaxHandle(jax.jit(tx.update), native, tx.init(native), False, config)

    def qk_max(self, q: np.ndarray, k: np.ndarray, scale: float | None = None,
               mask: np.ndarray | None = None) -> np.ndarray:
        """`muon_jax.qk_max` with `q`, `k` moved to flax's `(..., length, heads, dim)`."""
        import jax.numpy as jnp
        import muon_jax

        return np.array(muon_jax.qk_max(jnp.asarray(np.swapaxes(q, -3, -2)),
                                        jnp.asarray(np.swapaxes(k, -3, -2)), scale,
                                        None if mask is None else jnp.asarray(mask)))

    def save_portable(self, handle: JaxHandle, path: str) -> None:
        """`muon_jax.save` of the state (torch layout)."""
        import muon_jax

        with self._x64(handle.x64):
            muon_jax.save(path, handle.state, handle.params, handle.config,
                          layout="out_in")

    def restore_portable(self, params: Mapping[str, Any], config: MuonConfig,
                         path: str) -> JaxHandle:
        """A fresh handle whose state `muon_jax.load` reads from the portable checkpoint."""
        import muon_jax

        handle = self.make(params, config)
        with self._x64(handle.x64):
            state = muon_jax.load(path, handle.state, handle.params, config, layout="out_in")
            return dataclasses.replace(handle, state=state)

    def qk_clip(self, handle: JaxHandle, qk_max: Mapping[str, Any],
                config: MuonConfig) -> JaxHandle:
        """`muon_jax.qk_clip(params, qk_max, config, layout="out_in")`; returns a new handle."""
        import jax.numpy as jnp
        import muon_jax

        with self._x64(handle.x64):
            maxima = {layer: jnp.asarray(np.asarray(s)) for layer, s in qk_max.items()}
            params = muon_jax.qk_clip(handle.params, maxima, config, layout="out_in")
            return dataclasses.replace(handle, params=params)

    def params(self, handle: JaxHandle) -> dict[str, np.ndarray]:
        """numpy copies of the parameters."""
        return _numpy_copies(handle.params)

    def state(self, handle: JaxHandle) -> dict[str, dict[str, Any]]:
        """`MuonState` in the reference's format: its trees are shaped like the parameter dict,
        with an array at the leaves of their half and an empty node elsewhere; one AdamW
        `count` is shared by every AdamW leaf."""
        st = handle.state
        out: dict[str, dict[str, Any]] = {
            name: {"momentum_buffer": np.array(buf)}
            for name, buf in st.momentum_buffer.items() if hasattr(buf, "shape")}
        for name, mu in st.mu.items():
            if hasattr(mu, "shape"):
                out[name] = {"step": int(st.count), "exp_avg": np.array(mu),
                             "exp_avg_sq": np.array(st.nu[name])}
        for name, moment in (st.second_moment or {}).items():
            out[name]["second_moment"] = np.array(moment)
        return out

    def save(self, handle: JaxHandle) -> Any:
        """The state pytree with numpy leaves."""
        import jax

        return jax.tree.map(np.array, handle.state)

    def restore(self, params: Mapping[str, Any], config: MuonConfig, saved: Any) -> JaxHandle:
        """A fresh handle whose state is `saved` as jnp arrays."""
        import jax
        import jax.numpy as jnp

        handle = self.make(params, config)
        with self._x64(handle.x64):
            return dataclasses.replace(handle, state=jax.tree.map(jnp.asarray, saved))

    def run_distributed(self, params: Mapping[str, Any], config: MuonConfig,
                        grads: Sequence[Mapping[str, Any]], world_size: int,
                        mode: str = "owner") -> dict:
        """The final parameters after `grads` on a host with `world_size` CPU devices (JAX
        reads the device count at start-up, hence the subprocess): each parameter sharded over
        them (mode "owner"), or whole on one of them with no mesh ("unsharded")."""
        with tempfile.TemporaryDirectory() as folder:
            inputs, outputs = Path(folder, "inputs.pkl"), Path(folder, "outputs.pkl")
            inputs.write_bytes(pickle.dumps({
                "params": dict(params), "grads": [dict(g) for g in grads],
                "config": config.to_dict(), "world_size": world_size, "mode": mode}))
            env = dict(os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={world_size}")
            code = ("import sys; from muon_conformance.adapters import jax_sharded_run; "
                    "jax_sharded_run(sys.argv[1], sys.argv[2])")
            done = subprocess.run([sys.executable, "-c", code, str(inputs), str(outputs)],
                                  env=env, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"the sharded JAX run failed:\n{done.stderr[-3000:]}")
            return pickle.loads(outputs.read_bytes())


def _jnp_arrays(arrays: Mapping[str, Any]) -> dict[str, Any]:
    import jax.numpy as jnp

    return {name: jnp.asarray(a) for name, a in arrays.items()}


def partition_axes(shape: Sequence[int], world_size: int) -> tuple[str | None, ...]:
    """A PartitionSpec's entries: the first axis divisible by `world_size` is split over
    "workers"; a tensor with no such axis is replicated."""
    axis = next((i for i, size in enumerate(shape) if size % world_size == 0), None)
    return tuple("workers" if i == axis else None for i in range(len(shape)))


def jax_sharded_run(inputs: str, outputs: str) -> None:
    """Run `muon_jax.muon` jitted on parameters sharded over every host device, each device
    orthogonalizing its share of the matrices (`sharded_ns="owner"`), or with mode
    "unsharded" on whole parameters and no mesh (the worker of `JaxAdapter.run_distributed`);
    reads and writes pickles."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    import muon_jax

    data = pickle.loads(Path(inputs).read_bytes())
    world_size = data["world_size"]
    if jax.device_count() != world_size:
        raise RuntimeError(f"expected {world_size} devices, found {jax.device_count()}")
    mesh = jax.make_mesh((world_size,), ("workers",), axis_types=(AxisType.Auto,))

    def place(arrays: Mapping[str, Any]) -> dict[str, Any]:
        return {name: jax.device_put(jnp.asarray(a), NamedSharding(
            mesh, PartitionSpec(*partition_axes(np.shape(a), world_size))))
            for name, a in arrays.items()}

    config = MuonConfig.from_dict(data["config"])
    if data.get("mode") == "unsharded":
        mesh, place = None, _jnp_arrays
    tx = muon_jax.muon(config, layout="out_in", mesh=mesh, axis=None if mesh is None else "workers")
    params = place(data["params"])
    state, update = tx.init(params), jax.jit(tx.update)
    for grads in data["grads"]:
        updates, state = update(place(grads), state, params)
        params = optax.apply_updates(params, updates)
    Path(outputs).write_bytes(pickle.dumps(_numpy_copies(params)))
