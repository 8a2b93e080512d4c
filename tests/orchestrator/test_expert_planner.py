"""The expert planner on cases small enough to compute by hand."""

from __future__ import annotations

import pytest
from afd.orchestrator.expert_planner import even_assignment, plan_layer, score


def test_a_single_hot_expert_is_replicated_and_balance_follows() -> None:
    load = [80, 10, 10, 10, 10, 10, 10, 10]  # expert 0 carries as much as four others
    before, _ = score(even_assignment(8, 2), _array(load))
    assert before == pytest.approx(110 / 75)  # node 0 holds 0..3: 110 of 150
    plan = plan_layer(load, nodes=2, redundant_slots=1)
    holders = [n for n, ids in enumerate(plan.assignment) if 0 in ids]
    assert holders == [0, 1]  # the hot expert on both nodes, 40 each
    assert [len(ids) for ids in plan.assignment] == [5, 5]  # 4 + 1 spare slot each, all used
    # the second spare goes to the next hottest per copy (expert 1, ties by id): 5 a copy
    assert sorted(e for ids in plan.assignment for e in ids) == [0, 0, 1, 1, 2, 3, 4, 5, 6, 7]
    assert plan.imbalance == pytest.approx(1.0)  # 40 + 10 + 10 + 10 + 5 on each node


def test_experts_always_chosen_together_share_a_node_when_load_allows() -> None:
    load = [10] * 8
    samples = [(1, 6)] * 20 + [(2, 5)] * 20  # 1 with 6, 2 with 5: contiguous ranges split both
    even_imbalance, even_visits = score(even_assignment(8, 2), _array(load), samples)
    assert even_visits == 2.0
    plan = plan_layer(load, nodes=2, redundant_slots=0, samples=samples)
    node_of = {e: n for n, ids in enumerate(plan.assignment) for e in ids}
    assert node_of[1] == node_of[6] and node_of[2] == node_of[5]
    assert plan.nodes_per_token == 1.0 and plan.imbalance == pytest.approx(even_imbalance)


def test_load_wins_over_affinity_past_the_slack() -> None:
    load = [40, 40, 1, 1]  # experts 0 and 1 always together, but each is half the work
    plan = plan_layer(load, nodes=2, redundant_slots=0, samples=[(0, 1)] * 10)
    node_of = {e: n for n, ids in enumerate(plan.assignment) for e in ids}
    assert node_of[0] != node_of[1] and plan.imbalance == pytest.approx(1.0)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1 node"):
        plan_layer([1, 2], nodes=0, redundant_slots=0)


def _array(values: list[int]):
    import numpy as np

    return np.asarray(values, dtype=float)


def test_plan_experts_from_a_load_file(tmp_path) -> None:
    import json
    import subprocess
    import sys

    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps({"layers": [{"layer": 3, "expert_tokens": [80] + [10] * 7}]}))
    out = tmp_path / "plan.json"
    args = ["plan-experts", "--loads", str(loads), "--nodes", "2", "--redundant-slots", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "afd.orchestrator.cli", *args, "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| 3 | 1.47 | 1.00 | - | - |" in done.stdout
    plan = json.loads(out.read_text())["layers"][0]
    assert [0 in ids for ids in plan["assignment"]] == [True, True]
    loads.write_text(json.dumps({"layers": [{"expert_tokens": [1, -2]}]}))
    bad = subprocess.run(
        [sys.executable, "-m", "afd.orchestrator.cli", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode != 0 and "layers[0] has a negative count" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_plan_experts_for_all_layers_gives_a_deployable_assignment(tmp_path) -> None:
    import json
    import subprocess
    import sys

    from afd.models.expert_placement import ExpertPlacement

    layers = [{"expert_tokens": [50] + [10] * 7}, {"expert_tokens": [30] + [10] * 7}]
    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps({"layers": layers}))
    out = tmp_path / "plan.json"
    args = ["--loads", str(loads), "--nodes", "2", "--redundant-slots", "1", "--all-layers"]
    done = subprocess.run(
        [sys.executable, "-m", "afd.orchestrator.cli", "plan-experts", *args, "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| all |" in done.stdout
    assignment = json.loads(out.read_text())["assignment"]
    placement = ExpertPlacement.explicit(8, assignment)  # what experts.assignment takes
    assert placement.holders()[2][0] == 2  # the hot expert (80 of 220 tokens) on both nodes
