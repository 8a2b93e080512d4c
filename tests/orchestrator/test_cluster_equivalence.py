"""Every cluster shape gives the single-process reference's tokens (real Ray actors, real UCX).

CPU GEMMs round differently at different batch sizes, so logprobs are compared to 1e-5 (fp32);
token ids must be identical.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import ray
from afd.models.reference import ReferenceEngine
from afd.models.sampling import SamplingParams
from afd.orchestrator.cluster import Cluster
from afd.orchestrator.config import Deployment, ModelSection

SHAPES = [
    (1, 1, 1),
    (2, 2, 2),
    (2, 3, 3),
    (3, 2, 1),
    (2, 0, 2),  # colocated: every attention node holds its experts
]  # (attention nodes, expert nodes, micro-batches)
PROMPTS = [
    "Hello, world!",
    "The capital of France is",
    "Once upon a time there was a small model that learned to count",
    "def add(a, b):",
    "Water",
    "The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the warm afternoon sun.",
    "one two three",
    "Mixture-of-experts language models route every token",
]


def _requests(engine: ReferenceEngine) -> list[tuple[list[int], SamplingParams]]:
    out = []
    for i, text in enumerate(PROMPTS):
        sampled = i % 4 == 3
        params = SamplingParams(
            max_tokens=4 + 3 * i,
            ignore_eos=True,
            temperature=0.8 if sampled else 0.0,
            top_p=0.9,
            seed=100 + i,
        )
        out.append((engine.tokenizer.encode(text), params))
    return out


def _staggered(cluster: Cluster, requests: list[tuple[list[int], SamplingParams]]) -> list[list]:
    """Each request arrives after the previous one produced its first token: different steps."""
    iterators, firsts = [], []
    for ids, params in requests:
        iterators.append(iter(cluster.submit(ids, params)))
        firsts.append(next(iterators[-1]))
    return [[first, *rest] for first, rest in zip(firsts, iterators, strict=True)]


def _check(engine: ReferenceEngine, requests: list, outputs: list[list]) -> list:
    """Token ids equal the reference's, logprobs within 1e-5; the reference's generations."""
    wants = []
    for (ids, params), got in zip(requests, outputs, strict=True):
        want = engine.generate(ids, params)
        assert [o.token_id for o in got] == want.token_ids
        assert [o.logprob for o in got] == pytest.approx(want.logprobs, abs=1e-5)
        wants.append(want)
    return wants


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize(("attention_nodes", "expert_nodes", "micro_batches"), SHAPES)
def test_cluster_matches_reference(
    arch: str,
    attention_nodes: int,
    expert_nodes: int,
    micro_batches: int,
    tiny_models: dict[str, Path],
    ray_session,
) -> None:
    engine = ReferenceEngine(tiny_models[arch])
    requests = _requests(engine)
    deployment = Deployment(model=ModelSection(path=str(tiny_models[arch]))).with_shape(
        attention_nodes, expert_nodes, micro_batches
    )
    cluster = Cluster(deployment)
    try:
        outputs = _staggered(cluster, requests)
        if expert_nodes == 3:  # 8 experts over 3 nodes: 3, 3 and 2
            assert [len(a) for a in cluster.placement.assignment] == [3, 3, 2]
    finally:
        cluster.shutdown()
    for want, got in zip(_check(engine, requests, outputs), outputs, strict=True):
        assert "".join(o.text_delta for o in got) == want.text
        assert got[-1].finish_reason == want.finish_reason == "length"


@pytest.mark.parametrize(
    ("lane", "attention_nodes", "expert_nodes", "micro_batches"),
    [("device", 2, 2, 2), ("proxy", 2, 2, 2)],
)
def test_a_slot_lane_cluster_matches_reference(
    lane: str,
    attention_nodes: int,
    expert_nodes: int,
    micro_batches: int,
    tiny_models: dict[str, Path],
    ray_session,
) -> None:
    """Rows and sums through slots between the actors (host memory on CPU): shared on the
    device lane, moved by each actor's proxy thread over UCX on the proxy lane."""
    engine = ReferenceEngine(tiny_models["qwen3_moe"])
    requests = _requests(engine)
    deployment = Deployment(model=ModelSection(path=str(tiny_models["qwen3_moe"]))).with_shape(
        attention_nodes, expert_nodes, micro_batches
    )
    deployment = replace(deployment, transport=replace(deployment.transport, lane=lane))
    cluster = Cluster(deployment)
    try:
        assert ray.get(cluster.attention[0].lane_region.remote()) is not None
        outputs = _staggered(cluster, requests)
    finally:
        cluster.shutdown()
    _check(engine, requests, outputs)


def test_each_actor_loads_only_its_own_tensors(tiny_models: dict[str, Path], ray_session) -> None:
    model_dir = tiny_models["mixtral"]
    deployment = Deployment(model=ModelSection(path=str(model_dir))).with_shape(2, 3, 2)
    cluster = Cluster(deployment)
    try:
        loaded = cluster.loaded_tensor_names()
        engine = ReferenceEngine(model_dir)
        ids = engine.tokenizer.encode("Hello")
        out = cluster.generate([(ids, SamplingParams(max_tokens=5))])[0]
        assert [o.token_id for o in out] == engine.generate(
            ids, SamplingParams(max_tokens=5)
        ).token_ids
        assignment = cluster.placement.assignment
    finally:
        cluster.shutdown()
    all_names = set().union(*loaded.values())
    for label, names in loaded.items():
        assert len(names) == len(set(names)), f"{label} read a tensor twice"
        assert set(names) != all_names, f"{label} holds the whole model"
        experts = {n for n in names if ".experts." in n}
        if label.startswith("attention"):
            assert not experts and any("self_attn" in n for n in names)
        else:
            j = int(label.split("-")[1])
            held = {int(n.split(".experts.")[1].split(".")[0]) for n in experts}
            assert held == set(assignment[j]) and experts == set(names)


def test_a_planned_placement_per_layer_serves_the_reference_tokens(
    tiny_models: dict[str, Path], ray_session, tmp_path: Path
) -> None:
    """`experts.placement_file` from `afd plan-experts --out`: each layer placed its own way
    (replicas of hot experts included); the actors load those experts and give the
    reference's tokens, and ClusterStatus counts each layer on the nodes that hold it."""
    import json
    from dataclasses import replace

    model_dir = tiny_models["qwen3_moe"]
    plan = {"layers": [
        {"layer": 0, "assignment": [[0, 1, 2, 3, 4], [0, 5, 6, 7]]},
        {"layer": 1, "assignment": [[4, 5, 6, 7, 1], [0, 1, 2, 3]]},
    ]}  # fmt: skip
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    base = Deployment(model=ModelSection(path=str(model_dir))).with_shape(1, 2, 2)
    deployment = replace(base, experts=replace(base.experts, placement_file=str(path)))
    engine = ReferenceEngine(model_dir)
    requests = _requests(engine)[:4]
    cluster = Cluster(deployment)
    try:
        outputs = _staggered(cluster, requests)
        loaded = cluster.loaded_tensor_names()
        layers = cluster.status().layer_loads
    finally:
        cluster.shutdown()
    for (ids, params), got in zip(requests, outputs, strict=True):
        assert [o.token_id for o in got] == engine.generate(ids, params).token_ids
    for j in range(2):
        for layer in range(2):
            prefix = f"model.layers.{layer}.mlp.experts."
            held = {
                int(n[len(prefix) :].split(".")[0])
                for n in loaded[f"expert-{j}"]
                if n.startswith(prefix)
            }
            assert held == set(plan["layers"][layer]["assignment"][j])
    assert [x.layer for x in layers] == [0, 1]
    assert sum(layers[0].expert_tokens) == sum(layers[1].expert_tokens) > 0
