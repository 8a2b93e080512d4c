from __future__ import annotations

import pytest
from afd.models.expert_placement import ExpertPlacement, ExpertPlacementError


def test_even_split_gives_the_first_nodes_the_remainder() -> None:
    assert ExpertPlacement.even(8, 3).assignment == ((0, 1, 2), (3, 4, 5), (6, 7))
    node_of, local_of = ExpertPlacement.even(8, 3).tables()
    assert node_of.tolist() == [0, 0, 0, 1, 1, 1, 2, 2] and local_of.tolist() == [
        0,
        1,
        2,
        0,
        1,
        2,
        0,
        1,
    ]


def test_explicit_assignment_must_cover_each_expert_once() -> None:
    assert ExpertPlacement.explicit(4, [[3, 0], [1, 2]]).assignment == ((0, 3), (1, 2))
    with pytest.raises(ExpertPlacementError, match=r"wrong count \[1, 3\], unknown \[\]"):
        ExpertPlacement.explicit(4, [[0, 1], [1, 2]])
    with pytest.raises(ExpertPlacementError, match=r"unknown \[7\], repeated within a node \[0\]"):
        ExpertPlacement.explicit(4, [[0, 0, 1, 7], [2, 3]])
    with pytest.raises(ExpertPlacementError, match="between 1 and 4"):
        ExpertPlacement.even(4, 5)


def test_replicas_put_each_expert_on_distinct_nodes_and_prefer_its_home() -> None:
    p = ExpertPlacement.even(8, 3, replicas=2)
    assert p.assignment == ((0, 1, 2, 6, 7), (3, 4, 5, 0, 1, 2), (6, 7, 3, 4, 5))
    node_of, local_of = p.tables()
    assert node_of.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert local_of.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    node_of, local_of = p.tables(dead={1})  # node 1's experts 3-5 move to node 2
    assert node_of.tolist() == [0, 0, 0, 2, 2, 2, 2, 2]
    assert local_of.tolist() == [0, 1, 2, 2, 3, 4, 0, 1]
    assert p.covers({1}) and not p.covers({0, 1})
    with pytest.raises(ExpertPlacementError, match=r"experts \[0, 1, 2\] have no live node"):
        p.tables(dead={0, 1})
    with pytest.raises(ExpertPlacementError, match="replicas must be between 1 and 3"):
        ExpertPlacement.even(8, 3, replicas=4)


def test_explicit_replicas_must_hold_each_expert_that_many_times() -> None:
    p = ExpertPlacement.explicit(4, [[0, 1, 2, 3], [2, 3, 0, 1]], replicas=2)
    assert p.tables()[0].tolist() == [0, 0, 1, 1]
    with pytest.raises(ExpertPlacementError, match=r"exactly 2 node\(s\); wrong count \[3\]"):
        ExpertPlacement.explicit(4, [[0, 1, 2, 3], [2, 0, 1]], replicas=2)
