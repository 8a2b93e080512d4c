"""Random weights from `config.json` alone (`model.load_format: dummy`, vLLM's name for it).

A 30B- or 235B-shape deployment then starts on a GPU without a checkpoint on disk, and each node
still builds only the tensors it serves. A tensor's values depend only on its name and the
seed, so every node that holds the same tensor (say, the embeddings on every attention node)
builds the same one. Norm weights are ones, everything else is normal with a small deviation,
so activations stay finite through many layers.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch
from afd.models.weights import TensorSpec

INIT_STD = 0.02


class DummyCheckpoint:
    """Reads like `Checkpoint`, makes every tensor up; `device` is where they are generated
    (the GPU for big shapes: generating 60 GB on the host is slow)."""

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.seed = seed
        self.device = torch.device(device)
        self.bytes_read = 0
        self.names_read: list[str] = []

    def check_names(self, config: object) -> None:
        """Nothing to check: every tensor is made to the config's shapes."""

    def load(self, specs: Iterable[TensorSpec], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {}
        for spec in specs:
            out[spec.name] = self._make(spec, dtype)
            self.names_read.append(spec.name)
        return out

    def _make(self, spec: TensorSpec, dtype: torch.dtype) -> torch.Tensor:
        if spec.name.endswith("norm.weight"):
            return torch.ones(spec.shape, dtype=dtype, device=self.device)
        generator = torch.Generator(self.device)
        generator.manual_seed(self.seed * 1_000_003 + zlib.crc32(spec.name.encode()))
        tensor = torch.empty(spec.shape, dtype=dtype, device=self.device)
        return tensor.normal_(0.0, INIT_STD, generator=generator)
