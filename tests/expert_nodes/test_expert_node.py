"""An expert node sent malformed dispatch frames through a real transport: each ends that step
with an error naming the peer, and the node goes on serving."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from afd.expert_nodes.node import ExpertNode, ExpertNodeSettings
from afd.models.config import load_config
from afd.transport.endpoint import Transport, TransportError
from afd.transport.wire import RoundKey

TIMEOUT_S = 30.0


def _step(node: ExpertNode, step: int, errors: list[BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            node.run_step(step)
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_malformed_dispatch_frames_are_rejected_naming_the_peer(tiny_model: Path) -> None:
    config = load_config(tiny_model)
    node = ExpertNode(ExpertNodeSettings(1000, str(tiny_model), (0, 1, 2)))
    attention = Transport(4)
    try:
        waiting = threading.Thread(target=node.wait_for_attention_nodes, args=([4], TIMEOUT_S))
        waiting.start()
        attention.connect(1000, node.address())
        waiting.join(TIMEOUT_S)
        x, w = torch.zeros(2, config.hidden_size), torch.zeros(2, config.top_k)
        ids = torch.tensor([[0, -1], [2, 1]], dtype=torch.int16)
        bad_frames = [
            [x, torch.tensor([[0, 3], [1, 2]], dtype=torch.int16), w],  # local id 3 of 3 experts
            [torch.zeros(2, config.hidden_size - 1), ids, w],  # wrong hidden size
            [x, ids],  # a tensor missing
            [x, ids.float(), w],  # ids must be integers
        ]
        layer = config.moe_layers[0]
        for step, frame in enumerate(bad_frames):
            errors: list[BaseException] = []
            thread = _step(node, step, errors)
            attention.send(1000, RoundKey.exchange(step, layer, 0), frame).result(TIMEOUT_S)
            thread.join(TIMEOUT_S)
            assert len(errors) == 1 and isinstance(errors[0], TransportError), errors
            assert "malformed dispatch frame from peer 4" in str(errors[0])
        # a well-formed frame is still answered with the partial sums of its two tokens
        step = len(bad_frames)
        errors = []
        thread = _step(node, step, errors)
        for moe_layer in config.moe_layers:
            key = RoundKey.exchange(step, moe_layer, 0)
            attention.send(1000, key, [x, ids, w]).result(TIMEOUT_S)
            (y,) = attention.recv(1000, key, TIMEOUT_S)
            assert y.shape == x.shape
        thread.join(TIMEOUT_S)
        assert errors == []
    finally:
        attention.close()
        node.shutdown()
