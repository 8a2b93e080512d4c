"""The rebalance decision on cases small enough to compute by hand: which layers move, to
which nodes, and at what cost in moved experts."""

from __future__ import annotations

import pytest
from afd.models.expert_placement import ExpertPlacement
from afd.orchestrator.expert_load import LayerLoad
from afd.orchestrator.expert_planner import plan_layer
from afd.orchestrator.rebalancer import match_nodes, moves, plan_rebalance


def _load(layer: int, expert_tokens: list[int], placement: ExpertPlacement) -> LayerLoad:
    """The window's view of a layer under `placement` (a replicated expert split evenly)."""
    nodes = [0.0] * placement.num_nodes
    assignment = placement.at(layer)
    for e, tokens in enumerate(expert_tokens):
        holders = [j for j, ids in enumerate(assignment) if e in ids]
        for j in holders:
            nodes[j] += tokens / len(holders)
    mean = sum(nodes) / len(nodes)
    return LayerLoad(layer, tuple(expert_tokens), tuple(int(x) for x in nodes), max(nodes) / mean)


def test_planned_sets_go_to_the_nodes_that_already_hold_most_of_them() -> None:
    current = [(0, 1, 2), (3, 4, 5), (6, 7)]
    planned = [(6, 7, 0), (3, 4, 5, 1), (0, 1, 2)]
    assert match_nodes(current, planned) == [(0, 1, 2), (1, 3, 4, 5), (0, 6, 7)]
    assert moves(current, match_nodes(current, planned)) == 2  # expert 1 to node 1, 0 to node 2


def test_a_hot_expert_is_copied_into_spare_slots_and_only_its_layer_moves() -> None:
    placement = ExpertPlacement.even(8, 2)
    hot = [80, 10, 10, 10, 10, 10, 10, 10]
    loads = [_load(1, hot, placement), _load(2, [10] * 8, placement)]
    assert loads[0].imbalance == pytest.approx(110 / 75)
    plan = plan_rebalance(placement, loads, 1, threshold=1.2, max_moves=8, version=1)
    assert plan is not None and plan.layers == (1,) and plan.version == 1
    assert [0 in ids for ids in plan.placement.at(1)] == [True, True]  # on both nodes now
    assert plan.placement.at(2) == placement.assignment  # the balanced layer stays
    assert plan.expected == pytest.approx(1.0) and plan.measured == pytest.approx(110 / 75)
    # node 0 keeps 0..3 and takes expert 1's copy... whatever it takes is what moves
    assert plan.moves == moves(placement.assignment, plan.placement.at(1))
    assert plan.node_layers(1) == {1: plan.placement.at(1)[1]}


def test_nothing_moves_under_the_threshold_or_past_the_move_budget() -> None:
    placement = ExpertPlacement.even(8, 2)
    loads = [_load(1, [80, 10, 10, 10, 10, 10, 10, 10], placement)]
    assert plan_rebalance(placement, loads, 1, threshold=1.5, max_moves=8, version=1) is None
    needed = plan_rebalance(placement, loads, 1, threshold=1.2, max_moves=8, version=1)
    assert needed is not None
    tight = plan_rebalance(
        placement, loads, 1, threshold=1.2, max_moves=needed.moves - 1, version=1
    )
    assert tight is None


def test_the_worst_layer_moves_first_when_the_budget_allows_one() -> None:
    placement = ExpertPlacement.even(8, 2)
    loads = [
        _load(1, [40, 10, 10, 10, 10, 10, 10, 10], placement),
        _load(2, [80, 10, 10, 10, 10, 10, 10, 10], placement),
    ]
    alone = plan_rebalance(placement, loads[1:], 1, threshold=1.1, max_moves=100, version=1)
    both = plan_rebalance(placement, loads, 1, threshold=1.1, max_moves=100, version=1)
    assert alone is not None and both is not None and both.layers == (1, 2)
    assert alone.moves < both.moves
    one = plan_rebalance(placement, loads, 1, threshold=1.1, max_moves=alone.moves, version=1)
    assert one is not None and one.layers == (2,) and one.moves == alone.moves


def test_replicas_for_failover_are_kept_by_every_plan() -> None:
    placement = ExpertPlacement.even(6, 3, replicas=2)
    loads = [_load(1, [60, 5, 5, 5, 5, 5], placement)]
    plan = plan_rebalance(placement, loads, 1, threshold=1.05, max_moves=50, version=3)
    assert plan is not None and plan.version == 3
    holders = [sum(e in ids for ids in plan.placement.at(1)) for e in range(6)]
    assert min(holders) >= 2 and holders[0] == 3  # the hot one on every node
    assert plan.placement.covers({0}) and plan.placement.covers({2})


def test_the_planner_honours_replicas() -> None:
    plan = plan_layer([10] * 6, nodes=3, redundant_slots=0, replicas=2)
    assert sorted(e for ids in plan.assignment for e in ids) == sorted(list(range(6)) * 2)
    assert all(len(set(ids)) == len(ids) == 4 for ids in plan.assignment)
    with pytest.raises(ValueError, match="replicas"):
        plan_layer([10] * 6, nodes=3, redundant_slots=0, replicas=4)


def test_the_rebalance_counter_follows_the_clusters_count() -> None:
    from afd.orchestrator.cluster import StepRecord
    from afd.orchestrator.metrics import Metrics

    metrics = Metrics("m", (0,))
    for step, rebalances in enumerate([0, 1, 1, 3]):
        metrics.observe_step(StepRecord(step, 0.0, [], [], (1.0,), rebalances), 16)
    text = metrics.exposition().decode()
    assert 'afd:expert_rebalances_total{model_name="m"} 3.0' in text
