"""Heterogeneous placement on Ray: impossible placements fail fast with a message naming the
pool, and on a two-node Ray cluster started with `ray start` each pool lands on its node type."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
from afd.models.reference import ReferenceEngine
from afd.models.sampling import SamplingParams
from afd.orchestrator.cluster import Cluster
from afd.orchestrator.config import Deployment, ModelSection
from afd.orchestrator.pool_placement import PoolPlacementError


def _deployment(model: Path, **pools: dict) -> Deployment:
    d = Deployment(model=ModelSection(path=str(model))).with_shape(1, 1, 1)
    for pool, fields in pools.items():
        d = replace(d, **{pool: replace(getattr(d, pool), **fields)})
    return d


@pytest.mark.parametrize(
    ("pools", "message"),
    [
        (
            {"attention": {"accelerator_type": "H100"}},
            r"pool 'attention' needs .*no alive Ray node offers accelerator_type:H100",
        ),
        ({"experts": {"num_gpus": 1.0}}, r"pool 'experts' needs .*no alive Ray node offers GPU"),
        (
            {"experts": {"resources": {"afd_expert_host": 1}}},
            r"pool 'experts' .*offers afd_expert_host",
        ),
        (
            {"attention": {"num_cpus": 1.5}, "experts": {"num_cpus": 1.0}},
            r"pool 'attention' needs 1 actor\(s\) of \{CPU=1.5\}; only 0 fit next to the other pool",
        ),
    ],
    ids=["accelerator", "gpus", "custom-resource", "not-enough-together"],
)
def test_an_impossible_placement_fails_fast_naming_the_pool(
    tiny_model: Path, ray_session, pools: dict, message: str
) -> None:
    start = time.monotonic()
    with pytest.raises(PoolPlacementError, match=message):
        Cluster(_deployment(tiny_model, **pools))
    assert time.monotonic() - start < 5.0


DRIVER = textwrap.dedent(
    """
    import json, sys
    import ray
    from afd.orchestrator.cluster import Cluster
    from afd.orchestrator.config import load_deployment
    from afd.models.sampling import SamplingParams
    cluster = Cluster(load_deployment(sys.argv[1]))
    try:
        out = cluster.generate([(json.loads(sys.argv[2]), SamplingParams(max_tokens=8, ignore_eos=True))])
        kinds = {n["NodeID"]: sorted(k for k in n["Resources"] if k.startswith("afd_")) for n in ray.nodes()}
        where = {}  # actor -> the afd_* resources of its node (GCS actor table; no dashboard here)
        for actor_id, a in ray._private.state.actors().items():
            name = a["ActorClassName"]
            if a["State"] == "ALIVE" and name in ("AttentionNode", "ExpertNode"):
                where[name + "-" + actor_id[:6]] = kinds[a["Address"]["NodeID"]]
        print(json.dumps({"ids": [o.token_id for o in out[0]], "where": where}))
    finally:
        cluster.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pools_land_on_their_node_types_of_a_ray_start_cluster(
    tiny_model: Path, tmp_path: Path
) -> None:
    ray_cli = str(Path(sys.executable).with_name("ray"))
    temp = Path("/tmp") / f"afd-ray-{os.getpid()}"  # short: Ray's socket paths have a length limit
    port = _free_port()
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}  # one host, no token files
    node = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    node.append(f"--object-store-memory={100 << 20}")
    head = [f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false"]
    try:
        for args in (
            ["--head", *head, "--resources", json.dumps({"afd_attention_host": 2})],
            [f"--address=127.0.0.1:{port}", "--resources", json.dumps({"afd_expert_host": 2})],
        ):
            started = subprocess.run(
                [ray_cli, "start", *args, *node],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
            )
            assert started.returncode == 0, started.stderr[-2000:]
        config = tmp_path / "hetero.yaml"
        config.write_text(
            f"model: {{path: {tiny_model}}}\n"
            "attention: {nodes: 2, resources: {afd_attention_host: 1}, strategy: pack}\n"
            "experts: {nodes: 2, resources: {afd_expert_host: 1}, strategy: spread}\n"
            "pipeline: {micro_batches: 2}\n"
            f"ray: {{address: '127.0.0.1:{port}'}}\n"
        )
        ref = ReferenceEngine(tiny_model)
        ids = ref.tokenizer.encode("The capital of France is")
        run = subprocess.run(
            [sys.executable, "-c", DRIVER, str(config), json.dumps(ids)],
            capture_output=True,
            text=True,
            env=env,
            timeout=240,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        result = json.loads(run.stdout.strip().splitlines()[-1])
        want = ref.generate(ids, SamplingParams(max_tokens=8, ignore_eos=True))
        assert result["ids"] == want.token_ids
        where = result["where"]
        assert sorted(k.split("-")[0] for k in where) == ["AttentionNode"] * 2 + ["ExpertNode"] * 2
        for actor, kinds in where.items():
            wanted = "afd_attention_host" if actor.startswith("Attention") else "afd_expert_host"
            assert kinds == [wanted], (actor, kinds)
    finally:
        _kill_matching([str(temp), f"127.0.0.1:{port}"])  # `ray stop` would stop every Ray here
        shutil.rmtree(temp, ignore_errors=True)


def _kill_matching(needles: list[str]) -> None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc.name), signal.SIGKILL)
