"""`afd plan`'s performance model on hand-computable cases, and its search's rules."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from afd.models.config import load_config
from afd.orchestrator.planner import (
    Catalog,
    GpuType,
    PlanError,
    Shape,
    load_catalog,
    model_step,
    search,
)

ROOT = Path(__file__).resolve().parents[2]
# 1 TB/s, 1 PFLOP/s, 1 GB/s network, efficiencies 1: every term below is countable by hand
UNIT = GpuType("U", 1000, 1.0, 1000, 2000, 1.0, 1.0, 1.0, 1.0)
SHAPE = Shape(
    layers=10,
    attention_params=1e6,
    expert_params=1e6,
    experts=8,
    top_k=2,
    hidden=1000,
    kv_bytes_per_token=1000,
    head_params=0,
    attention_flops_per_ctx=0,
)


def test_one_layer_by_hand() -> None:
    catalog = Catalog({"U": UNIT}, latency_s=10e-6, max_context=100)
    # 1 attention node, 2 expert nodes, m=2, batch 8 -> 4 tokens a micro-batch
    t_a, t_e, t_c, t_layer = model_step(SHAPE, catalog, UNIT, 1, 1, UNIT, 2, 2, 8, 2, 100)
    # attention: 2e6 weight bytes + 4 tokens x 100 ctx x 1000 B of KV = 2.4e6 B at 1e12 B/s
    assert t_a == pytest.approx(2.4e-6)
    # experts: 4 tokens x top-2 / 2 nodes = 4 pairs over 4 local experts;
    # expected experts touched 4 x (1 - (3/4)^4) = 2.734375, each 2e6 B
    assert t_e == pytest.approx(2.734375 * 2e6 / 1e12)
    # dispatch: 4 tokens x min(2, 2) nodes x 1000 x 2 B = 16 kB at 1e9 B/s, plus 10 us
    assert t_c == pytest.approx(16e-6 + 10e-6)
    assert t_layer == pytest.approx(t_a + t_e + 2 * t_c)  # comm not hidden at m=2 here


def _tiny(tiny_models: dict[str, Path]):
    return load_config(tiny_models["qwen3_moe"])


def test_no_chosen_plan_breaks_the_slo(tiny_models: dict[str, Path]) -> None:
    catalog = load_catalog(ROOT / "configs" / "gpu-catalog.yaml")
    config = _tiny(tiny_models)
    loose = search(config, catalog, tpot_slo_ms=1000, max_gpus=6)
    slo = sorted(p.tpot_ms for p in loose)[len(loose) // 2]  # excludes about half of them
    tight = search(config, catalog, tpot_slo_ms=slo, max_gpus=6)
    assert all(p.tpot_ms <= slo for p in tight)
    assert len(tight) < len(loose)
    with pytest.raises(PlanError, match="no plan meets a TPOT of 1e-06 ms"):
        search(config, catalog, tpot_slo_ms=1e-6, max_gpus=6)


def test_slow_communication_gets_more_micro_batches(tiny_models: dict[str, Path]) -> None:
    config = _tiny(tiny_models)
    fast = Catalog({"U": replace(UNIT, net_GBps=1e6)}, latency_s=0.0, max_context=64)
    slow = Catalog({"U": replace(UNIT, net_GBps=0.05)}, latency_s=200e-6, max_context=64)
    best_fast = search(config, fast, tpot_slo_ms=1e6, max_gpus=4, batches=(64,))[0]
    best_slow = search(config, slow, tpot_slo_ms=1e6, max_gpus=4, batches=(64,))[0]
    assert best_slow.micro_batches > best_fast.micro_batches
    assert best_slow.t_comm_us > best_slow.t_attention_us  # the reason: T_c dominates


def test_budget_and_catalog_errors(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    catalog = load_catalog(ROOT / "configs" / "gpu-catalog.yaml")
    config = _tiny(tiny_models)
    cheap = search(config, catalog, tpot_slo_ms=1000, max_gpus=8, budget_per_hour=3.0)
    assert all(p.price_per_hour <= 3.0 for p in cheap)
    with pytest.raises(PlanError, match="not in the catalog"):
        search(config, catalog, tpot_slo_ms=10, gpu_types=["TPU"])
    bad = tmp_path / "catalog.yaml"
    bad.write_text("gpus:\n  X: {memory_GB: 10}\n")
    with pytest.raises(PlanError, match="GPU type 'X' lacks hbm_TBps"):
        load_catalog(bad)


def test_afd_plan_writes_a_config_that_starts(
    tiny_models: dict[str, Path], tmp_path: Path, ray_session
) -> None:
    import subprocess
    import sys

    from afd.models.reference import ReferenceEngine
    from afd.models.sampling import SamplingParams
    from afd.orchestrator.cluster import Cluster
    from afd.orchestrator.config import load_deployment

    model, out = tiny_models["qwen3_moe"], tmp_path / "plan.yaml"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "afd.orchestrator.cli",
            "plan",
            "--model",
            str(model),
            "--tpot-ms",
            "100",
            "--max-gpus",
            "4",
            "--gpus",
            "H100,L40S",
            "--out",
            str(out),
            "--cpu-only",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert "plans meet TPOT <= 100.0 ms" in run.stdout and "wrote plan 1" in run.stdout
    deployment = load_deployment(out)
    assert deployment.attention.nodes + deployment.experts.nodes <= 4
    cluster = Cluster(deployment)
    try:
        ref = ReferenceEngine(model)
        ids = ref.tokenizer.encode("Hello, world!")
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        (got,) = cluster.generate([(ids, params)])
        assert [o.token_id for o in got] == ref.generate(ids, params).token_ids
    finally:
        cluster.shutdown()


def test_measured_rates_replace_the_datasheet(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import json

    from afd.orchestrator.planner import with_measured

    catalog = load_catalog(ROOT / "configs" / "gpu-catalog.yaml")
    result = tmp_path / "decode.json"
    result.write_text(
        json.dumps(
            {
                "copy_GBps": 3000.0,
                "rows": [{"engine": "hf", "mbu": 0.9}, {"engine": "afd-graph", "mbu": 0.25}],
            }
        )
    )
    measured = with_measured(catalog, "H100", result)
    h100 = measured.gpus["H100"]
    assert (h100.hbm_TBps, h100.hbm_efficiency) == (3.0, 0.25)  # afd's own best MBU, not HF's
    config = _tiny(tiny_models)
    datasheet = search(config, catalog, 1000, max_gpus=4, gpu_types=["H100"])[0]
    slower = search(config, measured, 1000, max_gpus=4, gpu_types=["H100"])[0]
    assert slower.tokens_per_s < datasheet.tokens_per_s
    with pytest.raises(PlanError, match="not a bench/decode.py result"):
        result.write_text("{}")
        with_measured(catalog, "H100", result)
