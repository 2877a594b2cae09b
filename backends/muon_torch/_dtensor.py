"""`Muon` on DTensor parameters: FSDP2 shards and tensor-parallel matrices.

Each Muon DTensor is read as a tensor-parallel piece (the mesh dimension named `tp_dim`, cut by
`Shard(0)` or `Shard(1)`) further cut by at most one data-parallel mesh dimension (FSDP's
`Shard`). Data-parallel shards travel to the matrix's owner rank (`muon_core.assign_owners`
over the data-parallel group) in one all-to-all, the owner orthogonalizes, and the update
travels back in a second all-to-all. The tensor-parallel piece is then orthogonalized by
`config.tp_mode`: "duplicated" all-gathers it inside the TP group, "distributed" all-reduces
the small Gram matrix inside each Newton-Schulz iteration, "blockwise" treats the piece as a
matrix of its own (`muon_core.blockwise_reference_step`). Momentum stays a DTensor shard next
to its parameter; a second moment lives where the orthogonalized matrix is whole (the owner;
every TP rank under "duplicated"), or as this rank's piece where "distributed" keeps it cut.
Cautious weight decay acts on the local shards. AdamW parameters are updated shard by shard.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import muon_core
import torch
import torch.distributed as dist
from muon_core import ParamPlan, Plan
from array_api_compat import array_namespace
from muon_core._ns import gram_polynomial, uses_gram
from muon_core._tensor_parallel import block_entry, chunk_sizes, is_plain_matrix
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from muon_torch._adaptive import (Pieces, _method, cautious_factor, decay_and_add_,
                                  ensure_second_moment, second_moments)
from muon_torch._newton_schulz import _power_of_two_scale, frobenius_norm, newton_schulz, ns_dtype
from muon_torch._optimizer import (_add_block, _decay, _direction, _ns_settings, _to_matrices,
                                   _update_momentum)

DEFAULT_TP_DIM = "tp"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a Muon DTensor is cut on this rank: `tp_axis` split over mesh dimension `tp_dim`
    (this rank's piece has `tp_shape`), that piece split along `dp_axis` over `dp_dim`."""

    mesh: Any
    tp_dim: int | None
    tp_axis: int | None
    tp_shape: tuple[int, ...]
    dp_dim: int | None
    dp_axis: int | None

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """The data-parallel process group (None when no data-parallel dimension shards)."""
        return None if self.dp_dim is None else self.mesh.get_group(self.dp_dim)

    @property
    def tp_group(self) -> dist.ProcessGroup:
        """The tensor-parallel process group."""
        return self.mesh.get_group(self.tp_dim)

    def dp_chunks(self) -> tuple[int, ...]:
        """Sizes along `dp_axis` of every data-parallel rank's shard of the TP piece."""
        return chunk_sizes(self.tp_shape[self.dp_axis], self.mesh.size(self.dp_dim))


def _placement_error(name: str, p: DTensor, problem: str) -> ValueError:
    return ValueError(f"parameter {name!r} (shape {tuple(p.shape)}) is a DTensor with "
                      f"placements {tuple(p.placements)} on mesh dimensions "
                      f"{p.device_mesh.mesh_dim_names}: {problem}")


def layout_of(name: str, p: DTensor, tp_name: str) -> Layout:
    """Read and check a Muon parameter's placements; refuse what the step cannot route."""
    mesh, names = p.device_mesh, p.device_mesh.mesh_dim_names or ()
    tp = dp = None
    for dim, placement in enumerate(p.placements):
        if not isinstance(placement, (Replicate, Shard, _StridedShard)):
            raise _placement_error(name, p, f"{placement} on mesh dimension {dim} is not "
                                   "supported: expected Shard or Replicate")
        if isinstance(placement, Replicate) or mesh.size(dim) == 1:  # one piece: whole
            continue
        is_tp = dim < len(names) and names[dim] == tp_name
        if is_tp and type(placement) is not Shard:
            raise _placement_error(name, p, f"the tensor-parallel dimension {tp_name!r} has "
                                   f"{placement}: expected Shard(0) or Shard(1)")
        if not is_tp and dp is not None:
            raise _placement_error(name, p, "more than one data-parallel mesh dimension "
                                   f"shards it: expected at most one (name the tensor-parallel "
                                   f"one {tp_name!r})")
        tp, dp = ((dim, placement) if is_tp else tp), (dp if is_tp else (dim, placement))
    tp_shape = list(p.shape)
    if tp is not None:
        tp_shape[tp[1].dim] = chunk_sizes(p.shape[tp[1].dim], mesh.size(tp[0]))[
            mesh.get_local_rank(tp[0])]
    if dp is not None:
        strided = isinstance(dp[1], _StridedShard)
        same_axis = tp is not None and tp[1].dim == dp[1].dim
        nested = (strided and same_axis and dp[0] < tp[0]
                  and dp[1].split_factor == mesh.size(tp[0])) or (
            not strided and (not same_axis or tp[0] < dp[0]))
        if not nested:
            raise _placement_error(name, p, f"{dp[1]} on mesh dimension {dp[0]} does not cut "
                                   "the tensor-parallel piece into contiguous shards: expected "
                                   "FSDP's layout (fully_shard after parallelize_module)")
    layout = Layout(mesh, None if tp is None else tp[0], None if tp is None else tp[1].dim,
                    tuple(tp_shape), None if dp is None else dp[0],
                    None if dp is None else dp[1].dim)
    expected = list(tp_shape)
    if dp is not None:
        expected[dp[1].dim] = layout.dp_chunks()[mesh.get_local_rank(dp[0])]
    if tuple(expected) != tuple(p.to_local().shape):
        raise _placement_error(name, p, f"its local shard has shape {tuple(p.to_local().shape)}"
                               f", expected {tuple(expected)} (contiguous torch.chunk shards)")
    return layout


def _narrow(x: torch.Tensor, axis: int, sizes: tuple[int, ...], index: int) -> torch.Tensor:
    return x.narrow(axis, sum(sizes[:index]), sizes[index])


def full_update(direction: torch.Tensor, entry: ParamPlan, group: dict[str, Any],
                schedule: Any, state: dict[str, Any] | None = None) -> torch.Tensor:
    """`-lr * scale * NS(block)` for every block of a whole parameter-shaped direction, after
    the group's second moment (kept in `state`, whole like `entry`) when `state` is given."""
    update = torch.zeros_like(direction)
    matrices = _to_matrices(direction.contiguous(), entry)
    for start, size, scale in zip(entry.block_offsets, entry.blocks, entry.lr_scales):
        rows = slice(start, start + size)
        block = newton_schulz(matrices[:, rows], schedule, group["eps"])
        if state is not None:
            block = second_moments([block], [(state, entry, rows, group)])[0]
        _add_block(update, entry, rows, block, -group["lr"] * scale)
    return update


def distributed_newton_schulz(local: torch.Tensor, axis: int, group: dist.ProcessGroup,
                              schedule: Any, eps: float, gram_form: bool) -> torch.Tensor:
    """Newton-Schulz of a matrix split along its longer `axis` over `group`, each rank holding
    `local`; returns the local piece of the result. The Gram matrix `X Xᵀ` of the short side
    is the sum of the ranks' local products. With `gram_form` (where one process takes the
    Gram form: `muon_core`'s `uses_gram`) it is all-reduced once and every rank iterates on
    it (its trace gives the norm); else the norm and each iteration's Gram matrix are.
    As on one process, the matrix is first scaled by the power of two of its largest entry
    (the smallest of the pieces' `_power_of_two_scale`), so that huge entries stay finite."""
    x = local if axis == 1 else local.mT
    power = _power_of_two_scale(x)
    dist.all_reduce(power, op=dist.ReduceOp.MIN, group=group)
    x = x * power  # exact: a power of two
    if gram_form:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        gram = wide @ wide.mT
        dist.all_reduce(gram, group=group)
        scale = torch.maximum(gram.diagonal().sum(dtype=torch.float64).sqrt()
                              * schedule.norm_scale, eps * power.to(torch.float64))
        q = gram_polynomial(gram / scale.square().to(gram.dtype), schedule,
                            xp=array_namespace(gram))
        x = q.to(x.dtype) @ (x / scale.to(x.dtype))
    else:
        squares = frobenius_norm(x).to(torch.float64).square()
        dist.all_reduce(squares, group=group)
        x = x / torch.maximum(squares.sqrt().to(x.dtype) * schedule.norm_scale, eps * power)
        for a, b, c in schedule.coefficients:
            gram = x @ x.mT
            dist.all_reduce(gram, group=group)
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if axis == 1 else x.mT


def _all_gather_axis(piece: torch.Tensor, axis: int, sizes: tuple[int, ...],
                     group: dist.ProcessGroup) -> torch.Tensor:
    """The whole tensor from every rank's contiguous piece along `axis` (chunk `sizes`)."""
    longest = max(sizes)
    padded = torch.nn.functional.pad(piece.movedim(axis, 0),
                                     (0, 0) * (piece.ndim - 1) + (0, longest - piece.shape[axis]))
    gathered = padded.new_empty(len(sizes) * padded.numel())
    dist.all_gather_into_tensor(gathered, padded.contiguous().view(-1), group=group)
    pieces = gathered.view(len(sizes), *padded.shape)
    return torch.cat([g[:n] for g, n in zip(pieces, sizes)]).movedim(0, axis)


class DTensorSharding:
    """The step of a `Muon` whose parameters include DTensors (FSDP2, tensor parallelism)."""

    def __init__(self, opt: Any, tp_dim: str = DEFAULT_TP_DIM) -> None:
        if not isinstance(tp_dim, str):
            raise TypeError(f"tp_dim must be a mesh dimension name (str), got {tp_dim!r}")
        self.opt, self.mode = opt, opt.config.tp_mode
        self.layouts: dict[torch.Tensor, Layout] = {}
        for group in opt.param_groups:
            for p in group["params"]:
                entry = opt._entries[p]
                if isinstance(p, DTensor) and entry.is_muon:
                    if group.get("master_weights"):
                        raise ValueError(f"parameter {entry.name!r} is a DTensor, and "
                                         "master_weights=True is not supported on DTensor "
                                         "parameters yet: expected master_weights=False")
                    self.layouts[p] = layout_of(entry.name, p, tp_dim)
                    if self.mode == "blockwise" and self.layouts[p].tp_dim is not None:
                        block_entry(entry, entry.shape, opt.config)  # refuses what it can't cut
                        _refuse_blockwise_options(entry, group)
        self.owner = self._owners()

    def _owners(self) -> dict[torch.Tensor, int | None]:
        """Each parameter's owner rank in its data-parallel group (`muon_core.assign_owners`
        over the parameters sharing that group); None where no data-parallel dimension cuts."""
        by_group: dict[Any, list[torch.Tensor]] = {}
        for p, layout in self.layouts.items():
            if layout.dp_dim is not None:
                by_group.setdefault(layout.dp_group, []).append(p)
        owner: dict[torch.Tensor, int | None] = dict.fromkeys(self.layouts)
        for group, params in by_group.items():
            plan = Plan(tuple(self.opt._entries[p] for p in params), self.opt.config)
            table = muon_core.assign_owners(plan, dist.get_world_size(group))
            owner.update({p: table.owner[self.opt._entries[p].name] for p in params})
        return owner

    # -- the step -------------------------------------------------------------------------

    def step(self) -> None:
        """Agree on the gradients across ranks, then step Muon DTensors through their owners
        and everything else in place."""
        opt = self.opt
        work = [(g, [p for p in g["params"] if p.grad is not None]) for g in opt.param_groups]
        if not self._gradients_usable([p for _, params in work for p in params]):
            return
        for group, params in work:
            if not params:
                continue
            if group["algorithm"] == "adamw":  # one call for DTensors, one for plain tensors
                for kind in (True, False):
                    chosen = [p for p in params if isinstance(p, DTensor) == kind]
                    if chosen:
                        opt._adamw_step(group, chosen)
                continue
            plain = [p for p in params if p not in self.layouts]
            if plain:
                opt._muon_step([(group, plain, *_ns_settings(group))])
            sharded = [p for p in params if p in self.layouts]
            if sharded:
                self._muon_step(group, sharded)

    def _gradients_usable(self, params: list[torch.Tensor]) -> bool:
        """One all-reduce over every rank of per-parameter flags (non-finite on this rank's
        shard, has a gradient), so that every rank steps, skips or raises together."""
        index = {p: i for i, p in enumerate(self.opt._entries)}
        flags = torch.zeros(2, len(index), device=next(iter(index)).device)  # NCCL: on device
        for p in params:
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            flags[0, index[p]] = float(not bool(grad.isfinite().all()))
            flags[1, index[p]] = 1.0
        dist.all_reduce(flags)
        entries = list(self.opt._entries.values())
        for p in self.layouts:
            count = int(flags[1, index[p]])
            if 0 < count < dist.get_world_size():
                raise ValueError(f"parameter {entries[index[p]].name!r} has a gradient on "
                                 f"{count} of {dist.get_world_size()} ranks: a sharded Muon "
                                 "matrix needs it on every rank (or on none)")
        bad = [e.name for e, flag in zip(entries, flags[0].tolist()) if flag]
        return muon_core.step_allowed(bad, {e.name: e.shape for e in entries if e.name in bad},
                                      self.opt.config.nonfinite)

    def _muon_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Momentum on the local shards, each matrix orthogonalized through its owner, decay
        and update on the local shards."""
        dtype_name, schedule = _ns_settings(group)
        state = self.opt.state
        for p in params:
            if "momentum_buffer" not in state[p]:
                state[p]["momentum_buffer"] = torch.zeros_like(p)
        locals_ = [p.to_local() for p in params]
        grads = [self._local_grad(p) for p in params]
        bufs = [state[p]["momentum_buffer"].to_local() for p in params]
        _update_momentum(grads, bufs, group)
        dtype = ns_dtype(dtype_name, locals_[0].device)
        directions = {p: _direction(g, b, group).to(dtype) for p, g, b in zip(params, grads, bufs)}
        updates = self._route(group, directions, schedule)
        cautious = cautious_factor(group)
        if cautious is None:  # else decayed where the update agrees in sign, below
            _decay(locals_, group)
        for p, local in zip(params, locals_):
            # `-update` is the descent direction times `lr * scale` > 0: the sign cautious
            # decay compares with the parameter's, entry by entry on the local shard
            decay_and_add_(local, updates[p].to(local.dtype).neg_(), -1.0, cautious)

    def _local_grad(self, p: DTensor) -> torch.Tensor:
        grad = p.grad
        if isinstance(grad, DTensor):
            if tuple(grad.placements) != tuple(p.placements):
                grad = grad.redistribute(p.device_mesh, p.placements)
            grad = grad.to_local()
        return grad.to(p.dtype)

    def _route(self, group: dict[str, Any], directions: dict[torch.Tensor, torch.Tensor],
               schedule: Any) -> dict[torch.Tensor, torch.Tensor]:
        """Local update of each parameter: shards to owners, TP-piece updates, shards back."""
        by_group: dict[Any, list[torch.Tensor]] = {}
        for p in directions:
            by_group.setdefault(self.layouts[p].dp_group, []).append(p)
        updates = {}
        for dp_group, params in by_group.items():
            if dp_group is None:
                updates.update({p: self._tp_update(p, directions[p], group, schedule)
                                for p in params})
                continue
            dtype = directions[params[0]].dtype
            pieces = self._exchange(dp_group, params, {p: directions[p] for p in params}, dtype,
                                    to_owner=True)
            owned = {p: self._tp_update(p, piece, group, schedule) for p, piece in pieces.items()}
            updates.update(self._exchange(dp_group, params, owned, dtype, to_owner=False))
        return updates

    def _exchange(self, group: dist.ProcessGroup, params: list[torch.Tensor],
                  tensors: dict[torch.Tensor, torch.Tensor], dtype: torch.dtype, to_owner: bool
                  ) -> dict[torch.Tensor, torch.Tensor]:
        """One all-to-all over the data-parallel `group`. `to_owner`: each rank sends its shard
        of every parameter to the owner, which returns the whole TP pieces it owns; else each
        owner sends every rank its shard of the pieces it owns, which come back as shards."""
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        owned = [p for p in params if self.owner[p] == rank]

        def shard(p: torch.Tensor, r: int) -> tuple[int, ...]:
            layout = self.layouts[p]
            shape = list(layout.tp_shape)
            shape[layout.dp_axis] = layout.dp_chunks()[r]
            return tuple(shape)

        def numel(shape: tuple[int, ...]) -> int:
            return int(torch.Size(shape).numel())

        if to_owner:
            send = [[tensors[p].reshape(-1) for p in params if self.owner[p] == r]
                    for r in range(size)]
            receive = [[shard(p, r) for p in owned] for r in range(size)]
        else:
            send = [[_narrow(tensors[p], self.layouts[p].dp_axis, self.layouts[p].dp_chunks(), r)
                     .reshape(-1) for p in owned] for r in range(size)]
            receive = [[shard(p, rank) for p in params if self.owner[p] == r]
                       for r in range(size)]
        flat_in = torch.cat([t.to(dtype) for row in send for t in row] or
                            [torch.empty(0, dtype=dtype)])
        flat_out = flat_in.new_empty(sum(numel(s) for row in receive for s in row))
        dist.all_to_all_single(flat_out, flat_in,
                               [sum(numel(s) for s in row) for row in receive],
                               [sum(t.numel() for t in row) for row in send], group=group)
        values = iter(flat_out.split([numel(s) for row in receive for s in row]))
        shaped = [[next(values).view(s) for s in row] for row in receive]
        if to_owner:
            return {p: torch.cat([shaped[r][i] for r in range(size)],
                                 dim=self.layouts[p].dp_axis) for i, p in enumerate(owned)}
        mine = [p for r in range(size) for p in params if self.owner[p] == r]
        return dict(zip(mine, [t for row in shaped for t in row]))

    def _tp_update(self, p: torch.Tensor, piece: torch.Tensor, group: dict[str, Any],
                   schedule: Any) -> torch.Tensor:
        """The update of this rank's tensor-parallel piece of `p` from the piece's direction."""
        entry, layout = self.opt._entries[p], self.layouts[p]
        if layout.tp_dim is not None and self.mode == "blockwise":  # options refused at init
            return full_update(piece, block_entry(entry, tuple(piece.shape), self.opt.config),
                               group, schedule)
        if self._cut_through(p):
            local = distributed_newton_schulz(piece, layout.tp_axis, layout.tp_group, schedule,
                                              group["eps"], uses_gram(schedule, *entry.shape,
                                                                    piece.dtype == torch.bfloat16))
            return self._piece_moment(p, local, group) * (-group["lr"] * entry.lr_scales[0])
        state = self.opt.state[p]  # the second moment lives here, with the owner, whole
        ensure_second_moment(state, p.to_local(), entry, group)
        if layout.tp_dim is None:
            return full_update(piece, entry, group, schedule, state)
        mesh, axis = layout.mesh, layout.tp_axis
        sizes = chunk_sizes(entry.shape[axis], mesh.size(layout.tp_dim))
        whole = _all_gather_axis(piece, axis, sizes, layout.tp_group)
        return _narrow(full_update(whole, entry, group, schedule, state), axis, sizes,
                       mesh.get_local_rank(layout.tp_dim))

    def _cut_through(self, p: torch.Tensor) -> bool:
        """Whether `p`'s tensor-parallel pieces stay cut through its step ("distributed")."""
        layout = self.layouts.get(p)
        return layout is not None and layout.tp_dim is not None and \
            self.mode == "distributed" and distributes(self.opt._entries[p], layout.tp_axis)

    def moment_entry(self, p: torch.Tensor) -> ParamPlan:
        """The plan entry `p`'s second moment is shaped by on the ranks that hold it: the whole
        matrix's, or this rank's piece's where "distributed" keeps the matrix cut."""
        entry = self.opt._entries[p]
        if not self._cut_through(p):
            return entry
        return block_entry(entry, self.layouts[p].tp_shape, self.opt.config)

    def _piece_moment(self, p: torch.Tensor, local: torch.Tensor, group: dict[str, Any]
                      ) -> torch.Tensor:
        """`local`, this rank's piece of an orthogonalized matrix that "distributed" leaves cut,
        after the group's second moment. The moment is kept as this rank's piece (NorMuon's
        per-row statistics: its own rows when the rows are cut, every row when the columns
        are); the row sums of a column-cut NorMuon piece and the two norms are all-reduced."""
        if _method(group) == "none":
            return local
        entry, layout, state = self.moment_entry(p), self.layouts[p], self.opt.state[p]
        ensure_second_moment(state, p.to_local(), entry, group)
        pieces = Pieces(functools.partial(_all_reduced, group=layout.tp_group),
                        None if layout.tp_axis == 0 else self.opt._entries[p].shape[1])
        return second_moments([local[None]], [(state, entry, slice(0, local.shape[0]), group)],
                              pieces)[0][0]


def _all_reduced(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    dist.all_reduce(x, group=group)
    return x


def distributes(entry: ParamPlan, axis: int) -> bool:
    """Whether `tp_mode="distributed"` runs on this matrix: a plain matrix split along its
    longer (or equal) axis; any other falls back to "duplicated"."""
    return is_plain_matrix(entry) and entry.shape[axis] >= entry.shape[1 - axis]


def _refuse_blockwise_options(entry: ParamPlan, group: dict[str, Any]) -> None:
    """Blockwise Muon (`muon_core.blockwise_reference_step`) defines no second moment and no
    cautious decay: refuse them on a matrix that "blockwise" cuts."""
    if _method(group) != "none" or group.get("cautious_weight_decay"):
        raise ValueError(f"parameter {entry.name!r} is cut by tensor parallelism with "
                         f"tp_mode='blockwise', and second_moment={_method(group)!r} / "
                         f"cautious_weight_decay={group.get('cautious_weight_decay')!r} are not "
                         "defined for blockwise Muon: expected second_moment='none' and "
                         "cautious_weight_decay=False, or tp_mode='duplicated' or 'distributed'")
