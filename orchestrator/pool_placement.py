"""Turns each pool's section of the deployment into Ray resources and a placement group, and
refuses at once a placement the Ray cluster cannot satisfy.

Ray would otherwise leave an unsatisfiable actor pending forever; here the check runs against
`ray.nodes()` before any actor starts, and the message names the pool and what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from afd.orchestrator.config import AttentionSection, ExpertSection
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

ACCELERATOR_PREFIX = "accelerator_type:"  # how Ray names a node's GPU model as a resource


class PoolPlacementError(RuntimeError):
    """The Ray cluster cannot hold a pool as configured; the message says which and why."""


@dataclass(frozen=True, slots=True)
class PoolDemand:
    pool: str  # "attention" or "experts"
    actors: int
    bundle: dict[str, float]  # resources one actor needs
    strategy: str  # Ray's: SPREAD or PACK

    @classmethod
    def of(cls, pool: str, section: AttentionSection | ExpertSection, actors: int) -> PoolDemand:
        bundle = {"CPU": section.num_cpus, "GPU": section.num_gpus, **(section.resources or {})}
        if section.accelerator_type:
            bundle[ACCELERATOR_PREFIX + section.accelerator_type] = 0.001
        return cls(
            pool, actors, {k: v for k, v in bundle.items() if v > 0}, section.strategy.upper()
        )

    def describe(self) -> str:
        wants = ", ".join(f"{k}={v:g}" for k, v in sorted(self.bundle.items())) or "nothing"
        return f"{self.actors} actor(s) of {{{wants}}}"


def check_fits(demands: list[PoolDemand], nodes: list[dict]) -> None:
    """Fails fast when no node could hold one actor of a pool, or the pools together need more
    than the cluster has (a first-fit count, per pool, over the alive nodes)."""
    alive = [dict(n["Resources"]) for n in nodes if n.get("Alive", True)]
    for d in demands:
        if d.actors and not any(_fits(d.bundle, free) for free in alive):
            missing = sorted(
                k for k in d.bundle if not any(free.get(k, 0) >= d.bundle[k] for free in alive)
            )
            what = ", ".join(missing) if missing else "those resources together on one node"
            raise PoolPlacementError(
                f"pool '{d.pool}' needs {d.describe()}, but no alive Ray node offers {what}; "
                f"the cluster has: {_summary(alive)}"
            )
    free = [dict(r) for r in alive]
    for d in demands:
        for i in range(d.actors):
            node = next((f for f in free if _fits(d.bundle, f)), None)
            if node is None:
                raise PoolPlacementError(
                    f"pool '{d.pool}' needs {d.describe()}; only {i} fit next to the other pool "
                    f"in a cluster of {_summary(alive)}"
                )
            for k, v in d.bundle.items():
                node[k] -= v


def reserve(demand: PoolDemand, timeout_s: float) -> PlacementGroup:
    """A placement group for the pool, ready, or a PoolPlacementError after `timeout_s`."""
    group = placement_group(
        [dict(demand.bundle) or {"CPU": 0.001}] * demand.actors, strategy=demand.strategy
    )
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise PoolPlacementError(
            f"pool '{demand.pool}': Ray could not reserve {demand.describe()} "
            f"({demand.strategy}) within {timeout_s}s"
        )
    return group


def in_group(group: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=index
    )


def _fits(bundle: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0) >= v for k, v in bundle.items())


def _summary(nodes: list[dict]) -> str:
    parts = []
    for free in nodes:
        shown = {
            k: v for k, v in free.items() if not k.startswith(("node:", "memory", "object_store"))
        }
        parts.append("{" + ", ".join(f"{k}={v:g}" for k, v in sorted(shown.items())) + "}")
    return "; ".join(parts) or "no alive nodes"
