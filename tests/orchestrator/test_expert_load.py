"""The expert load window on hand-computed counts."""

from __future__ import annotations

import numpy as np
import pytest
from afd.orchestrator.expert_load import ExpertLoadWindow


def test_the_window_sums_the_last_steps_by_expert_and_node() -> None:
    # two MoE layers (1 and 3), four experts on two nodes, a window of two steps
    w = ExpertLoadWindow([1, 3], 4, [[[0, 1], [2, 3]]], steps=2)
    w.add(0, [[1, 2], [0, 0]])
    w.add(1, [[3, 0], [4, 4]])
    w.add(0, [[5, 0], [2, 2]])
    w.add(1, [[0, 0], [0, 0]])
    assert w.expert_tokens().tolist() == [[6, 2, 3, 0], [2, 2, 4, 4]]
    assert w.node_tokens().tolist() == [[8, 3], [4, 8]]
    assert w.imbalance() == pytest.approx([8 / 5.5, 8 / 6])
    w.add(0, [[0, 0], [0, 0]])  # node 0's first step leaves the window
    w.add(1, [[0, 0], [0, 0]])  # and node 1's
    assert w.node_tokens().tolist() == [[5, 0], [4, 0]]
    assert w.imbalance() == pytest.approx([2.0, 2.0])
    layers = w.layers()
    assert [x.layer for x in layers] == [1, 3]
    assert layers[0].expert_tokens == (5, 0, 0, 0) and layers[1].node_tokens == (4, 0)


def test_an_empty_window_is_balanced_and_a_zero_step_window_is_refused() -> None:
    w = ExpertLoadWindow([0], 2, [[[0], [1]]], steps=4)
    assert np.array_equal(w.imbalance(), [1.0])
    with pytest.raises(ValueError, match="at least one step"):
        ExpertLoadWindow([0], 2, [[[0], [1]]], steps=0)


def test_layers_placed_their_own_way_count_their_own_experts() -> None:
    # layer 0: node 0 holds 0, 1 and node 1 holds 2; layer 1: node 0 holds 2, node 1 holds 0, 1
    w = ExpertLoadWindow([0, 1], 3, [[[0, 1], [2]], [[2], [0, 1]]], steps=8)
    w.add(0, [[3, 4], [5]])
    w.add(1, [[6], [7, 8]])
    assert w.expert_tokens().tolist() == [[3, 4, 6], [7, 8, 5]]
    assert w.node_tokens().tolist() == [[7, 6], [5, 15]]
