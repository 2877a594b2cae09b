"""The portable optimizer checkpoint: a safetensors file every backend reads and writes.

The file is plain safetensors (an 8-byte little-endian header length, a JSON header giving
each tensor's dtype, shape and byte range, then the raw bytes), written and read here in pure
Python: loading never unpickles. Tensors are named `"{parameter}/{state key}"` (for example
`"fc1.weight/momentum_buffer"`, `"head.bias/exp_avg"`) and stored in the canonical layout
(see `canonical_perm`). The header's `__metadata__` holds the format and its version, the
config (`MuonConfig.to_dict`), the plan (per parameter: algorithm, shape, canonical shape,
matrix view, blocks, LR scales, and for Muon parameters the second moment) and the step
counts, each as a JSON string.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from muon_core._config import LAYOUTS, MuonConfig
from muon_core._plan import ParamPlan, Plan, _default_axes

FORMAT = "muon-checkpoint"
FORMAT_VERSION = 1
# safetensors dtype code -> bytes per element, for the dtypes optimizer state uses.
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1}
# The canonical state keys: torch's names. Backends map their own names onto these.
STATE_KEYS = ("momentum_buffer", "second_moment", "exp_avg", "exp_avg_sq", "step")
# State keys stored shaped like their parameter (canonical layout).
PARAMETER_SHAPED = ("momentum_buffer", "exp_avg", "exp_avg_sq")
# What a plan record compares between the saving and the loading side, in this order.
COMPARED = ("algorithm", "second_moment", "stored_shape", "matrix_shape", "blocks",
            "lr_scales")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One stored tensor: safetensors dtype code (e.g. "F32", "BF16"), shape and raw bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint in memory: its metadata (config, plan, steps, layout) and its tensors."""

    config: dict[str, Any]
    plan: list[dict[str, Any]]
    steps: dict[str, int]
    layout: str
    tensors: dict[str, Tensor]
    version: int = FORMAT_VERSION

    def state(self, name: str) -> dict[str, Tensor]:
        """The stored state of one parameter, by state key."""
        prefix = name + "/"
        return {key[len(prefix):]: t for key, t in self.tensors.items() if key.startswith(prefix)}

    def nbytes(self) -> int:
        """Total bytes of the stored tensors."""
        return sum(len(t.data) for t in self.tensors.values())


def is_embedding(entry: ParamPlan) -> bool:
    """Whether the plan routed this parameter as an embedding table (by name or module)."""
    return entry.why.startswith("embedding")


def canonical_perm(entry: ParamPlan, layout: str) -> tuple[int, ...]:
    """Axis order that brings a parameter (and its state) from `layout` to the stored layout.

    Muon parameters are stored permuted by the plan (batch..., out..., in...), unless the plan
    permutes a reshaped view (interleaved blocks, `Rule(groups=...)`); those and other tensors
    with 2 or more axes are stored output axis first, as torch lays them out, except embedding
    tables, which are (vocabulary, width) in torch and flax alike.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid: expected one of {list(LAYOUTS)}")
    ndim = len(entry.shape)
    if entry.is_muon and len(entry.perm) == ndim:
        return entry.perm
    if ndim < 2 or is_embedding(entry):
        return tuple(range(ndim))
    out_axes, in_axes = _default_axes(ndim, layout)
    return out_axes + in_axes


def inverse(perm: Sequence[int]) -> tuple[int, ...]:
    """The permutation that undoes `perm`."""
    return tuple(sorted(range(len(perm)), key=perm.__getitem__))


def stored_perm(entry: ParamPlan, shape: Sequence[int], layout: str) -> tuple[int, ...]:
    """Axis order storing a state tensor of `shape`: `canonical_perm` when it is shaped like
    the parameter, else as it is (NorMuon's `(batch, rows)` second moment, scalars)."""
    if tuple(shape) == tuple(entry.shape):
        return canonical_perm(entry, layout)
    return tuple(range(len(shape)))


def loaded_perm(entry: ParamPlan, stored_shape: Sequence[int], layout: str) -> tuple[int, ...]:
    """Axis order bringing a stored state tensor back to `layout` (undoing `stored_perm`)."""
    perm = canonical_perm(entry, layout)
    if tuple(stored_shape) == tuple(entry.shape[a] for a in perm):
        return inverse(perm)
    return tuple(range(len(stored_shape)))


def plan_record(plan: Plan, layout: str,
                second_moments: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The plan as stored: what must match between the saving and the loading side.

    `second_moments` maps a Muon parameter's name to its second moment ("none", "normuon",
    "adamuon"; default: `plan.config.second_moment` for every one)."""
    records = []
    for entry in plan:
        perm = canonical_perm(entry, layout)
        record = {"name": entry.name, "algorithm": entry.algorithm, "shape": list(entry.shape),
                  "stored_shape": [entry.shape[a] for a in perm],
                  "matrix_shape": list(entry.matrix_shape), "blocks": list(entry.blocks),
                  "lr_scales": list(entry.lr_scales)}
        if entry.is_muon:
            record["second_moment"] = (second_moments or {}).get(
                entry.name, plan.config.second_moment)
        records.append(record)
    return records


# -- the safetensors container ---------------------------------------------------------------
def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor],
                      metadata: Mapping[str, str]) -> None:
    """Write `tensors` and the string map `metadata` as a safetensors file (atomically)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, tensor in tensors.items():
        _check_tensor(name, tensor)
        header[name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(tensor.data)]}
        offset += len(tensor.data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for tensor in tensors.values():
            f.write(tensor.data)
    os.replace(partial, path)


def _check_tensor(name: str, tensor: Tensor) -> None:
    if tensor.dtype not in DTYPE_SIZES:
        raise ValueError(f"tensor {name!r}: dtype={tensor.dtype!r} is not storable: expected one "
                         f"of {list(DTYPE_SIZES)}")
    expected = math.prod(tensor.shape) * DTYPE_SIZES[tensor.dtype]
    if len(tensor.data) != expected:
        raise ValueError(f"tensor {name!r}: {len(tensor.data)} bytes for shape {tensor.shape} "
                         f"and dtype {tensor.dtype}: expected {expected}")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, tensors) of a safetensors file; refuses a malformed one with the reason."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: {len(data)} bytes is too short for a safetensors file: "
                         "expected an 8-byte header length first")
    (size,) = struct.unpack("<Q", data[:8])
    if 8 + size > len(data):
        raise ValueError(f"{path}: header length {size} runs past the end of the file "
                         f"({len(data)} bytes): expected a safetensors file")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: the header is not JSON ({err}): expected a safetensors "
                         "file") from None
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + size:]
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= len(body):
            raise ValueError(f"{path}: tensor {name!r} has data_offsets {[start, end]} outside "
                             f"the {len(body)}-byte body")
        tensor = Tensor(info["dtype"], tuple(info["shape"]), bytes(body[start:end]))
        _check_tensor(name, tensor)
        tensors[name] = tensor
    return metadata, tensors


# -- the checkpoint ---------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, plan: Plan, layout: str,
                    state: Mapping[str, Mapping[str, Tensor]], steps: Mapping[str, int],
                    second_moments: Mapping[str, str] | None = None) -> None:
    """Write a checkpoint: `state` maps parameter name -> state key -> tensor (already in the
    canonical layout, see `stored_perm`); `steps` maps parameter name -> steps taken;
    `second_moments` as in `plan_record`."""
    names = {e.name for e in plan}
    unknown = sorted(set(state) - names)
    if unknown:
        raise ValueError(f"state for {unknown}, which are not parameters of the plan")
    tensors = {f"{name}/{key}": t for name, keys in state.items() for key, t in keys.items()}
    metadata = {"format": FORMAT, "version": str(FORMAT_VERSION),
                "config": json.dumps(plan.config.to_dict()), "layout": layout,
                "plan": json.dumps(plan_record(plan, layout, second_moments)),
                "steps": json.dumps({n: int(s) for n, s in steps.items()})}
    write_safetensors(path, tensors, metadata)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; refuses another format or version."""
    metadata, tensors = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: format={metadata.get('format')!r}: expected {FORMAT!r} (a "
                         "Muon optimizer checkpoint)")
    version = metadata.get("version")
    if version != str(FORMAT_VERSION):
        raise ValueError(f"{path}: format version {version!r}: expected {FORMAT_VERSION}, the "
                         "version this muon_core reads")
    return Checkpoint(json.loads(metadata["config"]), json.loads(metadata["plan"]),
                      json.loads(metadata["steps"]), metadata["layout"], tensors)


def first_difference(saved: Sequence[Mapping[str, Any]],
                     current: Sequence[Mapping[str, Any]]) -> str | None:
    """The first way two plan records differ (names, then per parameter routing, second
    moment and shapes), as a sentence; None when they match. Shapes in the saver's own layout
    are not compared; a Muon record without `second_moment` has none."""
    saved_names = [r["name"] for r in saved]
    current_names = [r["name"] for r in current]
    for name in current_names:
        if name not in saved_names:
            return (f"parameter {name!r} is not in the checkpoint (it holds {saved_names[:6]}"
                    f"{' ...' if len(saved_names) > 6 else ''}; `names=` maps names across)")
    for name in saved_names:
        if name not in current_names:
            return f"the checkpoint's parameter {name!r} is not in this model"
    by_name = {r["name"]: r for r in saved}
    for record in current:
        old = by_name[record["name"]]
        for key in COMPARED:
            default = "none" if record["algorithm"] == "muon" else None  # old records
            if old.get(key, default) != record.get(key, default):
                return (f"parameter {record['name']!r}: {key} is {old.get(key, default)} in the "
                        f"checkpoint, {record.get(key, default)} here")
    return None


def check_matches(checkpoint: Checkpoint, plan: Plan, layout: str, path: Any = "",
                  second_moments: Mapping[str, str] | None = None) -> None:
    """Refuse a checkpoint saved for another model (names, shapes), another routing or
    another second moment (`second_moments` as in `plan_record`)."""
    difference = (first_difference(checkpoint.plan, plan_record(plan, layout, second_moments))
                  or _misshapen_state(checkpoint))
    if difference is not None:
        raise ValueError(f"checkpoint {path} does not fit this optimizer: {difference}")


def _misshapen_state(checkpoint: Checkpoint) -> str | None:
    """The first stored momentum or AdamW moment not shaped like its parameter, as a sentence."""
    for record in checkpoint.plan:
        for key, tensor in checkpoint.state(record["name"]).items():
            if key in PARAMETER_SHAPED and list(tensor.shape) != list(record["stored_shape"]):
                return (f"state {key!r} of parameter {record['name']!r} has shape "
                        f"{tuple(tensor.shape)}, expected the parameter's stored shape "
                        f"{tuple(record['stored_shape'])}")
    return None


def renamed(plan: Plan, names: Mapping[str, str] | None) -> Plan:
    """`plan` with its parameters renamed by `names` (local name -> checkpoint name)."""
    if not names:
        return plan
    local = {e.name for e in plan}
    unknown = sorted(set(names) - local)
    if unknown:
        raise ValueError(f"names maps {unknown}, which are not parameters here: expected names "
                         f"from {sorted(local)[:8]}")
    return Plan(tuple(dataclasses.replace(e, name=names.get(e.name, e.name)) for e in plan),
                plan.config)


def summary(checkpoint: Checkpoint) -> str:
    """A readable summary: format, config, plan table, steps and sizes (`muon checkpoint
    inspect`)."""
    config = MuonConfig.from_dict(checkpoint.config)
    lines = [f"format {FORMAT} version {checkpoint.version}, saved in layout "
             f"{checkpoint.layout!r}", "", "config:"]
    lines += [f"  {k} = {v!r}" for k, v in config.to_dict().items()]
    muon = sum(r["algorithm"] == "muon" for r in checkpoint.plan)
    lines += ["", f"plan: {len(checkpoint.plan)} parameters, {muon} muon, "
              f"{len(checkpoint.plan) - muon} adamw", ""]
    header = ("name", "algorithm", "stored shape", "matrix view", "steps", "state", "bytes")
    rows = [header]
    for record in checkpoint.plan:
        state = checkpoint.state(record["name"])
        view = "x".join(map(str, record["matrix_shape"])) if record["algorithm"] == "muon" else "-"
        rows.append((record["name"], record["algorithm"], str(tuple(record["stored_shape"])),
                     view, str(checkpoint.steps.get(record["name"], "-")),
                     ",".join(sorted(state)) or "-", str(sum(len(t.data) for t in state.values()))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines += ["", f"{len(checkpoint.tensors)} tensors, {checkpoint.nbytes()} bytes"]
    return "\n".join(lines)


def common_step(steps: Iterable[int], what: str) -> int:
    """The one step count shared by `steps` (0 when empty); refuses differing counts."""
    found = sorted(set(int(s) for s in steps))
    if len(found) > 1:
        raise ValueError(f"{what} have different step counts {found}: expected one shared count")
    return found[0] if found else 0
