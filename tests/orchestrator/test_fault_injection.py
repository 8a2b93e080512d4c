"""SIGKILL a node's process while 32 greedy streams run: every stream still gets exactly the
tokens of a fault-free run (real Ray actors, real UCX). With expert replicas, not even a round
fails."""

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
from afd.orchestrator.cluster import Cluster
from afd.orchestrator.config import Deployment, ModelSection

WORDS = [
    "the",
    "model",
    "routes",
    "every",
    "token",
    "to",
    "a",
    "few",
    "experts",
    "and",
    "the",
    "attention",
    "node",
    "keeps",
    "its",
    "cache",
]


def _requests(ref: ReferenceEngine) -> list[tuple[list[int], SamplingParams]]:
    out = []
    for i in range(32):
        text = " ".join(WORDS[(i * 3) % len(WORDS) : (i * 3) % len(WORDS) + 2 + i % 5])
        out.append(
            (ref.tokenizer.encode(text), SamplingParams(max_tokens=16 + i % 9, ignore_eos=True))
        )
    return out


def test_with_expert_replicas_a_killed_expert_node_fails_no_round(
    tiny_model: Path, ray_session
) -> None:
    ref = ReferenceEngine(tiny_model)
    requests = _requests(ref)
    want = [ref.generate(ids, params).token_ids for ids, params in requests]
    d = Deployment(model=ModelSection(path=str(tiny_model))).with_shape(2, 3, 2)
    cluster = Cluster(replace(d, experts=replace(d.experts, replicas=2)))
    try:
        streams = [iter(cluster.submit(ids, params)) for ids, params in requests]
        firsts = [next(streams[0])]
        victim = cluster.experts[1]
        os.kill(ray.get(victim.pid.remote(), timeout=30), signal.SIGKILL)
        got = [[t.token_id for t in firsts + list(streams[0])]]
        got += [[t.token_id for t in s] for s in streams[1:]]
        assert got == want
        state = cluster.status()
        assert state.failed_steps == 0 and state.expert_failovers == 1
        # the node comes back and rejoins at a step boundary; the cluster stays exact
        deadline = time.monotonic() + 60
        while not all(n.healthy for n in cluster.status().nodes):
            assert time.monotonic() < deadline, "the killed expert node did not rejoin"
            assert [t.token_id for t in cluster.submit(*requests[0])] == want[0]
        before = {n.name: n.tokens for n in cluster.status().nodes}
        again = cluster.generate(requests[:8])
        assert [[t.token_id for t in out] for out in again] == want[:8]
        after = {n.name: n.tokens for n in cluster.status().nodes}
        assert after["expert-1"] > before["expert-1"]  # routed to its home experts again
        assert cluster.status().failed_steps == 0
    finally:
        cluster.shutdown()


@pytest.mark.parametrize(
    ("pool", "expert_nodes", "lane"),
    [
        ("experts", 2, "host"),
        ("attention", 2, "host"),
        ("attention", 0, "host"),
        ("experts", 2, "device"),
        ("attention", 2, "device"),
        ("experts", 2, "proxy"),
        ("attention", 2, "proxy"),
    ],
)
def test_a_killed_node_costs_no_request_and_no_token(
    pool: str, expert_nodes: int, lane: str, tiny_model: Path, ray_session
) -> None:
    """Expert nodes 0: colocated nodes, each with every expert; a dead one's requests
    re-prefill on the other. Device and proxy lanes: the restarted node's new slots are reached
    again."""
    ref = ReferenceEngine(tiny_model)
    requests = _requests(ref)
    want = [ref.generate(ids, params).token_ids for ids, params in requests]
    d = Deployment(model=ModelSection(path=str(tiny_model))).with_shape(2, expert_nodes, 2)
    d = replace(d, transport=replace(d.transport, lane=lane))
    cluster = Cluster(d)
    try:
        streams = [iter(cluster.submit(ids, params)) for ids, params in requests]
        firsts = [next(streams[0])]  # the streams are running
        victim = (cluster.experts if pool == "experts" else cluster.attention)[1]
        os.kill(ray.get(victim.pid.remote(), timeout=30), signal.SIGKILL)
        got = [[t.token_id for t in firsts + list(streams[0])]]
        got += [[t.token_id for t in s] for s in streams[1:]]
        assert got == want
        assert ray.get(victim.pid.remote(), timeout=60) > 0  # restarted and serving
    finally:
        cluster.shutdown()


def test_a_node_killed_as_the_loops_restart_costs_no_request(tiny_model: Path, ray_session) -> None:
    """Attention node 1 dies; as the cluster starts every loop again after recovering, node 0
    dies too (its start fails). The recovery starts over: every stream still gets its tokens."""
    ref = ReferenceEngine(tiny_model)
    requests = _requests(ref)[:12]
    want = [ref.generate(ids, params).token_ids for ids, params in requests]
    cluster = Cluster(Deployment(model=ModelSection(path=str(tiny_model))).with_shape(2, 2, 2))
    restart = cluster._run_cluster_from
    kills: list[int] = []

    def kill_first(step: int) -> None:
        if not kills:
            kills.append(ray.get(cluster.attention[0].pid.remote(), timeout=30))
            os.kill(kills[0], signal.SIGKILL)
        restart(step)

    cluster._run_cluster_from = kill_first  # type: ignore[method-assign]
    try:
        streams = [iter(cluster.submit(ids, params)) for ids, params in requests]
        firsts = [next(streams[0])]  # the streams are running
        os.kill(ray.get(cluster.attention[1].pid.remote(), timeout=30), signal.SIGKILL)
        got = [[t.token_id for t in firsts + list(streams[0])]]
        got += [[t.token_id for t in s] for s in streams[1:]]
        assert kills, "the loops never restarted"
        assert got == want
        assert cluster.failed_steps >= 2  # the second kill was a failure of its own
    finally:
        cluster.shutdown()


def test_a_node_that_cannot_come_back_fails_requests_with_a_message(
    tiny_model: Path, ray_session
) -> None:
    from dataclasses import replace

    from afd.orchestrator.cluster import RequestFailed

    d = Deployment(model=ModelSection(path=str(tiny_model))).with_shape(1, 1, 1)
    d = replace(d, ray=replace(d.ray, max_restarts=0))
    cluster = Cluster(d)
    try:
        params = SamplingParams(max_tokens=400, ignore_eos=True)
        stream = iter(cluster.submit([1, 2, 3], params))
        next(stream)
        os.kill(ray.get(cluster.experts[0].pid.remote(), timeout=30), signal.SIGKILL)
        with pytest.raises(RequestFailed, match="could not recover from the failure of step"):
            list(stream)
    finally:
        cluster.shutdown()


def test_a_short_soak_with_node_kills_loses_nothing(
    tiny_model: Path, ray_session, capsys: pytest.CaptureFixture
) -> None:
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[2] / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak", path)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    argv = [
        "--duration",
        "10",
        "--rate",
        "6",
        "--kill-every",
        "4",
        "--model",
        str(tiny_model),
        "--json",
    ]
    assert soak.main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["sent"] > 20 and report["kills"]
    assert report["lost"] == 0 and report["leaked_kv_blocks"] == 0
    assert set(report["failed"]) <= {"DEADLINE_EXCEEDED"}  # only the deadlines it set itself
    assert (
        report["completed"] + report["cancelled"] + sum(report["failed"].values()) == report["sent"]
    )
