"""Reads exactly the tensors a caller asks for from single-file or sharded safetensors.

Only headers are read to map names to files; each requested tensor is read once, from its
own file, and converted to the requested dtype. Nothing else is touched. FP8 checkpoints
(`quantization_config.weight_block_size` in config.json, each float8_e4m3fn weight beside its
`weight_scale_inv` blocks) are read the same way: each weight is dequantized with its scales.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch
from afd.models import fp8
from afd.models.config import ModelConfig
from afd.models.dummy_weights import DummyCheckpoint
from afd.models.weights import ALL_KINDS, IGNORED_SUFFIXES, TensorSpec, tensor_specs
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"  # an fp8 weight's block scales: dequantized = weight · scales
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the tensor."""


class TensorSource(Protocol):
    """Where a node's weights come from: a safetensors checkpoint, or made up (dummy)."""

    names_read: list[str]  # every tensor handed out, for tests that check what a node loaded
    device: torch.device  # where `load` makes its tensors

    def check_names(self, config: ModelConfig) -> None: ...

    def load(self, specs: Iterable[TensorSpec], dtype: torch.dtype) -> dict[str, torch.Tensor]: ...


LOAD_FORMATS = ("auto", "dummy")


def open_checkpoint(
    model_dir: str | Path, load_format: str = "auto", device: str | torch.device = "cpu"
) -> TensorSource:
    """`auto`: the directory's safetensors; `dummy`: random weights of the config's shapes,
    made on `device` (vLLM's `--load-format dummy`)."""
    if load_format == "dummy":
        return DummyCheckpoint(device=device)
    if load_format != "auto":
        raise CheckpointError(
            f"load format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}"
        )
    return Checkpoint(model_dir)


class Checkpoint:
    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.device = torch.device("cpu")  # safetensors are read into host memory
        self.file_of = self._map_names()
        self.bytes_read = 0  # for tests and metrics: what this reader actually loaded
        self.names_read: list[str] = []

    def _map_names(self) -> dict[str, Path]:
        index, single = self.model_dir / INDEX_FILE, self.model_dir / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err})") from err
            return {name: self.model_dir / file for name, file in weight_map.items()}
        if single.is_file():
            with safe_open(single, framework="pt") as f:
                return {name: single for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        raise CheckpointError(f"{self.model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

    def check_names(self, config: ModelConfig) -> None:
        """Fails on tensors the config does not explain, e.g. a ninth expert in an 8-expert model."""
        expected = {s.name for s in tensor_specs(config, ALL_KINDS)}
        expected |= {f"{n}{SCALE_SUFFIX}" for n in expected}
        unexpected = sorted(
            n for n in self.file_of if n not in expected and not n.endswith(IGNORED_SUFFIXES)
        )
        if unexpected:
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            raise CheckpointError(
                f"{self.model_dir}: unexpected tensor '{unexpected[0]}'{more} for a "
                f"{config.arch} model with {config.num_layers} layers and {config.num_experts} experts"
            )

    def load(self, specs: Iterable[TensorSpec], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        specs = list(specs)
        by_file: dict[Path, list[TensorSpec]] = defaultdict(list)
        for spec in specs:
            if spec.name not in self.file_of:
                raise CheckpointError(f"{self.model_dir}: missing tensor '{spec.name}'")
            by_file[self.file_of[spec.name]].append(spec)
        out: dict[str, torch.Tensor] = {}
        for path, file_specs in by_file.items():
            if not path.is_file():
                raise CheckpointError(f"{path}: shard named in {INDEX_FILE} does not exist")
            with safe_open(path, framework="pt") as f:
                for spec in file_specs:
                    out[spec.name] = self._read(f, spec, dtype)
        return out

    def _read(self, f, spec: TensorSpec, dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(f.get_slice(spec.name).get_shape())
        if shape != spec.shape:
            raise CheckpointError(
                f"{self.model_dir}: tensor '{spec.name}' has shape {list(shape)}, "
                f"expected {list(spec.shape)}"
            )
        tensor = f.get_tensor(spec.name)
        self.bytes_read += tensor.numel() * tensor.element_size()
        self.names_read.append(spec.name)
        if tensor.dtype == fp8.FP8:
            return fp8.dequantize(tensor, self._scales(spec.name), dtype, self._fp8_block())
        return tensor.to(dtype)

    def _scales(self, name: str) -> torch.Tensor:
        scale_name = f"{name}{SCALE_SUFFIX}"
        if scale_name not in self.file_of:
            raise CheckpointError(f"{self.model_dir}: fp8 tensor '{name}' has no '{scale_name}'")
        with safe_open(self.file_of[scale_name], framework="pt") as f:
            scales = f.get_tensor(scale_name)
        self.bytes_read += scales.numel() * scales.element_size()
        return scales

    def _fp8_block(self) -> int:
        """The square block of the checkpoint's scales, from config.json."""
        try:
            quant = json.loads((self.model_dir / "config.json").read_text())["quantization_config"]
            bn, bk = quant["weight_block_size"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"{self.model_dir}: fp8 tensors need quantization_config.weight_block_size "
                f"[n, k] in config.json ({err!r})"
            ) from err
        if bn != bk or not isinstance(bn, int) or bn <= 0:
            raise CheckpointError(
                f"{self.model_dir}: weight_block_size {[bn, bk]} is not supported; "
                "afd reads square blocks, e.g. [128, 128]"
            )
        return bn
