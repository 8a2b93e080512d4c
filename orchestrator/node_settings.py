"""The one place where a deployment becomes the settings of its nodes.

Nodes cannot import the deployment (arrows point down), so each node kind's settings are built
here, by keyword, from the sections that define them; the transport's come from the deployment's
`transport` section, which extends `TransportSettings`.
"""

from __future__ import annotations

import json
from pathlib import Path

from afd.attention_nodes.node import AttentionNodeSettings
from afd.expert_nodes.node import ExpertNodeSettings
from afd.models.config import ModelConfig
from afd.models.expert_placement import ExpertPlacement, ExpertPlacementError
from afd.orchestrator.config import Deployment, DeploymentError

EXPERT_PEER_BASE = 1000  # transport ids: attention nodes 0..M-1, expert nodes 1000..1000+N-1


def attention_node_settings(d: Deployment, index: int) -> AttentionNodeSettings:
    a = d.attention
    return AttentionNodeSettings(
        node_id=index,
        model_dir=d.model.path,
        dtype=d.model.dtype,
        load_format=d.model.load_format,
        quantization=d.model.quantization,
        micro_batches=d.pipeline.micro_batches,
        kv_blocks=a.kv_blocks,
        block_size=a.block_size,
        max_batch_tokens=a.max_batch_tokens,
        max_running=a.max_running,
        round_timeout_s=d.transport.round_timeout_s,
        transport=d.transport.settings(),
        device=a.device,
        cuda_graphs=a.cuda_graphs,
        cuda_graph_context=a.cuda_graph_context,
        decode_ahead=a.decode_ahead,
        lane=d.transport.lane if d.experts.nodes else "host",
        dispatch_fp8=d.transport.dispatch_dtype == "fp8",
    )


def expert_node_settings(
    d: Deployment, index: int, placement: ExpertPlacement, serve_failovers: bool
) -> ExpertNodeSettings:
    return ExpertNodeSettings(
        node_id=EXPERT_PEER_BASE + index,
        model_dir=d.model.path,
        expert_ids=placement.assignment[index],
        layer_expert_ids=placement.node_layers(index),
        dtype=d.model.dtype,
        load_format=d.model.load_format,
        quantization=d.model.quantization,
        micro_batches=d.pipeline.micro_batches,
        round_timeout_s=d.transport.round_timeout_s,
        transport=d.transport.settings(),
        device=d.experts.device,
        serve_failovers=serve_failovers,
        lane=d.transport.lane,
        dispatch_fp8=d.transport.dispatch_dtype == "fp8",
    )


def expert_placement(d: Deployment, config: ModelConfig) -> ExpertPlacement | None:
    """The deployment's expert placement (None: colocated): even ranges, an explicit
    `experts.assignment`, or a plan file from `afd plan-experts --out` — a placement for every
    layer (`assignment`, with `--all-layers`) or one per MoE layer (`layers`), on top of the
    even split for the layers it does not name."""
    e = d.experts
    if e.nodes == 0:
        return None
    if e.assignment is not None:
        return ExpertPlacement.explicit(config.num_experts, e.assignment, e.replicas)
    placement = ExpertPlacement.even(config.num_experts, e.nodes, e.replicas)
    if e.placement_file is None:
        return placement
    try:
        plan = json.loads(Path(e.placement_file).read_text())
        if "assignment" in plan:
            placement = ExpertPlacement.explicit(config.num_experts, plan["assignment"], e.replicas)
            if placement.num_nodes != e.nodes:
                raise ExpertPlacementError(f"it lists {placement.num_nodes} nodes, not {e.nodes}")
            return placement
        per_layer = {int(x["layer"]): x["assignment"] for x in plan["layers"]}
        unknown = sorted(set(per_layer) - set(config.moe_layers))
        if unknown:
            raise ExpertPlacementError(f"layers {unknown} are not MoE layers of the model")
        return placement.with_layers(per_layer)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DeploymentError(f"experts.placement_file {e.placement_file}: {err}") from err
