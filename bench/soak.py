"""Bounded soak: mixed traffic with random cancellations and deadlines, optionally killing a
random node every K seconds, against a local tiny 2+2 (m=2) cluster behind the real gRPC server.

    python bench/soak.py --duration 600 --rate 8 --kill-every 60 [--json]

At the end it reports requests sent, completed, failed by status, cancelled by the client and
lost (a stream that ended without a finish reason and without an error: must be 0), KV blocks
still held once the cluster is idle (must be 0) and each node's RSS growth.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import ray
from afd.orchestrator.client import request
from afd.protos import afd_v1_pb2 as pb
from afd.protos import afd_v1_pb2_grpc as pb_grpc

WORDS = [
    "soak",
    "test",
    "tokens",
    "experts",
    "attention",
    "cache",
    "route",
    "step",
    "layer",
    "batch",
    "stream",
]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one(stub: pb_grpc.AfdStub, rng: random.Random, counts: dict) -> None:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
    max_tokens = rng.randint(1, 48)
    deadline = rng.choice([None, None, None, rng.uniform(0.05, 2.0)])
    cancel_after = rng.choice([None, None, None, None, rng.randint(1, 10)])
    call = stub.Generate(
        request(text=prompt, max_tokens=max_tokens, ignore_eos=True), timeout=deadline or 300
    )
    counts["sent"] += 1
    got, finished = 0, False
    try:
        async for r in call:
            got += len(r.token_ids)
            finished = bool(r.finish_reason)
            if cancel_after is not None and got >= cancel_after and not finished:
                call.cancel()
                counts["cancelled"] += 1
                return
        if finished and got == max_tokens:
            counts["completed"] += 1
        else:
            counts["lost"] += 1
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.CANCELLED and cancel_after is not None:
            counts["cancelled"] += 1
        else:
            key = err.code().name
            counts["failed"][key] = counts["failed"].get(key, 0) + 1


async def drive(target: str, duration: float, rate: float, seed: int, counts: dict) -> None:
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.AfdStub(ch)
        tasks = []
        end = time.monotonic() + duration
        while time.monotonic() < end:
            tasks.append(asyncio.create_task(one(stub, rng, counts)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    p.add_argument("--rate", type=float, default=8.0, help="requests per second (Poisson)")
    p.add_argument(
        "--kill-every", type=float, default=0.0, help="SIGKILL a random node every K s (0: never)"
    )
    p.add_argument("--expert-nodes", type=int, default=2)
    p.add_argument(
        "--replicas", type=int, default=1, help="nodes per expert (2: expert deaths fail no round)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="model directory (default: the demo's tiny model)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from afd.models.tiny import make_tiny_model
    from afd.orchestrator.cli import DEMO_MODEL_DIR
    from afd.orchestrator.config import Deployment, ModelSection
    from afd.orchestrator.server import BackgroundServer, with_ports

    model = Path(args.model) if args.model else DEMO_MODEL_DIR
    if not (model / "config.json").is_file():
        make_tiny_model(model)
    d = Deployment(model=ModelSection(path=str(model))).with_shape(2, args.expert_nodes, 2)
    d = with_ports(replace(d, experts=replace(d.experts, replicas=args.replicas)), None, 0, 0)
    server = BackgroundServer(d)
    endpoints = server.start()
    cluster = server.server.cluster
    nodes = {f"attention-{i}": a for i, a in enumerate(cluster.attention)}
    nodes |= {f"expert-{j}": e for j, e in enumerate(cluster.experts)}
    rss_before = {name: rss_mb(ray.get(n.pid.remote())) for name, n in nodes.items()}
    counts = {"sent": 0, "completed": 0, "cancelled": 0, "lost": 0, "failed": {}}
    kills: list[str] = []
    stop = False

    def killer() -> None:
        rng = random.Random(args.seed + 1)
        while not stop:
            time.sleep(args.kill_every)
            if stop:
                return
            name = rng.choice(sorted(nodes))
            try:
                os.kill(ray.get(nodes[name].pid.remote(), timeout=60), signal.SIGKILL)
                kills.append(name)
            except Exception as err:
                print(f"kill of {name} skipped: {err}", file=sys.stderr)

    import threading

    if args.kill_every > 0:
        threading.Thread(target=killer, daemon=True).start()
    try:
        asyncio.run(drive(endpoints.grpc, args.duration, args.rate, args.seed, counts))
    finally:
        stop = True
    with grpc.insecure_channel(endpoints.grpc) as ch:
        stub = pb_grpc.AfdStub(ch)
        deadline = time.monotonic() + 60
        while True:  # aborts of cancelled requests land at the next step
            status = stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
            held = sum(
                n.total_kv_blocks - n.free_kv_blocks for n in status.nodes if n.pool == "attention"
            )
            if held == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    rss_after = {name: rss_mb(ray.get(n.pid.remote(), timeout=60)) for name, n in nodes.items()}
    state = cluster.status()
    server.stop()
    report = {
        **counts,
        "kills": kills,
        "leaked_kv_blocks": held,
        "failed_steps": state.failed_steps,
        "expert_failovers": state.expert_failovers,
        "replicas": args.replicas,
        "rss_growth_mb": {k: round(rss_after[k] - rss_before[k], 1) for k in nodes},
        "duration_s": args.duration,
        "rate": args.rate,
    }
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:>16}: {v}")
    return 0 if report["lost"] == 0 and held == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
