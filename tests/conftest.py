"""Shared fixtures: tiny random models written by afd's own `make_tiny_model`, once per session."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run in Triton's interpreter (set first)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from afd.models.tiny import make_tiny_model

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


IN_PROCESS_TRANSPORTS = ("transport", "attention_nodes", "expert_nodes")  # test folders


@pytest.fixture(autouse=True)
def _collect_garbage_on_the_test_thread(request: pytest.FixtureRequest):
    """Objects of closed transports (UCX workers, endpoints) are finalized here, after each
    test that makes them in this process, on its own thread, instead of by a garbage
    collection that happens to start inside another transport's progress loop on another
    thread (a segfault, seen once in CI)."""
    yield
    if request.path.parent.name in IN_PROCESS_TRANSPORTS:
        gc.collect()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch=arch, seed=1) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["qwen3_moe"]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every cluster test: starting Ray costs seconds."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
