"""The one place where a deployment becomes the settings of its nodes.

Nodes cannot import the deployment (arrows point down), so each node kind's settings are built
here, by keyword, from the sections that define them; the transport's come from the deployment's
`transport` section, which extends `TransportSettings`.
"""

from __future__ import annotations

from afd.attention_nodes.node import AttentionNodeSettings
from afd.expert_nodes.node import ExpertNodeSettings
from afd.orchestrator.config import Deployment

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
    )


def expert_node_settings(
    d: Deployment, index: int, expert_ids: tuple[int, ...], serve_failovers: bool
) -> ExpertNodeSettings:
    return ExpertNodeSettings(
        node_id=EXPERT_PEER_BASE + index,
        model_dir=d.model.path,
        expert_ids=expert_ids,
        dtype=d.model.dtype,
        load_format=d.model.load_format,
        quantization=d.model.quantization,
        micro_batches=d.pipeline.micro_batches,
        round_timeout_s=d.transport.round_timeout_s,
        transport=d.transport.settings(),
        device=d.experts.device,
        serve_failovers=serve_failovers,
    )
