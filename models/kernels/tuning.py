"""The tuned tile table (`tuned.json`, written by `bench/tune_kernels.py` on the GPU it names):
for each kernel family, shape, dtype and GPU model, the best tiles per row count. A shape or
GPU without an entry gets the kernel's defaults (or, for the skinny linear, cuBLAS)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import torch

TABLE_FILE = Path(__file__).with_name("tuned.json")


def shape_key(family: str, dtype: torch.dtype, device: str, **dims: int) -> str:
    """e.g. `moe:E=128,I=768,D=2048,dtype=bfloat16,gpu=NVIDIA H100 80GB HBM3`."""
    shape = ",".join(f"{k}={v}" for k, v in dims.items())
    return f"{family}:{shape},dtype={str(dtype).removeprefix('torch.')},gpu={device}"


@cache
def device_name(device: torch.device) -> str:
    """The GPU's model name as CUDA reports it ("cpu" for the interpreter), once per device."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@cache
def load_table() -> dict[str, dict[str, Any]]:
    if not TABLE_FILE.exists():
        return {}
    table: dict[str, dict[str, Any]] = json.loads(TABLE_FILE.read_text())
    return table


def lookup(key: str, rows: int) -> tuple[bool, Any]:
    """(found, entry) for the smallest tuned row count ≥ `rows` (the largest if none is)."""
    entry = load_table().get(key)
    if not entry:
        return False, None
    sizes = sorted(int(n) for n in entry)
    return True, entry[str(next((n for n in sizes if n >= rows), sizes[-1]))]


def save(updates: dict[str, dict[str, Any]], path: Path = TABLE_FILE) -> None:
    """Merges `updates` into the table at `path`: entries of other shapes and GPUs stay, and so
    do the sizes of a shape that were not tuned this time."""
    table = json.loads(path.read_text()) if path.exists() else {}
    for key, sizes in updates.items():
        table[key] = {**table.get(key, {}), **sizes}
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
