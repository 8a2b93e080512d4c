"""An expert node sent malformed dispatch or control frames through a real transport: each ends
that step with an error naming the peer, and the node goes on serving."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from afd.expert_nodes.node import ExpertNode, ExpertNodeSettings
from afd.models.config import load_config
from afd.transport.endpoint import Transport, TransportError
from afd.transport.step_control import control_frame
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


def _open(attention: Transport, step: int) -> None:
    """Opens `step` as an attention node of one micro-batch does, and takes the node's call."""
    attention.send(1000, RoundKey.control(step), control_frame([2], False)).result(TIMEOUT_S)
    assert attention.recv(1000, RoundKey.control(step), TIMEOUT_S) == []


def _connected(node: ExpertNode) -> Transport:
    """Attention node 4's transport, connected to `node` as the orchestrator wires them."""
    attention = Transport(4)
    waiting = threading.Thread(target=node.wait_for_attention_nodes, args=([4], TIMEOUT_S))
    waiting.start()
    attention.connect(1000, node.address())
    waiting.join(TIMEOUT_S)
    return attention


def _rejected(node: ExpertNode, attention: Transport, step: int, frame: list) -> str:
    """What ends `step` when its first exchange brings `frame`."""
    errors: list[BaseException] = []
    thread = _step(node, step, errors)
    _open(attention, step)
    layer = node.config.moe_layers[0]
    attention.send(1000, RoundKey.exchange(step, layer, 0), frame).result(TIMEOUT_S)
    thread.join(TIMEOUT_S)
    assert len(errors) == 1 and isinstance(errors[0], TransportError), errors
    return str(errors[0])


def _answered(node: ExpertNode, attention: Transport, step: int, frame: list) -> torch.Tensor:
    """Every MoE layer of `step` sends `frame`; the last layer's answer."""
    errors: list[BaseException] = []
    thread = _step(node, step, errors)
    _open(attention, step)
    for moe_layer in node.config.moe_layers:
        key = RoundKey.exchange(step, moe_layer, 0)
        attention.send(1000, key, frame).result(TIMEOUT_S)
        (y,) = attention.recv(1000, key, TIMEOUT_S)
    thread.join(TIMEOUT_S)
    assert errors == []
    return y


def test_malformed_dispatch_frames_are_rejected_naming_the_peer(tiny_model: Path) -> None:
    config = load_config(tiny_model)
    node = ExpertNode(ExpertNodeSettings(1000, str(tiny_model), (0, 1, 2)))
    attention = _connected(node)
    try:
        x, w = torch.zeros(2, config.hidden_size), torch.zeros(2, config.top_k)
        ids = torch.tensor([[0, -1], [2, 1]], dtype=torch.int16)
        bad_frames = [
            [x, torch.tensor([[0, 3], [1, 2]], dtype=torch.int16), w],  # local id 3 of 3 experts
            [torch.zeros(2, config.hidden_size - 1), ids, w],  # wrong hidden size
            [x, ids],  # a tensor missing
            [x, ids.float(), w],  # ids must be integers
        ]
        for step, frame in enumerate(bad_frames):
            assert "malformed dispatch frame from peer 4" in _rejected(node, attention, step, frame)
        # a well-formed frame is still answered with the partial sums of its two tokens
        step = len(bad_frames)
        assert _answered(node, attention, step, [x, ids, w]).shape == x.shape
        errors: list[BaseException] = []
        for bad in ([torch.tensor([2, 0, 1])], [torch.tensor([-1, 0])], [torch.tensor([1.0, 0])]):
            step += 1
            thread = _step(node, step, errors)
            attention.send(1000, RoundKey.control(step), bad).result(TIMEOUT_S)
            thread.join(TIMEOUT_S)
            assert "bad control frame" in str(errors.pop()) and not errors
    finally:
        attention.close()
        node.shutdown()


def test_a_rebalance_stages_new_experts_then_switches_layers_it_changes(tiny_model: Path) -> None:
    """Staged while serving, switched at a boundary: the node's layer then computes exactly what
    a node loaded with the new experts computes; a restarted node (nothing staged) gets there
    by the same call."""
    from afd.models.checkpoint import open_checkpoint
    from afd.models.moe import ExpertShard

    config = load_config(tiny_model)
    first, second = config.moe_layers[0], config.moe_layers[-1]
    node = ExpertNode(ExpertNodeSettings(1000, str(tiny_model), (0, 1, 2)))
    try:
        assert node.stage_experts(1, {first: (1, 4, 6)}) == 2  # 4 and 6 are new here
        assert node.shard.ids_at(first) == (0, 1, 2)  # nothing switched while it serves
        node.hold_experts(1, {first: (1, 4, 6), second: (0, 1, 2)})
        assert node.held_experts()[first] == (1, 4, 6) and node.placement_version == 1
        assert node.held_experts()[second] == (0, 1, 2)
        node.hold_experts(2, {second: (5, 0)})  # not staged: loaded at the switch
        fresh = ExpertShard.load(
            open_checkpoint(tiny_model),
            config,
            (0, 1, 2),
            torch.float32,
            layer_ids={first: (1, 4, 6), second: (5, 0)},
        )
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, config.hidden_size, generator=g)
        weights = torch.rand(5, config.top_k, generator=g)
        for layer, width in ((first, 3), (second, 2)):
            ids = torch.randint(-1, width, (5, config.top_k), generator=g)
            torch.testing.assert_close(
                node.shard.forward(layer, x, ids, weights),
                fresh.forward(layer, x, ids, weights),
                rtol=0,
                atol=0,
            )
        node.hold_experts(2, {second: (3,)})  # the same version again: nothing happens
        assert node.held_experts()[second] == (5, 0)
        for bad, message in [
            ({10_000: (0,)}, "not MoE layers"),
            ({first: (0, 0)}, "empty or repeat"),
            ({first: (config.num_experts,)}, "do not exist"),
        ]:
            with pytest.raises(ValueError, match=message):
                node.hold_experts(3, bad)
    finally:
        node.shutdown()


def test_fp8_dispatch_frames_are_checked_and_answered(tiny_model: Path) -> None:
    """With fp8 dispatch a frame is the packed E4M3 rows and scales, ids and weights: scales
    that are not finite and positive, a packing of the wrong width, or rows in another dtype
    fail the step naming the peer; a good frame is answered in the model's dtype."""
    from afd.models.fp8 import pack_rows

    config = load_config(tiny_model)
    node = ExpertNode(ExpertNodeSettings(1000, str(tiny_model), (0, 1, 2), dispatch_fp8=True))
    attention = _connected(node)
    try:
        x, w = torch.randn(2, config.hidden_size), torch.rand(2, config.top_k)
        ids = torch.tensor([[0, -1], [2, 1]], dtype=torch.int16)
        packed = pack_rows(x)
        negative = packed.clone()
        negative[:, config.hidden_size + 3] |= 0x80  # the first scale's sign bit (little-endian)
        for step, frame in enumerate(
            [[negative, ids, w], [packed[:, :-4], ids, w], [x, ids, w], [packed, ids]]
        ):
            assert "malformed dispatch frame from peer 4" in _rejected(node, attention, step, frame)
        y = _answered(node, attention, 4, [packed, ids, w])
        assert y.shape == x.shape and y.dtype == torch.float32
    finally:
        attention.close()
        node.shutdown()
