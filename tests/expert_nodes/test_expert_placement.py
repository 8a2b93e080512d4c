from __future__ import annotations

import pytest
from afd.models.expert_placement import ExpertPlacement, ExpertPlacementError


def test_even_split_gives_the_first_nodes_the_remainder() -> None:
    p = ExpertPlacement.even(8, 3)
    assert p.assignment == ((0, 1, 2), (3, 4, 5), (6, 7))
    node_EH, local_EH, count_E = p.holders()
    assert node_EH[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert local_EH[:, 0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert count_E.tolist() == [1] * 8


def test_explicit_assignment_must_hold_each_expert_and_may_replicate_hot_ones() -> None:
    assert ExpertPlacement.explicit(4, [[3, 0], [1, 2]]).assignment == ((0, 3), (1, 2))
    hot = ExpertPlacement.explicit(4, [[0, 1], [0, 2, 3]])  # expert 0 on both nodes
    node_EH, local_EH, count_E = hot.holders()
    assert count_E.tolist() == [2, 1, 1, 1]
    assert node_EH[0].tolist() == [0, 1] and local_EH[0].tolist() == [0, 0]
    assert node_EH[3].tolist() == [1, -1] and local_EH[3].tolist() == [2, -1]
    with pytest.raises(ExpertPlacementError, match=r"too few holders \[3\], unknown \[\]"):
        ExpertPlacement.explicit(4, [[0, 1], [1, 2]])
    with pytest.raises(ExpertPlacementError, match=r"unknown \[7\], repeated within a node \[0\]"):
        ExpertPlacement.explicit(4, [[0, 0, 1, 7], [2, 3]])
    with pytest.raises(ExpertPlacementError, match="between 1 and 4"):
        ExpertPlacement.even(4, 5)


def test_replicas_put_each_expert_on_distinct_nodes_and_share_its_load() -> None:
    p = ExpertPlacement.even(8, 3, replicas=2)
    assert p.assignment == ((0, 1, 2, 6, 7), (3, 4, 5, 0, 1, 2), (6, 7, 3, 4, 5))
    node_EH, local_EH, count_E = p.holders()
    assert count_E.tolist() == [2] * 8
    assert node_EH[0].tolist() == [0, 1] and local_EH[0].tolist() == [0, 3]
    node_EH, local_EH, count_E = p.holders(dead={1})  # experts 3-5 keep only node 2
    assert node_EH[3:6, 0].tolist() == [2, 2, 2] and local_EH[3:6, 0].tolist() == [2, 3, 4]
    assert count_E.tolist() == [1, 1, 1, 1, 1, 1, 2, 2]  # 6 and 7 still on nodes 0 and 2
    assert p.covers({1}) and not p.covers({0, 1})
    with pytest.raises(ExpertPlacementError, match=r"experts \[0, 1, 2\] have no live node"):
        p.holders(dead={0, 1})
    with pytest.raises(ExpertPlacementError, match="replicas must be between 1 and 3"):
        ExpertPlacement.even(8, 3, replicas=4)


def test_explicit_replicas_must_hold_each_expert_at_least_that_many_times() -> None:
    p = ExpertPlacement.explicit(4, [[0, 1, 2, 3], [2, 3, 0, 1]], replicas=2)
    assert p.holders()[2].tolist() == [2, 2, 2, 2]
    with pytest.raises(ExpertPlacementError, match=r"at least 2 node\(s\); too few holders \[3\]"):
        ExpertPlacement.explicit(4, [[0, 1, 2, 3], [2, 0, 1]], replicas=2)
