"""Which rank orthogonalizes which Muon parameter: a pure function of the plan and the world size.

Every rank (and both frameworks) computes the same table from the same plan without talking.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from muon_core._plan import ParamPlan, Plan


def ns_flops(rows: int, cols: int, steps: int) -> int:
    """Floating-point operations of `steps` Newton-Schulz iterations on one (rows, cols) matrix.

    With m = min(rows, cols) and n = max(rows, cols), an iteration costs X Xᵀ (2m²n),
    A·A (2m³) and B·X (2m²n).
    """
    m, n = sorted((rows, cols))
    return steps * (4 * m * m * n + 2 * m ** 3)


def param_ns_flops(entry: ParamPlan, steps: int) -> int:
    """Newton-Schulz flops of every block of one Muon parameter, its batch included."""
    batch, _, cols = entry.matrix_shape
    return batch * sum(ns_flops(rows, cols, steps) for rows in entry.blocks)


@dataclasses.dataclass(frozen=True)
class OwnerTable:
    """Owner rank of each Muon parameter (`owner[name]`) and the Newton-Schulz flops per rank.

    Built by `assign_owners`: parameters are taken largest cost first (ties in plan order) and
    each goes to the least-loaded rank (ties to the lowest rank), so every rank computes the
    same table from the same plan.
    """

    world_size: int
    owner: Mapping[str, int]
    cost: Mapping[str, int]
    load: tuple[int, ...]

    @property
    def imbalance(self) -> float:
        """max/mean of the per-rank load (1.0 is perfect balance; 1.0 when there is no work)."""
        mean = sum(self.load) / self.world_size
        return max(self.load) / mean if mean else 1.0

    def owned_by(self, rank: int) -> tuple[str, ...]:
        """Names of the parameters `rank` owns, in plan order."""
        return tuple(name for name, r in self.owner.items() if r == rank)

    def table(self) -> str:
        """Per-rank load: parameters owned, Newton-Schulz GFLOP per step, share of the mean."""
        mean = sum(self.load) / self.world_size or 1.0
        lines = [f"{'rank':>4}  {'params':>6}  {'NS GFLOP/step':>13}  {'load/mean':>9}"]
        for rank, load in enumerate(self.load):
            lines.append(f"{rank:>4}  {len(self.owned_by(rank)):>6}  {load / 1e9:>13.2f}  "
                         f"{load / mean:>9.3f}")
        lines.append(f"world size {self.world_size}: load max/mean {self.imbalance:.3f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _balance(names: list[str], cost: Mapping[str, int], world_size: int
             ) -> tuple[dict[str, int], tuple[int, ...]]:
    """Greedy balance: largest cost first (ties in list order), each to the least-loaded rank
    (ties to the lowest rank). Returns `({name: rank}, load per rank)`."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} is invalid: expected a positive int")
    order = sorted(range(len(names)), key=lambda i: (-cost[names[i]], i))
    load = [0] * world_size
    owner_of_index: dict[int, int] = {}
    for index in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner_of_index[index] = rank
        load[rank] += cost[names[index]]
    return {names[i]: owner_of_index[i] for i in range(len(names))}, tuple(load)


def assign_owners(plan: Plan, world_size: int, steps: int | None = None) -> OwnerTable:
    """Give each Muon parameter of `plan` one owner rank in `range(world_size)`, balancing
    Newton-Schulz flops (greedy, largest first). `steps` defaults to `plan.config.ns_steps`."""
    steps = plan.config.ns_steps if steps is None else steps
    cost = {e.name: param_ns_flops(e, steps) for e in plan.muon}
    owner, load = _balance(list(cost), cost, world_size)
    return OwnerTable(world_size, owner, cost, load)


def assign_adamw_owners(plan: Plan, world_size: int) -> OwnerTable:
    """Give each AdamW parameter of `plan` one owner rank, balancing element counts (the
    optimizer-state bytes), the way ZeRO-1 partitions whole parameters. `load` counts values."""
    cost = {e.name: math.prod(e.shape) for e in plan.adamw}
    owner, load = _balance(list(cost), cost, world_size)
    return OwnerTable(world_size, owner, cost, load)


def total_ns_flops(plan: Plan, steps: int | None = None) -> int:
    """Newton-Schulz flops of a whole step of `plan` on one process."""
    steps = plan.config.ns_steps if steps is None else steps
    return sum(param_ns_flops(e, steps) for e in plan.muon)



@dataclasses.dataclass(frozen=True)
class ShapeStack:
    """The Newton-Schulz matrices of one oriented shape `(rows, cols)` (rows <= cols), split
    evenly over ranks: rank r orthogonalizes `items[r * per_rank:(r + 1) * per_rank]`.

    Each item is `(parameter name, block index, batch index)`. Items are in owner order (the
    `assign_owners` rank of their parameter, then plan order), so a parameter's matrices stay
    together and mostly on its owner; the last ranks may get fewer (padding).
    """

    rows: int
    cols: int
    items: tuple[tuple[str, int, int], ...]
    world_size: int

    @property
    def per_rank(self) -> int:
        """Matrices each rank orthogonalizes (the stack is padded to `per_rank * world_size`)."""
        return -(-len(self.items) // self.world_size)

    def rank_of(self, index: int) -> int:
        """The rank that orthogonalizes `items[index]`."""
        return index // self.per_rank


def pack_by_shape(plan: Plan, world_size: int) -> tuple[ShapeStack, ...]:
    """Every Muon matrix of `plan` (each block of each batch entry, oriented so rows <= cols),
    grouped by shape and split evenly over `world_size` ranks; stacks in plan order of their
    first matrix. A pure function of the plan, like `assign_owners`."""
    owners = assign_owners(plan, world_size).owner
    groups: dict[tuple[int, int], list[tuple[int, int, str, int, int]]] = {}
    for index, entry in enumerate(plan.muon):
        batch, _, cols = entry.matrix_shape
        for block, rows in enumerate(entry.blocks):
            shape = (min(rows, cols), max(rows, cols))
            groups.setdefault(shape, []).extend(
                (owners[entry.name], index, entry.name, block, b) for b in range(batch))
    return tuple(ShapeStack(rows, cols, tuple(item[2:] for item in sorted(items)), world_size)
                 for (rows, cols), items in groups.items())


def packed_ns_flops(stacks: tuple[ShapeStack, ...], steps: int) -> int:
    """Newton-Schulz flops each rank runs per step under `pack_by_shape` (padding included)."""
    return sum(s.per_rank * ns_flops(s.rows, s.cols, steps) for s in stacks)
