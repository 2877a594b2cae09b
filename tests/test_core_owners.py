"""The owner table: one owner per Muon parameter, balanced by Newton-Schulz flops."""

import itertools

import pytest

import muon_core
from muon_core import MuonConfig, assign_owners, ns_flops, plan

from muon_cli.benchtools import gpt2_shapes


def test_ns_flops_counts_the_three_products_of_each_iteration():
    # m=2, n=3: X Xᵀ 2*2*2*3=24, A·A 2*2^3=16, B·X 24 -> 64 per step.
    assert ns_flops(2, 3, 1) == 64
    assert ns_flops(3, 2, 5) == 5 * 64


def test_every_muon_parameter_has_exactly_one_owner_and_loads_add_up():
    p = plan(gpt2_shapes(), MuonConfig())
    for world in (1, 2, 3, 8):
        table = assign_owners(p, world)
        assert set(table.owner) == {e.name for e in p.muon}
        assert all(0 <= r < world for r in table.owner.values())
        assert sum(table.load) == muon_core.total_ns_flops(p)
        for rank in range(world):
            assert table.load[rank] == sum(table.cost[n] for n in table.owned_by(rank))


def test_gpt2_small_is_balanced_at_eight_ranks():
    # 36 blocks-sets of 8.15 GFLOP (qkv as 3x768x768, the two MLP matrices) and 12 attention
    # projections of 2.72 GFLOP split evenly over 8 ranks: the greedy assignment is exact.
    table = assign_owners(plan(gpt2_shapes(), MuonConfig()), 8)
    assert table.imbalance == pytest.approx(1.0)


def test_greedy_is_within_four_thirds_of_the_best_split_on_small_cases():
    # Exhaustive search over every assignment gives the optimum; the largest-first greedy is
    # guaranteed within 4/3 - 1/(3k) of it (Graham, 1969).
    shapes = {f"w{i}": s for i, s in enumerate([(64, 64), (64, 256), (32, 32), (128, 64),
                                                 (16, 16), (64, 64), (48, 96)])}
    p = plan(shapes, MuonConfig())
    costs = [assign_owners(p, 1).cost[n] for n in shapes]
    for world in (2, 3):
        best = min(max(sum(c for c, r in zip(costs, ranks) if r == k) for k in range(world))
                   for ranks in itertools.product(range(world), repeat=len(costs)))
        assert max(assign_owners(p, world).load) <= (4 / 3 - 1 / (3 * world)) * best


def test_same_plan_gives_the_same_table():
    p = plan(gpt2_shapes(), MuonConfig())
    assert assign_owners(p, 4) == assign_owners(p, 4)


def test_more_ranks_than_parameters_leaves_ranks_idle():
    p = plan({"a": (8, 8), "b": (4, 8)}, MuonConfig())
    table = assign_owners(p, 4)
    assert sorted(table.owner.values()) == [0, 1]
    assert table.load[2:] == (0, 0)
    assert "world size 4" in table.table()


@pytest.mark.parametrize("world", [0, -1, 1.5, True])
def test_bad_world_size_is_named(world):
    with pytest.raises(ValueError, match="world_size="):
        assign_owners(plan({"a": (4, 4)}, MuonConfig()), world)


def _matrices(p):
    """Every (name, block, batch index) of the plan's Muon matrices, counted independently."""
    return sorted((e.name, k, b) for e in p.muon for k in range(len(e.blocks))
                  for b in range(e.matrix_shape[0]))


def test_pack_by_shape_lists_every_matrix_once_oriented_and_in_owner_order():
    config = MuonConfig(rules=(muon_core.Rule("stack", out_axes=(1,), in_axes=(2,)),))
    p = plan({"h.0.attn.qkv.weight": (96, 32), "h.0.fc.weight": (128, 32),
              "h.0.proj.weight": (32, 128), "stack": (6, 32, 32)}, config, layout="out_in")
    for world in (1, 2, 3, 4):
        stacks = muon_core.pack_by_shape(p, world)
        assert sorted(item for s in stacks for item in s.items) == _matrices(p)
        owners = assign_owners(p, world).owner
        for s in stacks:
            assert s.rows <= s.cols
            assert s.per_rank * world >= len(s.items) > (s.per_rank - 1) * world
            ranks = [owners[name] for name, _, _ in s.items]
            assert ranks == sorted(ranks)
            for name, block, _ in s.items:
                rows, cols = p[name].blocks[block], p[name].matrix_shape[2]
                assert (s.rows, s.cols) == (min(rows, cols), max(rows, cols))


def test_a_stack_of_same_shape_matrices_is_split_across_ranks():
    # One parameter holding 12 matrices of 32x16: 3 per rank at 4 ranks, not 12 on one owner.
    config = MuonConfig(rules=(muon_core.Rule("layers", out_axes=(1,), in_axes=(2,)),))
    stacks = muon_core.pack_by_shape(plan({"layers": (12, 16, 32)}, config), 4)
    assert [(s.rows, s.cols, s.per_rank) for s in stacks] == [(16, 32, 3)]
    assert [stacks[0].rank_of(i) for i in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_gpt2_small_packs_evenly_at_eight_ranks():
    # GPT-2 small: 36 768x768 blocks from the fused QKV + 12 attention projections = 48, and
    # 24 MLP matrices oriented 768x3072: 6 and 3 per rank at 8 ranks, no padding.
    p = plan(gpt2_shapes(), MuonConfig())
    stacks = muon_core.pack_by_shape(p, 8)
    assert sorted((s.rows, s.cols, len(s.items), s.per_rank) for s in stacks) == [
        (768, 768, 48, 6), (768, 3072, 24, 3)]
    assert muon_core.packed_ns_flops(stacks, 5) * 8 == muon_core.total_ns_flops(p)
