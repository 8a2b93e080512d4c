"""Live expert rebalancing on a real Ray cluster (real UCX between the nodes): the placement
moves under 32 greedy streams and no token changes, no request is lost — also when an expert
node is SIGKILLed once a rebalance is staged and before every node has switched (with expert
replicas, its experts' replicas serve on and the switch waits for it to come back)."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray
from afd.models.reference import ReferenceEngine
from afd.models.sampling import SamplingParams
from afd.orchestrator.cluster import Cluster, StepRecord
from afd.orchestrator.config import Deployment, ModelSection, RebalanceSection


def _requests(ref: ReferenceEngine) -> list[tuple[list[int], SamplingParams]]:
    words = [
        "every",
        "token",
        "goes",
        "to",
        "a",
        "few",
        "experts",
        "and",
        "the",
        "busiest",
        "node",
        "sets",
        "the",
        "pace",
    ]
    return [
        (
            ref.tokenizer.encode(" ".join(words[i % 7 : i % 7 + 3 + i % 4])),
            SamplingParams(max_tokens=12 + i % 7, ignore_eos=True),
        )
        for i in range(32)
    ]


def _deployment(model: Path, replicas: int = 1) -> Deployment:
    d = Deployment(model=ModelSection(path=str(model))).with_shape(2, 3, 1)
    rebalance = RebalanceSection(enabled=True, threshold=1.0, every_steps=2, max_moves=64)
    experts = replace(
        d.experts, replicas=replicas, redundant_slots=1, load_window=4, rebalance=rebalance
    )
    return replace(d, experts=experts)


def _held_as_placed(cluster: Cluster, timeout_s: float = 60.0) -> None:
    """Every expert node holds, in every MoE layer, what the cluster's placement says. The
    engine thread may switch to a staged plan at any boundary, idle or not, so the nodes are
    read while no plan is staged or being switched to, and read again if one began meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        placement = cluster.placement
        settled = cluster._staging is None and cluster._placement_confirmed
        held = [ray.get(node.held_experts.remote(), timeout=30) for node in cluster.experts]
        if settled and cluster.placement is placement:
            break
        assert time.monotonic() < deadline, "the cluster never settled on a placement"
        time.sleep(0.05)
    assert placement is not None
    for j, layers in enumerate(held):
        assert layers == {layer: placement.at(layer)[j] for layer in layers}, f"expert-{j}"


def test_a_rebalance_under_greedy_streams_changes_no_token(tiny_model: Path, ray_session) -> None:
    ref = ReferenceEngine(tiny_model)
    requests = _requests(ref)
    want = [ref.generate(ids, params).token_ids for ids, params in requests]
    cluster = Cluster(_deployment(tiny_model))
    before = cluster.placement
    try:
        got = [[t.token_id for t in out] for out in cluster.generate(requests)]
        assert got == want
        state = cluster.status()
        assert state.expert_rebalances >= 1 and state.failed_steps == 0
        assert cluster.placement != before and cluster.placement_version >= 1
        _held_as_placed(cluster)
        assert [[t.token_id for t in out] for out in cluster.generate(requests[:8])] == want[:8]
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("replicas", [1, 2])
def test_an_expert_node_killed_during_a_rebalance_loses_nothing(
    tiny_model: Path, replicas: int, ray_session
) -> None:
    ref = ReferenceEngine(tiny_model)
    requests = _requests(ref)
    want = [ref.generate(ids, params).token_ids for ids, params in requests]
    cluster = Cluster(_deployment(tiny_model, replicas))
    victim = ray.get(cluster.experts[1].pid.remote(), timeout=30)
    killed: list[int] = []

    def kill_while_staging(record: StepRecord) -> None:  # after the step that staged a plan
        if cluster._staging is not None and not killed:
            os.kill(victim, signal.SIGKILL)
            killed.append(record.step)

    cluster.step_hooks.append(kill_while_staging)
    try:
        got = [[t.token_id for t in out] for out in cluster.generate(requests)]
        assert killed, "no rebalance was staged while the streams ran"
        assert got == want
        if replicas == 2:  # the replicas took over within the round: not a step failed
            assert cluster.status().failed_steps == 0 and cluster.expert_failovers == 1
        deadline = time.monotonic() + 60  # with replicas it rejoins at a step boundary
        while not all(n.healthy for n in cluster.status().nodes):
            assert time.monotonic() < deadline, "the killed expert node did not rejoin"
            assert [t.token_id for t in cluster.submit(*requests[0])] == want[0]
        assert ray.get(cluster.experts[1].pid.remote(), timeout=60) != victim  # restarted
        _held_as_placed(cluster)  # the restarted node was given the placement of the day
        assert [[t.token_id for t in out] for out in cluster.generate(requests[:8])] == want[:8]
        _held_as_placed(cluster)
    finally:
        cluster.shutdown()
