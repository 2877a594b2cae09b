"""`Muon` sharded over a `torch.distributed` process group: layer-wise owners or ZeRO-1 slices.

Layer-wise: every Muon parameter has one owner rank (`muon_core.assign_owners`); gradients are
reduced to the owner, only the owner keeps momentum and runs Newton-Schulz, and the new values
are broadcast from it. ZeRO-1: every Muon parameter is cut into one flat slice per rank;
gradients are reduce-scattered, momentum lives on the slice, the direction is all-gathered for
Newton-Schulz, each rank applies its slice and the parameters are all-gathered. AdamW
parameters are owned whole (balanced by size, as torch's ZeroRedundancyOptimizer does) or
replicated. Every collective goes through a bucket of at most `bucket_bytes`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import muon_core
import torch
import torch.distributed as dist

from muon_torch._adaptive import (STATE_KEY, cautious_factor, ensure_second_moment,
                                  second_moments)

SHARD_MODES = ("layerwise", "zero1")
DEFAULT_BUCKET_BYTES = 32 * 2**20
REPLICATED = -1  # the owner of a replicated AdamW parameter: every rank


def resolve_group(process_group: Any) -> dist.ProcessGroup:
    """A `ProcessGroup`, or the group of a 1-D `DeviceMesh`; refuses anything else."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialized: "
                           "call torch.distributed.init_process_group first")
    from torch.distributed.device_mesh import DeviceMesh

    if process_group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"process_group does not contain this process (global rank "
                         f"{dist.get_rank()}): expected a group this rank belongs to")

    if isinstance(process_group, DeviceMesh):
        if process_group.ndim != 1:
            raise ValueError(f"process_group is a DeviceMesh with {process_group.ndim=}: "
                             "expected a 1-D mesh (pass mesh[dim] for one dimension)")
        return process_group.get_group()
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup or a 1-D "
                        f"DeviceMesh, got {type(process_group).__name__}")
    return process_group


def slice_bounds(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """`[start, stop)` of `rank`'s ZeRO-1 slice of a flat tensor: equal slices of
    `ceil(numel / world_size)` values, the last ones shorter or empty."""
    size = -(-numel // world_size)
    start = min(rank * size, numel)
    return start, min(start + size, numel)


def _padded(flat: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(flat, (0, length - flat.numel()))


def _flatten(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def _copy_from_flat(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    for t, piece in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(piece.view(t.shape))


@dataclasses.dataclass
class Bucket:
    """Parameters that travel in one collective: `owner` is the group rank that updates them
    (`REPLICATED`: every rank), `sliced` marks ZeRO-1 Muon parameters."""

    owner: int
    params: list[torch.Tensor]
    dtype: torch.dtype
    sliced: bool = False


def make_buckets(params: list[torch.Tensor], key: Callable[[torch.Tensor], tuple],
                 limit: int) -> list[Bucket]:
    """Consecutive parameters with the same `key(p) = (owner, sliced)` and dtype, cut so that
    each bucket holds at most `limit` bytes (a larger parameter travels alone)."""
    buckets: list[Bucket] = []
    open_: dict[tuple, tuple[Bucket, list[int]]] = {}
    for p in params:
        owner, sliced = key(p)
        k = (owner, sliced, p.dtype, p.device)
        size = p.numel() * p.element_size()
        if k not in open_ or open_[k][1][0] + size > limit:
            open_[k] = (Bucket(owner, [], p.dtype, sliced), [0])
            buckets.append(open_[k][0])
        open_[k][0].params.append(p)
        open_[k][1][0] += size
    return buckets


def _refuse_sharded_params(opt: Any) -> None:
    from torch.distributed.tensor import DTensor

    for p, entry in opt._entries.items():
        if isinstance(p, DTensor) or type(p).__name__ == "FlatParameter":
            raise ValueError(f"parameter {entry.name!r} is a {type(p).__name__} (FSDP/DTensor "
                             "sharded): process_group= shards the optimizer of replicated "
                             "parameters; for DTensor parameters (FSDP2, tensor parallel) "
                             "leave process_group out, their mesh says how to route them")


def _description(opt: Any, shard: str, shard_adamw: bool) -> dict[str, Any]:
    """What must agree on every rank: config, sharding and each parameter's name/shape/dtype."""
    groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")}
              for g in opt.param_groups]
    return {"config": opt.config.to_dict(), "shard": shard, "shard_adamw": shard_adamw,
            "groups": json.loads(json.dumps(groups, default=str)),
            "params": [[e.name, list(e.shape), str(p.dtype), e.algorithm]
                       for p, e in opt._entries.items()]}


def check_same_everywhere(description: dict[str, Any], group: dist.ProcessGroup) -> None:
    """Exchange a hash of `description` and raise on every rank if any rank differs, naming
    the first differing field and the ranks."""
    parts = {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()
             for k, v in description.items()}
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, parts, group=group)
    for key in parts:
        ranks = [r for r, other in enumerate(everyone) if other[key] != everyone[0][key]]
        if ranks:
            what = {"params": "parameter names, shapes, dtypes or order",
                    "groups": "param group hyper-parameters"}.get(key, key)
            raise ValueError(f"Muon(process_group=...): the {what} differ between group rank 0 "
                             f"and group ranks {ranks}: expected the same model and settings on "
                             "every rank; nothing was stepped")


class Sharding:
    """The distributed half of a `Muon` built with `process_group=`: ownership tables, buckets,
    gradient reduction, the sharded step and name-keyed checkpoints."""

    def __init__(self, opt: Any, process_group: Any, shard: str, shard_adamw: bool,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        if shard not in SHARD_MODES:
            raise ValueError(f"shard={shard!r} is invalid: expected one of {list(SHARD_MODES)}")
        self.opt, self.shard, self.shard_adamw = opt, shard, shard_adamw
        self.group = resolve_group(process_group)
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError(f"process_group does not contain this process (global rank "
                             f"{dist.get_rank()}): expected a group this rank belongs to")
        self.world_size = dist.get_world_size(self.group)
        _refuse_sharded_params(opt)
        check_same_everywhere(_description(opt, shard, shard_adamw), self.group)
        plan = opt.plan
        self.owners = muon_core.assign_owners(plan, self.world_size)
        self.adamw_owners = muon_core.assign_adamw_owners(plan, self.world_size)
        self.names = {p: e.name for p, e in opt._entries.items()}
        self.owner = {p: self._owner_of(e) for p, e in opt._entries.items()}
        params = list(opt._entries)
        key = (lambda p: (self.owner[p], self.owner[p] is None))
        self.bucket_bytes = bucket_bytes
        self.buckets = make_buckets(params, key, bucket_bytes)
        self._slices: dict[torch.Tensor, torch.Tensor] = {}  # reduced ZeRO-1 gradient slices
        self._new: dict[torch.Tensor, torch.Tensor] = {}  # ZeRO-1 slices after the step
        self.overlap = True  # layer-wise: Newton-Schulz of a bucket while others broadcast
        self.events: list[tuple[float, str, str, int]] | None = None  # see record_timeline

    def _owner_of(self, entry: muon_core.ParamPlan) -> int | None:
        """Group rank updating the parameter; None for a ZeRO-1 Muon parameter (every rank,
        its slice); REPLICATED for unsharded AdamW."""
        if entry.is_muon:
            return self.owners.owner[entry.name] if self.shard == "layerwise" else None
        return self.adamw_owners.owner[entry.name] if self.shard_adamw else REPLICATED

    def updates(self, p: torch.Tensor) -> bool:
        """Whether this rank updates (part of) `p`."""
        return self.owner[p] in (self.rank, None, REPLICATED)

    def bounds(self, p: torch.Tensor, rank: int | None = None) -> tuple[int, int]:
        """This rank's (or `rank`'s) ZeRO-1 slice of `p`."""
        return slice_bounds(p.numel(), self.world_size, self.rank if rank is None else rank)

    def _slice_length(self, p: torch.Tensor) -> int:
        return -(-p.numel() // self.world_size)

    # -- gradients ------------------------------------------------------------------------

    def reduce_gradients(self) -> None:
        """Average the gradients across the group so that each rank receives exactly what it
        updates: a reduce to the owner (layer-wise, owned AdamW), a reduce-scatter of slices
        (ZeRO-1), an all-reduce (replicated AdamW). Afterwards `p.grad` is the average on the
        ranks that update `p` and None elsewhere; a missing gradient counts as zeros."""
        pending = []
        for bucket in self.buckets:
            self._mark("reduce", "issue", bucket)
            pending.append(self._launch_reduce(bucket))
        for bucket, work, flat in pending:
            self._mark("reduce", "wait", bucket)
            work.wait()
            self._mark("reduce", "done", bucket)
            flat.div_(self.world_size)
            self._receive_gradients(bucket, flat)

    def _launch_reduce(self, bucket: Bucket) -> tuple[Bucket, Any, torch.Tensor]:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        if bucket.sliced:
            rows = [_padded(g.detach().reshape(-1), self._slice_length(p) * self.world_size)
                    .view(self.world_size, -1) for g, p in zip(grads, bucket.params)]
            full = torch.cat(rows, dim=1).reshape(-1)
            flat = full.new_empty(full.numel() // self.world_size)
            return bucket, dist.reduce_scatter_single(flat, full, group=self.group,
                                                      async_op=True), flat
        flat = _flatten(grads, bucket.dtype)
        if bucket.owner == REPLICATED:
            return bucket, dist.all_reduce(flat, group=self.group, async_op=True), flat
        return bucket, dist.reduce(flat, group_dst=bucket.owner, group=self.group,
                                   async_op=True), flat

    def _receive_gradients(self, bucket: Bucket, flat: torch.Tensor) -> None:
        if bucket.sliced:
            pieces = flat.split([self._slice_length(p) for p in bucket.params])
            for p, piece in zip(bucket.params, pieces):
                start, stop = self.bounds(p)
                self._slices[p] = piece[:stop - start]
                p.grad = None
            return
        if bucket.owner not in (self.rank, REPLICATED):
            for p in bucket.params:
                p.grad = None
            return
        for p in bucket.params:
            if p.grad is None:
                p.grad = torch.empty_like(p)
        _copy_from_flat(flat, [p.grad for p in bucket.params])

    def _gradient(self, p: torch.Tensor) -> torch.Tensor | None:
        """The gradient this rank uses for `p`: its slice (ZeRO-1 Muon) or `p.grad`."""
        if self.owner[p] is not None:
            return p.grad
        if p in self._slices:
            return self._slices[p]
        if p.grad is None:
            return None
        start, stop = self.bounds(p)
        return p.grad.detach().reshape(-1)[start:stop]

    # -- the step -------------------------------------------------------------------------

    def step(self) -> None:
        """Check gradients on every rank together, update what this rank owns, then share
        the new parameter values."""
        from muon_torch._optimizer import _ns_settings

        opt = self.opt
        settings = {id(g): _ns_settings(g) for g in opt.param_groups if g["algorithm"] == "muon"}
        grads = {p: self._gradient(p) for p in opt._entries if self.updates(p)}
        usable = self._agree_on_gradients(grads)
        self._slices.clear()
        if not usable:
            return
        work = {}  # id(group) -> (group, parameters with a gradient)
        for group in opt.param_groups:
            params = [p for p in group["params"] if grads.get(p) is not None]
            if params:
                work[id(group)] = (group, params)
        self._mark("adamw", "start", None)
        for group, params in work.values():
            if group["algorithm"] == "adamw":
                opt._adamw_step(group, params)
            elif self.shard == "zero1":
                self._zero1_muon_step(group, params, {p: grads[p] for p in params},
                                      *settings[id(group)])
        self._mark("adamw", "end", None)
        if self.shard == "zero1" or not self.overlap:
            if self.shard == "layerwise":
                self._mark("ns", "start", None)
                self._owned_muon_step(work.values(), settings, None)
                self._mark("ns", "end", None)
            self._share_parameters()
        else:
            self._share_parameters(lambda bucket: self._owned_muon_step(
                work.values(), settings, set(bucket.params)))

    def _owned_muon_step(self, work: Any, settings: dict[int, tuple],
                         only: set[torch.Tensor] | None) -> None:
        """Layer-wise: momentum and Newton-Schulz of this rank's Muon parameters (those in
        `only` when given, e.g. one bucket), batched by block shape as without a group."""
        chosen = [(group, [p for p in params if only is None or p in only])
                  for group, params in work if group["algorithm"] == "muon"]
        chosen = [(group, params, *settings[id(group)]) for group, params in chosen if params]
        if chosen:
            self.opt._muon_step(chosen)

    def _mark(self, kind: str, event: str, bucket: Bucket | None) -> None:
        """Record `(time, kind, event, bucket index or -1)` when `record_timeline` is on."""
        if self.events is not None:
            index = -1 if bucket is None else next(
                i for i, b in enumerate(self.buckets) if b is bucket)
            self.events.append((time.perf_counter(), kind, event, index))

    def _agree_on_gradients(self, grads: dict[torch.Tensor, torch.Tensor | None]) -> bool:
        """One all-reduce of per-parameter flags (non-finite, has a gradient) so that every
        rank skips or raises together. ZeRO-1 needs the same gradient set on every rank."""
        index = {p: i for i, p in enumerate(self.opt._entries)}
        device = next(iter(index)).device  # NCCL reduces device tensors only
        flags = torch.zeros(2, len(index), device=device)
        for p, g in grads.items():
            if g is not None:
                if g.is_sparse:
                    raise ValueError(f"parameter {self.names[p]!r} with shape {tuple(p.shape)} "
                                     "has a sparse gradient: expected dense gradients")
                flags[0, index[p]] = ~g.isfinite().all()  # no host sync per tensor
                flags[1, index[p]] = 1.0
        totals = flags.clone()
        dist.all_reduce(totals, group=self.group)
        for p in self.opt._entries:
            count = totals[1, index[p]]
            if self.owner[p] is None and 0 < count < self.world_size:
                raise ValueError(f"parameter {self.names[p]!r} has a gradient on {int(count)} "
                                 f"of {self.world_size} ranks: with shard='zero1' every rank "
                                 "needs it (call opt.reduce_gradients() or use DDP)")
        bad = [name for name, flag in zip(self.names.values(), totals[0].tolist()) if flag]
        if not bad:
            return True
        if self.opt.config.nonfinite == "skip":
            return False
        shapes = {e.name: e.shape for e in self.opt._entries.values() if e.name in bad}
        raise FloatingPointError(muon_core.nonfinite_message(bad, shapes))

    def _zero1_muon_step(self, group: dict[str, Any], params: list[torch.Tensor],
                         grads: dict[torch.Tensor, torch.Tensor], dtype_name: str,
                         schedule: Any) -> None:
        """Momentum on this rank's slices, the direction all-gathered whole for Newton-Schulz
        and the second moment, this rank's slice of the new values kept for
        `_share_parameters`."""
        from muon_torch._newton_schulz import ns_dtype
        from muon_torch._optimizer import _direction, _update_momentum

        dtype = ns_dtype(dtype_name, params[0].device)
        state = self.opt.state
        for p in params:
            if "momentum_buffer" not in state[p]:
                state[p].update(self._fresh_slices(p, group))
        bufs = [state[p]["momentum_buffer"] for p in params]
        _update_momentum([grads[p] for p in params], bufs, group)
        directions = {p: _direction(grads[p], b, group).to(dtype) for p, b in zip(params, bufs)}
        # bucket by bucket, so that whole matrices are held for one bucket at a time
        for chunk in make_buckets(params, lambda p: (None, True), self.bucket_bytes):
            full = self._all_gather_slices(chunk.params, [directions[p] for p in chunk.params])
            moments = self._whole_second_moments(chunk.params, group)
            new = _apply_orthogonalized(self.opt._entries, group, full, schedule, moments)
            for p in chunk.params:
                bounds = slice(*self.bounds(p))
                if _second_moment_sliced(group):
                    state[p][STATE_KEY] = moments[p][STATE_KEY].reshape(-1)[bounds].clone()
                self._new[p] = new.pop(p).reshape(-1)[bounds].clone()

    def _fresh_slices(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """ZeRO-1 state before the first step: the momentum slice, and the second moment
        (AdaMuon: this rank's slice; NorMuon: the whole per-row statistics, on every rank)."""
        start, stop = self.bounds(p)
        state = {"momentum_buffer": torch.zeros(stop - start, dtype=p.dtype, device=p.device)}
        ensure_second_moment(state, p, self.opt._entries[p], group)
        if _second_moment_sliced(group):
            state[STATE_KEY] = state[STATE_KEY].reshape(-1)[start:stop].clone()
        return state

    def _whole_second_moments(self, params: list[torch.Tensor], group: dict[str, Any]
                              ) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        """Each parameter's second-moment state whole, as the step needs it: NorMuon's is
        kept whole; AdaMuon's slices are all-gathered (a copy: the step writes it back)."""
        state = self.opt.state
        if not _second_moment_sliced(group):
            return {p: state[p] for p in params}
        whole = self._all_gather_slices(params, [state[p][STATE_KEY] for p in params])
        return {p: {STATE_KEY: v.clone()} for p, v in whole.items()}

    def _all_gather_slices(self, params: list[torch.Tensor],
                           slices: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Every rank's slices of `params` put together: full tensors shaped like the params."""
        lengths = [self._slice_length(p) for p in params]
        local = torch.cat([_padded(s.reshape(-1), n) for s, n in zip(slices, lengths)])
        gathered = local.new_empty(self.world_size * local.numel())
        dist.all_gather_single(gathered, local, group=self.group)
        out = {}
        for p, columns in zip(params, gathered.view(self.world_size, -1).split(lengths, dim=1)):
            out[p] = columns.reshape(-1)[:p.numel()].view(p.shape)
        return out

    def _share_parameters(self, compute: Callable[[Bucket], None] | None = None) -> None:
        """Broadcast owned parameters from their owners; all-gather ZeRO-1 slices. With
        `compute`, each bucket this rank owns is first computed by `compute(bucket)`, while
        the broadcasts already issued (this rank's and the receives from others) proceed."""
        pending = []
        for bucket in self.buckets:
            if bucket.owner == REPLICATED:
                continue
            if bucket.sliced:
                slices = [self._new.pop(p) if p in self._new else
                          p.detach().reshape(-1)[slice(*self.bounds(p))] for p in bucket.params]
                for p, full in self._all_gather_slices(bucket.params, slices).items():
                    p.detach().copy_(full)
                continue
            if bucket.owner == self.rank and compute is not None:
                self._mark("ns", "start", bucket)
                compute(bucket)
                self._mark("ns", "end", bucket)
            flat = self._broadcast_buffer(bucket)
            self._mark("broadcast", "issue", bucket)
            work = dist.broadcast(flat, group_src=bucket.owner, group=self.group,
                                  async_op=True)
            pending.append((bucket, work, flat))
        for bucket, work, flat in pending:
            self._mark("broadcast", "wait", bucket)
            work.wait()
            self._mark("broadcast", "done", bucket)
            if bucket.owner != self.rank and flat.data_ptr() != bucket.params[0].data_ptr():
                _copy_from_flat(flat, [p.detach() for p in bucket.params])

    def _broadcast_buffer(self, bucket: Bucket) -> torch.Tensor:
        """What a bucket's broadcast sends or fills: a lone contiguous parameter itself (no
        copy), else a flat concatenation (owner) or an empty buffer (the others)."""
        first = bucket.params[0]
        if len(bucket.params) == 1 and first.is_contiguous():
            return first.detach().view(-1)
        if bucket.owner == self.rank:
            return _flatten(bucket.params, bucket.dtype)
        return torch.empty(sum(p.numel() for p in bucket.params), dtype=bucket.dtype,
                           device=first.device)

    # -- checkpoints ----------------------------------------------------------------------

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return next(g for g in self.opt.param_groups if any(q is p for q in g["params"]))

    def _sliced_keys(self, p: torch.Tensor) -> tuple[str, ...]:
        """The state of `p` this rank keeps as its ZeRO-1 slice (none outside ZeRO-1 Muon)."""
        if self.owner[p] is not None:
            return ()
        return ("momentum_buffer", STATE_KEY) if _second_moment_sliced(self._group_of(p)) \
            else ("momentum_buffer",)

    def _zero_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """A fresh state (what the first step would create), so that a template has it."""
        if self.opt._entries[p].is_muon:
            state = {"momentum_buffer": torch.zeros_like(p)}
            ensure_second_moment(state, p, self.opt._entries[p], self._group_of(p))
            return state
        fused = any(g.get("fused") and any(q is p for q in g["params"])
                    for g in self.opt.param_groups)
        return {"step": torch.zeros((), device=p.device if fused else "cpu"),
                "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def _full_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """`p`'s state with whole tensors (ZeRO-1 slices are all-gathered)."""
        state = self.opt.state[p] or self._zero_state(p)
        whole = {k: v.detach().clone() for k, v in state.items()}
        for key in self._sliced_keys(p):  # collective: the same keys on every rank
            whole[key] = self._all_gather_slices([p], [state[key]])[p].clone()
        return whole

    def state_dict(self) -> dict[str, Any]:
        """Name-keyed state for `torch.distributed.checkpoint`: each rank holds the whole
        tensors of what it updates (ZeRO-1 momentum gathered), so a checkpoint loads onto any
        world size or mode. Also the template `dcp.load` fills in place."""
        zero1_muon = [p for p in self.opt._entries if self.owner[p] is None]
        for p in zero1_muon:  # the gather is collective: in the same order on every rank
            if not self.opt.state[p]:
                self.opt.state[p].update(self._fresh_slices(p, self._group_of(p)))
        state = {self.names[p]: self._full_state(p)
                 for p in self.opt._entries if self.updates(p)}
        groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")}
                  for g in self.opt.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from `state_dict()` (after `dcp.load`), taking this rank's part."""
        saved = state_dict["state"]
        for p in self.opt._entries:
            name = self.names[p]
            if not self.updates(p):
                self.opt.state.pop(p, None)
                continue
            if name not in saved:
                raise ValueError(f"the state dict has no state for parameter {name!r}: "
                                 "expected one saved by Muon(process_group=...).state_dict()")
            entry = {k: v.detach().clone() for k, v in saved[name].items()}
            for key in self._sliced_keys(p):
                entry[key] = entry[key].reshape(-1)[slice(*self.bounds(p))].clone()
            self.opt.state[p] = entry
        for group, hyper in zip(self.opt.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in hyper.items() if k in group})


def _second_moment_sliced(group: dict[str, Any]) -> bool:
    """Whether ZeRO-1 keeps the group's second moment as slices (AdaMuon's, elementwise) rather
    than whole on every rank (NorMuon's per-row statistics, `1/cols` of the momentum)."""
    return group.get("second_moment", "none") == "adamuon"


def _apply_orthogonalized(entries: dict, group: dict[str, Any],
                          directions: dict[torch.Tensor, torch.Tensor], schedule: Any,
                          moments: dict[torch.Tensor, dict[str, Any]]
                          ) -> dict[torch.Tensor, torch.Tensor]:
    """New values of each parameter (copies): weight decay, then minus the LR-scaled
    Newton-Schulz of each block of its whole direction (after the group's second moment,
    which updates `moments[p]` in place), one batched call per block shape."""
    from muon_torch._newton_schulz import newton_schulz
    from muon_torch._optimizer import _add_block, _decay, _to_matrices

    new = {p: p.detach().clone() for p in directions}
    cautious = cautious_factor(group)
    if cautious is None:  # else decayed block by block after Newton-Schulz
        _decay(list(new.values()), group)
    batches: dict[tuple[int, int], list[tuple]] = {}
    for p, direction in directions.items():
        entry = entries[p]
        for start, size, scale in zip(entry.block_offsets, entry.blocks, entry.lr_scales):
            batches.setdefault((size, entry.matrix_shape[2]), []).append(
                (p, entry, slice(start, start + size), -group["lr"] * scale))
    for blocks in batches.values():
        counts = [entry.matrix_shape[0] for _, entry, _, _ in blocks]
        stack = torch.cat([_to_matrices(directions[p], entry)[:, rows]
                           for p, entry, rows, _ in blocks])
        updates = second_moments(newton_schulz(stack, schedule, group["eps"], out=stack)
                                 .split(counts), [(moments[p], entry, rows, group)
                                                  for p, entry, rows, _ in blocks])
        for (p, entry, rows, alpha), update in zip(blocks, updates):
            _add_block(new[p], entry, rows, update, alpha, cautious)
    return new


@dataclasses.dataclass
class TrafficCounter:
    """Bytes each rank sends, per collective kind, under the ring model: all-reduce moves
    `2 (N-1)/N` of the tensor, reduce-scatter, all-gather, reduce and broadcast `(N-1)/N`."""

    world_size: int
    sent: dict[str, float] = dataclasses.field(default_factory=dict)
    calls: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        """Record one collective over `nbytes` (the full tensor's size)."""
        factor = 2 if kind == "all_reduce" else 1
        share = factor * (self.world_size - 1) / self.world_size * nbytes
        self.sent[kind] = self.sent.get(kind, 0.0) + share
        self.calls[kind] = self.calls.get(kind, 0) + 1

    @property
    def total(self) -> float:
        """Bytes sent per rank over every recorded collective."""
        return sum(self.sent.values())


_COUNTED = {"all_reduce": 0, "reduce": 0, "broadcast": 0, "reduce_scatter_single": 1,
            "all_gather_single": 0, "reduce_scatter_tensor": 1, "all_gather_into_tensor": 0}


def _size_arg(name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor whose size defines the traffic: the input of a reduce-scatter, the output
    of an all-gather, the tensor of the others."""
    keys = {"reduce_scatter_single": "input", "reduce_scatter_tensor": "input",
            "all_gather_single": "output_tensor", "all_gather_into_tensor": "output_tensor"}
    key = keys.get(name, "tensor")
    return kwargs[key] if key in kwargs else args[_COUNTED[name] if name in keys else 0]


def count_traffic(counter: TrafficCounter) -> Iterator[None]:
    """Context manager: route `torch.distributed`'s collectives through `counter`: those Muon
    and torch's ZeroRedundancyOptimizer call, and DDP's when its Python all-reduce hook
    (`ddp_comm_hooks.default_hooks.allreduce_hook`) is registered."""
    import contextlib

    @contextlib.contextmanager
    def patched() -> Iterator[None]:
        saved = {name: getattr(dist, name) for name in _COUNTED}

        def wrap(name: str, fn: Callable) -> Callable:
            def counted(*args: Any, **kwargs: Any) -> Any:
                tensor = _size_arg(name, args, kwargs)
                kind = name.split("_single")[0].split("_tensor")[0].replace("_into", "")
                counter.add(kind, tensor.numel() * tensor.element_size())
                return fn(*args, **kwargs)
            return counted

        for name, fn in saved.items():
            setattr(dist, name, wrap(name, fn))
        try:
            yield
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)

    return patched()


def record_timeline(opt: Any) -> Iterator[list[tuple[float, str, str, int]]]:
    """Context manager: while open, the sharded `opt` (built with `process_group=`) appends
    `(time.perf_counter(), kind, event, bucket)` to the list it yields: kind "ns" (event
    "start"/"end": the Newton-Schulz of one owned bucket, or of all at once, bucket -1),
    "adamw" ("start"/"end": the AdamW step, and ZeRO-1's Muon step, bucket -1), "reduce"
    (`reduce_gradients`) or "broadcast" ("issue"/"wait"/"done" of one bucket's collective);
    `bucket` indexes the optimizer's buckets."""
    import contextlib

    sharding = getattr(opt, "_sharding", None)
    if sharding is None:
        raise ValueError("record_timeline needs a Muon built with process_group=...")

    @contextlib.contextmanager
    def recording() -> Iterator[list[tuple[float, str, str, int]]]:
        sharding.events = []
        try:
            yield sharding.events
        finally:
            sharding.events = None

    return recording()
