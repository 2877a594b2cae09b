"""The portable checkpoint (see `muon_core.save_checkpoint`) for `Muon`: `save` and `load`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
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
    plan = ckpt.renamed(optimizer.plan, names)
    return list(zip(optimizer._entries, plan)), plan


def save(path: str | os.PathLike, optimizer: Muon, *,
         names: Mapping[str, str] | None = None) -> None:
    """Write `optimizer`'s state as a portable checkpoint at `path`.

    Every per-parameter state entry is stored (momentum_buffer, exp_avg, exp_avg_sq, step and
    any other tensor), tensors shaped like the parameter in the canonical layout. `names` maps
    parameter names to the names stored (default: the optimizer's own).
    """
    pairs, plan = _params_and_plan(optimizer, names)
    state, steps = {}, {}
    for param, entry in pairs:
        perm = ckpt.canonical_perm(entry, LAYOUT)
        stored = {}
        for key, value in optimizer.state.get(param, {}).items():
            where = f"{entry.name}/{key}"
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state {where!r} is a {type(value).__name__}: expected a tensor")
            if value.shape == param.shape and value.ndim:
                value = value.permute(perm)
            stored[key] = to_stored(value, where)
            if key == "step":
                steps[entry.name] = int(value.item())
        if stored:
            state[entry.name] = stored
    ckpt.save_checkpoint(path, plan, LAYOUT, state, steps)


def _restored(param: torch.Tensor, entry: Any, tensors: Mapping[str, ckpt.Tensor],
              fused: bool) -> dict[str, torch.Tensor]:
    perm = ckpt.canonical_perm(entry, LAYOUT)
    stored_shape = tuple(entry.shape[a] for a in perm)
    out = {}
    for key, stored in tensors.items():
        value = from_stored(stored)
        if key == "step":
            out[key] = value.to(torch.float32).reshape(()).to(param.device if fused else "cpu")
        elif value.ndim and tuple(value.shape) == stored_shape:
            out[key] = value.permute(ckpt.inverse(perm)).to(param.device, param.dtype).contiguous()
        else:
            out[key] = value.to(param.device)
    return out


def load(path: str | os.PathLike, optimizer: Muon, *,
         names: Mapping[str, str] | None = None) -> None:
    """Load a portable checkpoint into `optimizer` (built on the same model), replacing its state.

    Refuses, naming the first difference, a checkpoint of another format version, for other
    parameter names or shapes, or routed otherwise; nothing changes then. State tensors take
    the parameter's device and dtype. `names` as in `save`.
    """
    checkpoint = ckpt.read_checkpoint(path)
    pairs, plan = _params_and_plan(optimizer, names)
    ckpt.check_matches(checkpoint, plan, LAYOUT, path)
    fused = {p: bool(g.get("fused")) for g in optimizer.param_groups for p in g["params"]}
    new = {param: _restored(param, entry, checkpoint.state(entry.name), fused[param])
           for param, entry in pairs}
    for param, state in new.items():
        optimizer.state[param] = state
