"""Release and wait on sequence words: the only synchronisation of the device lane.

`release` stores a round's sequence number into a peer's word after the slot's bytes (stream
order puts it after the copies that filled the slot). `wait` returns once every word of a set
reached the round's number, or this node's abort word is set, or its deadline passed; in the
last two cases it records why in the status word, and every later wait of the step returns at
once. The caller checks the status word when the step is over (`check`): a step that did not
get its data is thrown away whole.

The round's number is computed from a step counter in device memory, so a CUDA graph captured
once serves every step. On CUDA both are one-CTA Triton kernels (the wait spins on volatile
loads and reads the GPU's global timer for its deadline). On CPU the same protocol runs on the
host over shared memory, and a failed wait raises at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from afd.transport.endpoint import TransportError
from afd.transport.slots import WaitStatus

_SPIN_S = 200e-6  # a host wait spins this long before it starts to sleep between looks
_NAP_S = 50e-6

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import globaltimer

    @triton.jit(do_not_specialize=["num_layers", "layer", "timeout_ns"])
    def _wait_kernel(
        words_ptr,
        n_words,
        step_ptr,
        num_layers,
        layer,
        control_ptr,
        timeout_ns,
        BLOCK: tl.constexpr,
    ):
        offs = tl.arange(0, BLOCK)
        expected = tl.load(step_ptr) * num_layers + layer + 1
        start = globaltimer()
        status = tl.load(control_ptr + 1, volatile=True)
        words = tl.load(words_ptr + offs, mask=offs < n_words, other=expected, volatile=True)
        seen = tl.min(words, axis=0)
        while (seen < expected) & (status == 0):
            aborted = tl.load(control_ptr, volatile=True) != 0
            late = (globaltimer() - start) > timeout_ns
            status = tl.where(aborted, 1, tl.where(late, 2, 0)).to(tl.int64)
            words = tl.load(words_ptr + offs, mask=offs < n_words, other=expected, volatile=True)
            seen = tl.min(words, axis=0)
        if status != 0:
            tl.atomic_cas(control_ptr + 1, status * 0, status, sem="relaxed", scope="gpu")

    @triton.jit(do_not_specialize=["num_layers", "layer"])
    def _release_kernel(word_ptr, step_ptr, num_layers, layer, control_ptr):
        # a node that is being aborted (or is capturing a graph), or whose step already lost a
        # wait, writes no word: the peer's round must not look complete (nor hold what the
        # failed step made of stale rows)
        aborted = tl.load(control_ptr, volatile=True)
        failed = tl.load(control_ptr + 1, volatile=True)
        if (aborted == 0) & (failed == 0):
            seq = tl.load(step_ptr) * num_layers + layer + 1
            tl.atomic_xchg(word_ptr, seq, sem="release", scope="sys")

    HAVE_KERNELS = True
except ImportError:  # a CPU machine without Triton: the host path only
    HAVE_KERNELS = False


class LaneTimeout(TransportError):
    """A device-lane wait did not see its peers' words (deadline or abort)."""


def release(
    word_1: torch.Tensor, step_1: torch.Tensor, num_layers: int, layer: int, control_2: torch.Tensor
) -> None:
    """Publishes round (step, layer) in a peer's word, unless our abort word is set or a wait
    of this step failed. The step
    counter's device says where this runs: a GPU kernel may write a word in pinned host memory
    (the proxy lane's)."""
    if step_1.is_cuda:
        _release_kernel[(1,)](word_1, step_1, num_layers, layer, control_2)
        return
    if int(control_2[0]) == 0 and int(control_2[1]) == 0:
        word_1.fill_(int(step_1[0]) * num_layers + layer + 1)


def wait(
    words_P: torch.Tensor,
    step_1: torch.Tensor,
    num_layers: int,
    layer: int,
    control_2: torch.Tensor,
    timeout_s: float,
) -> None:
    """Until every word in `words_P` reached round (step, layer); see the module docstring.
    On the GPU when the step counter is there, wherever the words are."""
    if step_1.is_cuda:
        block = max(16, triton.next_power_of_2(words_P.numel()))
        _wait_kernel[(1,)](
            words_P,
            words_P.numel(),
            step_1,
            num_layers,
            layer,
            control_2,
            int(timeout_s * 1e9),
            BLOCK=block,
        )
        return
    expected = int(step_1[0]) * num_layers + layer + 1
    start = time.monotonic()
    while True:
        if int(control_2[1]) != 0:
            raise LaneTimeout(f"round {expected}: an earlier wait of this step failed")
        if int(words_P.min()) >= expected:
            return
        waited = time.monotonic() - start
        status = WaitStatus.OK
        if int(control_2[0]) != 0:
            status = WaitStatus.ABORTED
        elif waited > timeout_s:
            status = WaitStatus.DEADLINE
        if status != WaitStatus.OK:
            control_2[1] = int(status)
            raise LaneTimeout(_explain(status, expected, words_P, timeout_s))
        if waited > _SPIN_S:
            time.sleep(min(_NAP_S * 20, max(_NAP_S, waited / 100)))


class AbortSwitch:
    """Sets a node's abort word from any thread while its stream may be spinning in a wait.

    On CUDA the word is written by a copy from pinned host memory on a stream of its own,
    made up front: a copy runs beside the spinning kernel, whereas a kernel launched for the
    first time would wait for the GPU to go idle while CUDA loads its code (lazy loading)."""

    def __init__(self, control_2: torch.Tensor) -> None:
        self.control_2 = control_2
        if control_2.is_cuda:
            self._stream = torch.cuda.Stream(control_2.device)
            self._one = torch.ones(1, dtype=control_2.dtype).pin_memory()

    def set(self) -> None:
        if not self.control_2.is_cuda:
            self.control_2[0] = 1
            return
        with torch.cuda.stream(self._stream):
            self.control_2[0:1].copy_(self._one, non_blocking=True)


def check(
    control_2: torch.Tensor, what: str, failure: Callable[[], str | None] | None = None
) -> None:
    """Raises if a wait of the step just run ended without its data (one host read);
    `failure()`: what the lane knows went wrong besides, added to the message."""
    status = int(control_2[1])
    if status != WaitStatus.OK:
        known = None if failure is None else failure()
        cause = "" if known is None else f" ({known})"
        raise LaneTimeout(f"{what}: {_explain(WaitStatus(status), None, None, None)}{cause}")


def _explain(
    status: WaitStatus,
    expected: int | None,
    words_P: torch.Tensor | None,
    timeout_s: float | None,
) -> str:
    if status == WaitStatus.ABORTED:
        return "the step was aborted"
    seen = "" if words_P is None else f" (words seen: {words_P.tolist()}, expected {expected})"
    limit = "" if timeout_s is None else f" within {timeout_s:g} s"
    return f"a peer did not deliver its round{limit}{seen}"
