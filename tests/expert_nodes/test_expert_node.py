from __future__ import annotations

from pathlib import Path

import pytest
import torch
from afd.expert_nodes.node import ExpertNode, ExpertNodeSettings
from afd.transport.endpoint import TransportError


def test_malformed_dispatch_frames_are_rejected_naming_the_peer(tiny_model: Path) -> None:
    node = ExpertNode(ExpertNodeSettings(1000, str(tiny_model), (0, 1, 2)))
    try:
        x, w = torch.zeros(2, 64), torch.zeros(2, 2)
        good = [x, torch.tensor([[0, -1], [2, 1]], dtype=torch.int16), w]
        assert node._checked(4, good) is good
        bad_frames = [
            [x, torch.tensor([[0, 3], [1, 2]], dtype=torch.int16), w],  # local id 3 of 3 experts
            [torch.zeros(2, 63), good[1], w],  # wrong hidden size
            [x, good[1]],  # a tensor missing
            [x, good[1].float(), w],  # ids must be integers
        ]
        for frame in bad_frames:
            with pytest.raises(TransportError, match="malformed dispatch frame from peer 4"):
                node._checked(4, frame)
    finally:
        node.shutdown()
