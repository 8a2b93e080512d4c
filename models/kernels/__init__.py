"""Triton kernels for the decode path: fused MoE, fused small ops, paged decode attention.

They run wherever the tensors are on CUDA and Triton is installed (it ships with CUDA builds
of torch). Everything else (CPU deployments, CI) runs the plain torch math in `afd.models`,
which is also what each kernel is tested against. On a machine without a GPU the kernels can
still be run, slowly, by Triton's interpreter (`TRITON_INTERPRET=1` set before Triton is
imported, and `force(True)`): that is how CI checks them.

On Hopper and later the decode kernels launch as programmatic dependents (`pdl`).

Arguments that follow the batch (row and pair counts, table widths) are marked
`do_not_specialize`: Triton would otherwise compile a kernel variant per divisibility class of
each value, and a server would compile in the middle of a request.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
_forced = False
_interpreter_lock = threading.Lock()


def usable(t: torch.Tensor) -> bool:
    """Whether the fused kernels serve this tensor's device: CUDA, or CPU when forced and
    Triton's interpreter is on (compiled kernels cannot read host memory)."""
    return HAVE_TRITON and (t.is_cuda or (_forced and _interpreting()))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextmanager
def force(on: bool = True) -> Iterator[None]:
    """Runs the kernels on CPU tensors too (Triton's interpreter must be on): for tests."""
    global _forced
    before, _forced = _forced, on
    try:
        yield
    finally:
        _forced = before


def launching() -> AbstractContextManager[object]:
    """Held around kernel launches: Triton's interpreter is not thread-safe (in-process
    tests run nodes on threads), compiled kernels need nothing."""
    return _interpreter_lock if _interpreting() else nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 tensors multiply in full fp32 (the tests' parity runs); tf32 would cost digits."""
    return "ieee" if dtype == torch.float32 else "tf32"
