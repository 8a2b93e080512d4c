"""`afd plan-experts`: an expert placement per MoE layer from measured load, offline.

With `--all-layers` the layers' loads are summed into one plan, which is what a deployment can
use today (`experts.assignment`: one placement for every layer; the JSON's `assignment`).
The load comes from a JSON file (`{"layers": [{"layer": 0, "expert_tokens": [...],
"samples": [[e, ...], ...]}, ...]}`; `samples`, optional, are top-k sets of sampled tokens) or
from a running server's ClusterStatus (its load window, without samples). For each layer the
plan is scored against today's even contiguous placement; the result is printed as a table
and, with `--out`, written as JSON (per layer: assignment and scores).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from afd.orchestrator.expert_planner import even_assignment, plan_layer, score

ALL_LAYERS = -1  # the layer of a plan made from every layer's load at once


class LoadFileError(ValueError):
    """A load file afd cannot read; the message names the file and the field."""


def read_load_file(path: str) -> list[dict[str, Any]]:
    try:
        layers = json.loads(Path(path).read_text())["layers"]
        out = []
        for i, entry in enumerate(layers):
            tokens = [float(t) for t in entry["expert_tokens"]]
            samples = [[int(e) for e in s] for s in entry.get("samples", [])]
            if any(t < 0 for t in tokens) or any(
                not 0 <= e < len(tokens) for s in samples for e in s
            ):
                raise LoadFileError(
                    f"{path}: layers[{i}] has a negative count or an unknown expert"
                )
            out.append(
                {"layer": int(entry.get("layer", i)), "expert_tokens": tokens, "samples": samples}
            )
        return out
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        if isinstance(err, LoadFileError):
            raise
        raise LoadFileError(
            f'{path}: not a load file ({err!r}); expected {{"layers": [{{"expert_tokens": [...]}}]}}'
        ) from err


def read_server_load(
    target: str, tls_ca: str | None = None, token: str | None = None
) -> list[dict[str, Any]]:
    from afd.orchestrator.client import channel
    from afd.protos import afd_v1_pb2 as pb
    from afd.protos import afd_v1_pb2_grpc as pb_grpc

    with channel(target, tls_ca) as ch:
        metadata = [("authorization", f"Bearer {token}")] if token else None
        status = pb_grpc.AfdStub(ch).ClusterStatus(
            pb.ClusterStatusRequest(), timeout=30, metadata=metadata
        )
    return [
        {"layer": x.layer, "expert_tokens": [float(t) for t in x.expert_tokens], "samples": []}
        for x in status.layers
    ]


def merged(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every layer's load (and samples) as one: for a placement all layers share, which is
    what `experts.assignment` gives today."""
    return [{
        "layer": ALL_LAYERS,
        "expert_tokens": [float(t) for t in np.sum([x["expert_tokens"] for x in layers], axis=0)],
        "samples": [s for x in layers for s in x["samples"]],
    }]  # fmt: skip


def plan(
    layers: list[dict[str, Any]], nodes: int, redundant_slots: int, slack: float
) -> list[dict]:
    rows = []
    for entry in layers:
        load = np.asarray(entry["expert_tokens"])
        before = score(even_assignment(len(load), nodes), load, entry["samples"])
        p = plan_layer(entry["expert_tokens"], nodes, redundant_slots, entry["samples"], slack)
        rows.append({
            "layer": entry["layer"],
            "assignment": [list(ids) for ids in p.assignment],
            "imbalance_before": before[0],
            "imbalance_after": p.imbalance,
            "nodes_per_token_before": before[1],
            "nodes_per_token_after": p.nodes_per_token,
        })  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    print("| layer | imbalance now | planned | nodes per token now | planned |")
    print("|---|---|---|---|---|")
    for r in rows:
        layer = "all" if r["layer"] == ALL_LAYERS else r["layer"]
        print(f"| {layer} | {f(r['imbalance_before'])} | {f(r['imbalance_after'])} | "
              f"{f(r['nodes_per_token_before'])} | {f(r['nodes_per_token_after'])} |")  # fmt: skip
