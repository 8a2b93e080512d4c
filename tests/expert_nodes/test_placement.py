from __future__ import annotations

import pytest

from models.placement import ExpertPlacement, PlacementError


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
    with pytest.raises(PlacementError, match=r"missing \[3\], repeated or unknown \[1\]"):
        ExpertPlacement.explicit(4, [[0, 1], [1, 2]])
    with pytest.raises(PlacementError, match="between 1 and 4"):
        ExpertPlacement.even(4, 5)
