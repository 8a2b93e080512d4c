"""One GPU timestamp: a one-thread kernel stores the global timer (ns) at an index, in stream
order and inside CUDA graphs too (`afd.models.step_trace`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from afd.models import kernels
from triton.language.extra.cuda import globaltimer


@triton.jit(do_not_specialize=["index"])
def _stamp_kernel(out_ptr, index):
    tl.store(out_ptr + index, globaltimer())


def stamp(out: torch.Tensor, index: int) -> None:
    """out[index] = the GPU's global timer, when the stream gets here (`out`: int64, CUDA)."""
    with kernels.launching():
        _stamp_kernel[(1,)](out, index)
