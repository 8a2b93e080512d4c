"""Programmatic dependent launch (PDL, Hopper and later) for the decode kernels.

A kernel launched as a programmatic dependent has its programs placed on the SMs while the
kernel before it in the stream drains; each program then waits (`griddepcontrol.wait`) until
that kernel has finished and its writes are visible. Inside a CUDA graph a decode layer at
batch 1 is about eleven kernels of a few µs each, so the launch and prologue every kernel
hides this way is a share of the step (bench/NOTES.md, session 11).

The rule every kernel here keeps: `wait_for_prior` runs in every program, before the program
reads or writes anything another kernel may touch, and before any early exit (a grid whose
programs all left without waiting could complete before its predecessor, and release the
kernel after it too soon). `AFD_PDL=0` turns PDL off: the bench's baseline.
"""

from __future__ import annotations

import os
from functools import cache

import torch
import triton
import triton.language as tl

HAVE_GDC = hasattr(tl.extra.cuda, "gdc_wait")


@triton.jit
def wait_for_prior(PDL: tl.constexpr):
    """Waits for the kernel before this one, then lets the one after it start placing its
    programs (they wait here in turn)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def pdl(t: torch.Tensor) -> bool:
    """Whether kernels on this tensor's device launch as programmatic dependents."""
    if not t.is_cuda:
        return False
    return _pdl_on(t.device.index if t.device.index is not None else torch.cuda.current_device())


@cache
def _pdl_on(index: int) -> bool:
    """NVIDIA Hopper or later (a ROCm device reports a major version too, but runs no PTX)."""
    if os.environ.get("AFD_PDL", "1") == "0" or not HAVE_GDC or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_launch(on: bool) -> dict[str, bool]:
    """The launch option that goes with a kernel's `PDL` constexpr."""
    return {"launch_pdl": True} if on else {}
