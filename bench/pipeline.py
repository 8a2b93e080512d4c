"""Where a decode step's time goes on each node, for m = 1, 2, 3 micro-batches.

    python bench/pipeline.py [--json] [--attention-nodes M] [--expert-nodes N] [--batch B]

For the tiny model and a larger CPU-sized one, runs a batch of requests through a local
cluster and splits each decode step into: attention compute, expert compute, transport wait
(blocked on the other side or the wire) and idle (the rest of the orchestrator's step time:
Ray calls and scheduling). Numbers are mean milliseconds per decode step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

# bench/transport.py would shadow afd's `transport` package; import from the repository root.
import ray
from afd.models.sampling import SamplingParams
from afd.models.tiny import make_tiny_model
from afd.orchestrator.cluster import Cluster
from afd.orchestrator.config import Deployment, ModelSection

MODELS = {
    "tiny": {"layers": 2, "experts": 8, "top_k": 2, "hidden": 64},
    "cpu-large": {"layers": 4, "experts": 16, "top_k": 4, "hidden": 768},
}


def measure(model_dir: Path, m: int, args: argparse.Namespace) -> list[dict]:
    deployment = Deployment(model=ModelSection(path=str(model_dir))).with_shape(
        args.attention_nodes, args.expert_nodes, m
    )
    cluster = Cluster(deployment)
    try:
        params = SamplingParams(max_tokens=args.decode_steps, ignore_eos=True)
        cluster.generate([([5] * args.prompt_len, params)] * args.batch)  # warm-up
        cluster.keep_history = True
        cluster.generate([([5 + i % 7] * args.prompt_len, params) for i in range(args.batch)])
        steps = cluster.history[2:]  # the first steps carry the prefill
    finally:
        cluster.shutdown()
    rows = []
    wall = statistics.mean(s.wall_s for s in steps) * 1e3
    for i in range(args.attention_nodes):
        busy = statistics.mean(s.attention[i].timings.attention_s for s in steps) * 1e3
        wait = statistics.mean(s.attention[i].timings.expert_wait_s for s in steps) * 1e3
        rows.append(
            {
                "node": f"attention-{i}",
                "attention_ms": busy,
                "expert_ms": 0.0,
                "wait_ms": wait,
                "idle_ms": max(0.0, wall - busy - wait),
            }
        )
    for j in range(args.expert_nodes):
        busy = statistics.mean(s.experts[j].compute_s for s in steps) * 1e3
        wait = statistics.mean(s.experts[j].wait_s for s in steps) * 1e3
        rows.append(
            {
                "node": f"expert-{j}",
                "attention_ms": 0.0,
                "expert_ms": busy,
                "wait_ms": wait,
                "idle_ms": max(0.0, wall - busy - wait),
            }
        )
    for r in rows:
        r.update(micro_batches=m, step_ms=wall, tokens_per_s=args.batch / wall * 1e3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--attention-nodes", type=int, default=1)
    parser.add_argument("--expert-nodes", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--decode-steps", type=int, default=12)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model_dir = make_tiny_model(Path(tmp) / name, **MODELS[name])
            for m in (1, 2, 3):
                results += [{"model": name, **r} for r in measure(model_dir, m, args)]
    ray.shutdown()
    if args.json:
        print(json.dumps({"rows": results}))
        return
    print(
        f"{'model':<10}{'m':>3}  {'node':<13}{'attn ms':>9}{'expert ms':>10}{'wait ms':>9}{'idle ms':>9}{'step ms':>9}{'tok/s':>8}"
    )
    for r in results:
        print(
            f"{r['model']:<10}{r['micro_batches']:>3}  {r['node']:<13}{r['attention_ms']:>9.2f}{r['expert_ms']:>10.2f}{r['wait_ms']:>9.2f}{r['idle_ms']:>9.2f}{r['step_ms']:>9.2f}{r['tokens_per_s']:>8.0f}"
        )


if __name__ == "__main__":
    main()
