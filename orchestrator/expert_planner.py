"""Plans where experts go, one MoE layer at a time, from measured load: replicate the hottest
experts into the spare slots, then pack the copies so nodes carry equal load, preferring to
keep experts that tokens choose together on one node when the load allows.

An expert-parallel step waits for its busiest node, so the first score is the expected
imbalance, max/mean node load (a replicated expert's tokens split evenly over its holders).
Each node a token visits costs a message, so the second is the expected number of nodes per
token, measured on sampled top-k sets when there are any (each expert of a set served by a
holder the token already visits when one exists). Used offline by `afd plan-experts`.

Shape legend: E = experts, N = nodes, S = slots per node (base + redundant).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class LayerPlan:
    assignment: tuple[tuple[int, ...], ...]  # node -> expert ids it holds
    imbalance: float  # expected max/mean node load
    nodes_per_token: float | None  # over the sampled top-k sets; None without samples


def even_assignment(experts: int, nodes: int) -> tuple[tuple[int, ...], ...]:
    """Today's placement: contiguous, even ranges, no replicas."""
    bounds = np.linspace(0, experts, nodes + 1).round().astype(int)
    return tuple(tuple(range(bounds[j], bounds[j + 1])) for j in range(nodes))


def score(
    assignment: Sequence[Sequence[int]],
    load_E: np.ndarray,
    samples: Sequence[Sequence[int]] = (),
) -> tuple[float, float | None]:
    """(expected imbalance, expected nodes per token) of an assignment."""
    holders: dict[int, list[int]] = {}
    for node, ids in enumerate(assignment):
        for e in ids:
            holders.setdefault(e, []).append(node)
    node_load = np.zeros(len(assignment))
    for e, nodes in holders.items():
        node_load[nodes] += load_E[e] / len(nodes)
    mean = node_load.mean()
    imbalance = float(node_load.max() / mean) if mean > 0 else 1.0
    if not samples:
        return imbalance, None
    visits = []
    for chosen in samples:
        used: set[int] = set()
        for e in sorted(chosen, key=lambda e: len(holders[e])):  # fewest holders first
            if not used.intersection(holders[e]):
                used.add(min(holders[e], key=lambda n: node_load[n]))
        visits.append(len(used))
    return imbalance, float(np.mean(visits))


def plan_layer(
    load_E: Sequence[float],
    nodes: int,
    redundant_slots: int,
    samples: Sequence[Sequence[int]] = (),
    slack: float = 0.1,
    replicas: int = 1,
) -> LayerPlan:
    """A placement of E experts, each on at least `replicas` nodes (failover), plus copies of
    hot ones, on `nodes` nodes of ⌈E·replicas/N⌉ + `redundant_slots` slots each. `samples`:
    top-k sets of sampled tokens (co-activation); `slack`: how far above the mean a node's load
    may go to keep a co-chosen expert beside its partners."""
    load = np.asarray(load_E, dtype=np.float64)
    E = len(load)
    if nodes < 1 or redundant_slots < 0 or not 1 <= replicas <= nodes:
        raise ValueError(
            f"need at least 1 node, redundant_slots >= 0 and 1 <= replicas <= nodes, got "
            f"{nodes}, {redundant_slots}, {replicas}"
        )
    slots = -(-E * replicas // nodes) + redundant_slots
    copies = np.full(E, replicas, dtype=np.int64)
    for _ in range(nodes * slots - E * replicas):  # the hottest per-copy load: the next spare
        per_copy = np.where(copies < nodes, load / copies, -1.0)
        hottest = int(per_copy.argmax())
        if per_copy[hottest] <= 0:
            break
        copies[hottest] += 1
    together = np.zeros((E, E))
    for chosen in samples:
        ids = list(chosen)
        for i in ids:
            for j in ids:
                if i != j:
                    together[i, j] += 1
    items = sorted(
        ((load[e] / copies[e], e) for e in range(E) for _ in range(copies[e])),
        key=lambda x: (-x[0], x[1]),
    )
    held: list[list[int]] = [[] for _ in range(nodes)]
    node_load = np.zeros(nodes)
    cap = load.sum() / nodes * (1 + slack)
    for weight, e in items:
        free = [n for n in range(nodes) if len(held[n]) < slots and e not in held[n]]
        within = [n for n in free if node_load[n] + weight <= cap]
        if within and samples:  # beside its partners, while the load allows
            node = max(
                within, key=lambda n: (sum(together[e, x] for x in held[n]), -node_load[n], -n)
            )
        else:
            node = min(free, key=lambda n: (node_load[n], n))
        held[node].append(e)
        node_load[node] += weight
    assignment = tuple(tuple(sorted(ids)) for ids in held)
    imbalance, per_token = score(assignment, load, samples)
    return LayerPlan(assignment, imbalance, per_token)
