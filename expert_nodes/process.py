"""An expert node in a plain process of its own, wired by its parent over a pipe: what the
benches and the GPU tests run beside an in-process attention node (no Ray needed).

The parent receives (address, dispatch-slot handle or None), sends the attention node ids,
then, on a slot lane, the attention nodes' combine-slot handles, then the step to start at
(a node started after a failure joins a running sequence). The node's own loop then runs that
step and every next one an attention node opens, as in a served cluster, until the parent
terminates it (or a step fails: the process then exits with the error). It takes ("trace",
count, first) from the parent (`ExpertNode.trace_steps`) and sends back ("spans", step, spans)
after each traced step.
"""

from __future__ import annotations

from multiprocessing.connection import Connection

from afd.expert_nodes.node import ExpertNode, ExpertNodeSettings
from afd.transport.lanes import SLOT_LANES

WIRE_TIMEOUT_S = 120.0
POLL_S = 0.05  # how long a look for finished steps waits


def serve(
    settings: ExpertNodeSettings, capacity: int, attention_peers: int, conn: Connection
) -> None:
    """`capacity`: rows per dispatch slot (the attention nodes' max_batch_tokens)."""
    node = ExpertNode(settings)
    peers = list(range(attention_peers))
    handle = node.open_lane(peers, capacity) if settings.lane in SLOT_LANES else None
    conn.send((node.address(), handle))
    node.wait_for_attention_nodes(conn.recv(), WIRE_TIMEOUT_S)
    if handle is not None:
        node.connect_lane(conn.recv())
    node.start_loop(conn.recv())
    while True:
        while conn.poll():
            kind, count, first = conn.recv()
            if kind != "trace":
                raise ValueError(f"expert process: unknown message {kind!r} from the parent")
            node.trace_steps(count, first)
        report = node.poll(POLL_S)
        for step, result in report.results:
            if result.trace:
                conn.send(("spans", step, result.trace))
        if report.state.error is not None:
            raise RuntimeError(f"expert process: {report.state.error}")
