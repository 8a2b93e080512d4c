from __future__ import annotations

from pathlib import Path

import pytest
from afd.orchestrator.config import Deployment, DeploymentError, ModelSection, load_deployment

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_tiny_cpu_config_loads() -> None:
    d = load_deployment(ROOT / "configs/tiny-cpu.yaml")
    assert (d.attention.nodes, d.experts.nodes, d.pipeline.micro_batches) == (2, 2, 2)
    assert not d.experts.rebalance.enabled and d.experts.rebalance.every_steps == 64


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: {path: m}\nattention: {nodez: 2}\n", "unknown field 'attention.nodez'"),
        (
            "model: {path: m}\nattention: {nodes: two}\n",
            "field 'attention.nodes' must be int, got 'two'",
        ),
        (
            "model: {path: m}\npipeline: {micro_batches: 0}\n",
            "field 'pipeline.micro_batches' must be between 1 and 16",
        ),
        ("model: {path: m, dtype: float8}\n", "field 'model.dtype' must be one of"),
        (
            "model: {path: m, quantization: int4}\n",
            "field 'model.quantization' must be none or fp8",
        ),
        ("attention: {nodes: 1}\n", "field 'model.path' must be a model directory"),
        (
            "model: {path: m}\nexperts: {nodes: 2, assignment: [[0, 1]]}\n",
            "lists 1 nodes but 'experts.nodes' is 2",
        ),
        (
            "model: {path: m}\ntransport: {lane: fast}\n",
            "field 'transport.lane' must be host, device or proxy",
        ),
        (
            "model: {path: m}\nexperts: {nodes: 2, replicas: 2}\ntransport: {lane: device}\n",
            "field 'transport.lane' must be host with experts.nodes 0",
        ),
        (
            "model: {path: m}\nexperts: {nodes: 0}\ntransport: {lane: device}\n",
            "field 'transport.lane' must be host with experts.nodes 0",
        ),
        (
            "model: {path: m}\nexperts: {nodes: 2, replicas: 2}\ntransport: {lane: proxy}\n",
            "field 'transport.lane' must be host with experts.nodes 0",
        ),
        (
            "model: {path: m}\ntransport: {dispatch_dtype: int8}\n",
            "field 'transport.dispatch_dtype' must be model or fp8",
        ),
        (
            "model: {path: m}\nexperts: {nodes: 1}\ntransport: {lane: device, dispatch_dtype: fp8}\n",
            "field 'transport.dispatch_dtype' must be model on the device and proxy lanes",
        ),
        (
            "model: {path: m}\nexperts: {nodes: 1}\ntransport: {lane: proxy, dispatch_dtype: fp8}\n",
            "field 'transport.dispatch_dtype' must be model on the device and proxy lanes",
        ),
        (
            "model: {path: m}\nexperts: {nodes: 2, rebalance: {threshold: 0.5}}\n",
            "field 'experts.rebalance.threshold' must be >= 1.0",
        ),
        (
            "model: {path: m}\nexperts: {nodes: 2, rebalance: {every_step: 8}}\n",
            "unknown field 'experts.rebalance.every_step'",
        ),
        (
            "model: {path: m}\nexperts: {nodes: 1, rebalance: {enabled: true}}\n",
            "field 'experts.rebalance.enabled' must be false with fewer than 2 expert nodes",
        ),
        (
            "model: {path: m}\nexperts: {nodes: 2, redundant_slots: -1}\n",
            "field 'experts.redundant_slots' must be >= 0",
        ),
        ("model: [1, 2]\n", "'model' must be a mapping"),
        ("model: {path: m\n", "not valid YAML"),
    ],
)
def test_bad_config_names_the_field(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(text)
    with pytest.raises(DeploymentError, match=message):
        load_deployment(path)


def test_command_line_overrides_are_checked_too(tmp_path: Path) -> None:
    d = load_deployment(ROOT / "configs/tiny-cpu.yaml")
    assert d.with_shape(3, 1, 2).attention.nodes == 3
    with pytest.raises(DeploymentError, match="command line: field 'experts.nodes' must be >= 0"):
        d.with_shape(None, -1, None)
    with pytest.raises(DeploymentError, match="command line: field 'attention.nodes' must be >= 1"):
        d.with_shape(0, None, None)
    assert d.with_shape(None, 0, None).experts.nodes == 0  # colocated


def test_a_bad_placement_file_is_named(tiny_model: Path, tmp_path: Path) -> None:
    import json
    from dataclasses import replace

    from afd.models.config import load_config
    from afd.orchestrator.node_settings import expert_placement

    config = load_config(tiny_model)
    base = Deployment(model=ModelSection(path=str(tiny_model))).with_shape(1, 2, 1)
    plan = tmp_path / "plan.json"
    for text, message in [
        (json.dumps({"layers": [{"layer": 1, "assignment": [[0, 1, 2], [4, 5, 6, 7]]}]}),
         r"layer 1: expert assignment .* too few holders \[3\]"),
        (json.dumps({"layers": [{"layer": 9, "assignment": [[0], [1]]}]}), r"layers \[9\] are not MoE"),
        (json.dumps({"assignment": [list(range(8))]}), "it lists 1 nodes, not 2"),
        ("{not json", "Expecting property name"),
    ]:  # fmt: skip
        plan.write_text(text)
        d = replace(base, experts=replace(base.experts, placement_file=str(plan)))
        with pytest.raises(DeploymentError, match=f"experts.placement_file {plan}: .*{message}"):
            expert_placement(d, config)
    plan.write_text(
        json.dumps({"layers": [{"layer": 1, "assignment": [[0, 1, 2, 3, 0], [0, 4, 5, 6, 7]]}]})
    )
    with pytest.raises(DeploymentError, match="repeated within a node"):
        expert_placement(
            replace(base, experts=replace(base.experts, placement_file=str(plan))), config
        )
