"""Memory that peers on one host map into their own process: where the device lane's slots live.

On CUDA a region is one allocation shared by CUDA IPC (`torch.multiprocessing`'s handles): a
peer's kernels write straight into it, on the same GPU or a peer GPU of the host. On CPU it is
an anonymous memory file (`memfd_create`) that peers map through `/proc/<owner>/fd/<n>`: it
disappears with the last process that maps it, so a killed node leaves nothing behind.

Two processes on one GPU run at the same time only under CUDA MPS; without it every hand-off
waits for a time slice (~2 ms), so opening a region of another process on this same GPU is
refused unless the MPS control daemon is up.
"""

from __future__ import annotations

import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from afd.transport.slots import SlotLayout, SlotRegion


class RegionError(RuntimeError):
    """A region could not be made or mapped; the message says what to do."""


@dataclass(frozen=True, slots=True)
class RegionHandle:
    """What a peer needs to map a node's region: picklable, valid on the owner's host only."""

    layout: SlotLayout
    owner: int  # node id of the region's owner
    writers: tuple[int, ...]  # node ids of the peers that write into it, in slot order
    machine: str
    pid: int
    key: str  # names the region within its owner's process
    gpu: str | None  # CUDA: the GPU's uuid; None: host memory
    shared: tuple[Any, ...]  # CPU: (fd,); CUDA: torch's IPC rebuild function and arguments

    def writer_index(self, node_id: int) -> int:
        return writer_index(self.owner, self.writers, node_id)


def writer_index(owner: int, writers: tuple[int, ...], node_id: int) -> int:
    """Where node `node_id` writes in node `owner`'s region (a lane handle's writer order)."""
    if node_id not in writers:
        raise RegionError(
            f"node {node_id} is not a writer of node {owner}'s region (writers {list(writers)})"
        )
    return writers.index(node_id)


_own: dict[str, torch.Tensor] = {}  # this process's regions by key: a peer in-process maps these
_own_fds: dict[str, int] = {}  # the memory files of our CPU regions
_own_lock = threading.Lock()


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def mps_pipe_directory() -> Path:
    return Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))


def mps_running() -> bool:
    """Whether an MPS control daemon answers on this host (its control pipe exists)."""
    return (mps_pipe_directory() / "control").exists()


def allocate(
    layout: SlotLayout, owner: int, writers: tuple[int, ...], machine: str, device: torch.device
) -> tuple[SlotRegion, RegionHandle]:
    """A zeroed region on `device` and the handle peers map it by."""
    key = secrets.token_hex(8)
    if device.type == "cuda":
        from torch.multiprocessing.reductions import reduce_tensor

        memory_N = torch.zeros(layout.nbytes, dtype=torch.uint8, device=device)
        rebuild, args = reduce_tensor(memory_N)
        shared: tuple[Any, ...] = (rebuild, args)
        gpu: str | None = gpu_uuid(device)
    else:
        fd = os.memfd_create(f"afd-slots-{owner}", os.MFD_CLOEXEC)
        os.ftruncate(fd, layout.nbytes)  # a fresh file reads as zeros
        memory_N = torch.from_file(
            f"/proc/self/fd/{fd}", shared=True, size=layout.nbytes, dtype=torch.uint8
        )
        shared, gpu = (f"/proc/{os.getpid()}/fd/{fd}",), None
        with _own_lock:
            _own_fds[key] = fd  # peers open the file through it; closed by `release`
    with _own_lock:
        _own[key] = memory_N
    handle = RegionHandle(layout, owner, writers, machine, os.getpid(), key, gpu, shared)
    return SlotRegion(layout, memory_N), handle


def open_region(handle: RegionHandle, device: torch.device, machine: str) -> SlotRegion:
    """Maps a peer's region into this process (its own memory when the owner is us)."""
    if handle.machine != machine:
        raise RegionError(
            f"node {handle.owner}'s slots are on machine {handle.machine}, this node is on {machine}: "
            "the device lane joins peers of one host only (use exchange.lane: host across hosts)"
        )
    if handle.pid == os.getpid():
        with _own_lock:
            memory_N = _own.get(handle.key)
        if memory_N is None:
            raise RegionError(f"node {handle.owner}'s region was released")
        return SlotRegion(handle.layout, memory_N)
    if handle.gpu is None:
        if device.type == "cuda":
            raise RegionError(
                f"node {handle.owner}'s slots are in host memory, this node is on {device}"
            )
        (path,) = handle.shared
        try:
            memory_N = torch.from_file(
                path, shared=True, size=handle.layout.nbytes, dtype=torch.uint8
            )
        except (OSError, RuntimeError) as err:
            raise RegionError(f"cannot map node {handle.owner}'s slots at {path}: {err}") from err
        return SlotRegion(handle.layout, memory_N)
    if device.type != "cuda":
        raise RegionError(f"node {handle.owner}'s slots are on a GPU, this node is on {device}")
    if handle.gpu == gpu_uuid(device) and not mps_running():
        raise RegionError(
            f"node {handle.owner} shares this GPU from another process, and CUDA MPS is not running "
            f"(no control pipe in {mps_pipe_directory()}): two processes on one GPU would take "
            "turns in ~2 ms time slices. Start it before the nodes: "
            "`nvidia-cuda-mps-control -d` (docs/deploy.md), or give each node its own GPU"
        )
    rebuild, args = handle.shared
    try:
        memory_N = rebuild(*args)
    except RuntimeError as err:
        raise RegionError(f"cannot map node {handle.owner}'s GPU slots: {err}") from err
    return SlotRegion(handle.layout, memory_N)


def release(handle: RegionHandle) -> None:
    """Forgets our own region (peers' mappings stay valid until they drop them)."""
    with _own_lock:
        _own.pop(handle.key, None)
        fd = _own_fds.pop(handle.key, None)
    if fd is not None:
        os.close(fd)
