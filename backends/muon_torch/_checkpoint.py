"""The portable checkpoint (see `muon_core.save_checkpoint`) for `Muon`: `save` and `load`.

With a process group the file still holds whole tensors: `save` gathers every rank's part to
group rank 0, which writes it; `load` reads the whole file on every rank and keeps that rank's
part. Both are collective there: every rank of the group calls them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from muon_core import _checkpoint as ckpt

from muon_torch._optimizer import Muon

LAYOUT = "out_in"
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
          torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
          torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {code: dtype for dtype, code in DTYPES.items()}


def to_stored(x: torch.Tensor, name: str) -> ckpt.Tensor:
    """A tensor's dtype code, shape and bytes (copied to the CPU)."""
    if x.dtype not in DTYPES:
        raise TypeError(f"state {name!r} has dtype {x.dtype}: expected one of {list(DTYPES)}")
    flat = x.detach().to("cpu").contiguous().reshape(-1)
    return ckpt.Tensor(DTYPES[x.dtype], tuple(x.shape), flat.view(torch.uint8).numpy().tobytes())


def from_stored(t: ckpt.Tensor) -> torch.Tensor:
    """A CPU tensor from a stored one (a fresh copy of the bytes; nothing is unpickled)."""
    dtype = TORCH_DTYPES[t.dtype]
    if not t.data:
        return torch.empty(t.shape, dtype=dtype)
    return torch.frombuffer(bytearray(t.data), dtype=dtype).reshape(t.shape)


def _params_and_plan(optimizer: Muon, names: Mapping[str, str] | None):
    if not isinstance(optimizer, Muon):
        raise TypeError(f"optimizer is a {type(optimizer).__name__}: expected a muon_torch.Muon")
    if optimizer._dtensors is not None:
        raise TypeError("optimizer has DTensor parameters (FSDP2, tensor parallelism), whose "
                        "state portable checkpoints do not cover yet: expected an optimizer "
                        "without DTensors (use torch.distributed.checkpoint for these)")
    plan = ckpt.renamed(optimizer.plan, names)
    return list(zip(optimizer._entries, plan)), plan


def _second_moments(optimizer: Muon, pairs: list) -> dict[str, str]:
    """Stored name -> second moment of each Muon parameter, from its param group."""
    method = {p: g.get("second_moment", "none") for g in optimizer.param_groups
              if g["algorithm"] == "muon" for p in g["params"]}
    return {entry.name: method[param] for param, entry in pairs if entry.is_muon}


def _stored(pairs: list, states: Mapping[torch.Tensor, Mapping[str, Any]]
            ) -> tuple[dict[str, dict[str, ckpt.Tensor]], dict[str, int]]:
    """Each parameter's state (tensors in the canonical layout) and AdamW steps, by stored
    name, for the parameters in `states`."""
    state, steps = {}, {}
    for param, entry in pairs:
        stored = {}
        for key, value in states.get(param, {}).items():
            where = f"{entry.name}/{key}"
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state {where!r} is a {type(value).__name__}: expected a tensor")
            stored[key] = to_stored(value.permute(ckpt.stored_perm(entry, value.shape, LAYOUT)),
                                    where)
            if key == "step":
                steps[entry.name] = int(value.item())
        if stored:
            state[entry.name] = stored
    return state, steps


def save(path: str | os.PathLike, optimizer: Muon, *,
         names: Mapping[str, str] | None = None) -> None:
    """Write `optimizer`'s state as a portable checkpoint at `path`.

    Every per-parameter state entry is stored (momentum_buffer, second_moment, exp_avg,
    exp_avg_sq, step and any other tensor), tensors shaped like the parameter in the canonical
    layout. `names` maps parameter names to the names stored (default: the optimizer's own).
    With a process group every rank must call it: the state is gathered whole to group rank
    0, which writes the file that one process would write.
    """
    pairs, plan = _params_and_plan(optimizer, names)
    moments = _second_moments(optimizer, pairs)
    if optimizer._sharding is None:
        ckpt.save_checkpoint(path, plan, LAYOUT, *_stored(pairs, optimizer.state), moments)
        return
    gathered = _gather_to_first_rank(optimizer._sharding, pairs)
    error = None
    if gathered is not None:
        try:
            ckpt.save_checkpoint(path, plan, LAYOUT, *gathered, moments)
        except (OSError, ValueError, TypeError) as exc:
            error = exc
    _raise_together(optimizer._sharding.group, error, f"writing {path}")


def _gather_to_first_rank(sharding: Any, pairs: list
                          ) -> tuple[dict[str, dict[str, ckpt.Tensor]], dict[str, int]] | None:
    """Collective: every rank's whole-tensor state (`Sharding.state_dict`, which all-gathers
    ZeRO-1 slices), merged on group rank 0 as `_stored` gives it; None on other ranks."""
    local = sharding.state_dict()["state"]
    mine = _stored(pairs, {p: local[sharding.names[p]] for p, _ in pairs
                           if sharding.names[p] in local})
    parts = [None] * sharding.world_size if sharding.rank == 0 else None
    dist.gather_object(mine, parts, group=sharding.group, group_dst=0)
    if parts is None:
        return None
    state, steps = {}, {}
    for part_state, part_steps in parts:  # replicated AdamW state: the first rank's copy
        for name, value in part_state.items():
            state.setdefault(name, value)
        for name, value in part_steps.items():
            steps.setdefault(name, value)
    order = {entry.name: i for i, (_, entry) in enumerate(pairs)}
    return dict(sorted(state.items(), key=lambda item: order[item[0]])), steps


def _raise_together(group: Any, error: Exception | None, doing: str) -> None:
    """Collective: raise on every rank when any rank failed (the failing rank re-raises its
    own error, the others a RuntimeError naming it), so that no rank goes on alone."""
    found: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(found, None if error is None else f"{type(error).__name__}: {error}",
                           group=group)
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(found) if message]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"group rank {rank} failed {doing}: {message}")


def _restored(param: torch.Tensor, entry: Any, tensors: Mapping[str, ckpt.Tensor],
              fused: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, stored in tensors.items():
        value = from_stored(stored)
        if key == "step":
            out[key] = value.to(torch.float32).reshape(()).to(param.device if fused else "cpu")
            continue
        value = value.permute(ckpt.loaded_perm(entry, value.shape, LAYOUT))
        dtype = param.dtype if value.is_floating_point() else value.dtype
        out[key] = value.to(param.device, dtype).contiguous()
    return out


def load(path: str | os.PathLike, optimizer: Muon, *,
         names: Mapping[str, str] | None = None) -> None:
    """Load a portable checkpoint into `optimizer` (built on the same model), replacing its state.

    Refuses, naming the first difference, a checkpoint of another format version, for other
    parameter names or shapes, routed otherwise, or with another second moment (one saved
    without `second_moment` into an optimizer with one, or the reverse); nothing changes
    then. State tensors take the parameter's device and dtype. `names` as in `save`. With a
    process group every rank must call it: each reads the whole file and keeps its part.
    """
    sharding = optimizer._sharding if isinstance(optimizer, Muon) else None
    try:
        new = _read_state(path, optimizer, names)
    except (OSError, ValueError, TypeError) as exc:
        if sharding is None:
            raise
        _raise_together(sharding.group, exc, f"reading {path}")
    if sharding is None:
        optimizer.state.update(new)
        return
    _raise_together(sharding.group, None, f"reading {path}")
    # Parameters without stored state start as a first step would (zeros), on every rank.
    whole = {sharding.names[p]: state or sharding._zero_state(p) for p, state in new.items()}
    sharding.load_state_dict({"state": whole, "param_groups": [{} for _ in optimizer.param_groups]})


def _read_state(path: str | os.PathLike, optimizer: Muon,
                names: Mapping[str, str] | None) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
    """Every parameter's whole state from the file, after checking that it fits."""
    pairs, plan = _params_and_plan(optimizer, names)
    checkpoint = ckpt.read_checkpoint(path)
    ckpt.check_matches(checkpoint, plan, LAYOUT, path, _second_moments(optimizer, pairs))
    fused = {p: bool(g.get("fused")) for g in optimizer.param_groups for p in g["params"]}
    return {param: _restored(param, entry, checkpoint.state(entry.name), fused[param])
            for param, entry in pairs}
