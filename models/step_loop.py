"""A node's own step loop: the thread that runs its steps, so that no driver is in the step.

Work comes in by `submit` and results go out by `poll`, in batches, whenever the orchestrator
asks; a step never waits for either. A node with nothing to run sleeps: alone (a colocated
attention node), until work comes; with peers, until work comes or a peer calls it to the next
step (`join`, the exchange's control round: `afd.transport.step_control`), which it then runs,
empty if need be, so that every node runs every step in lockstep.

Between steps the orchestrator may stop the cluster at a common step (a boundary: rewiring, a
placement switch, a trace): `pause` stops a node starting steps of its own (it still answers
calls); once every node is parked at the same step, none can start another, and `halt` makes
each leave its wait until `run_from` lets it go on. A step that fails ends the thread; its
error is reported by `poll` once the results before it are taken, and `run_from` starts the
loop again after the orchestrator has recovered the cluster.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from afd.models.messages import NewRequest

Result = TypeVar("Result")

# waits for a peer's call to `step` until the predicate holds; True: called
Join = Callable[[int, Callable[[], bool]], bool]


@dataclass(frozen=True, slots=True)
class LoopState:
    next_step: int
    parked: bool  # between steps, waiting for work or a call (or halted)
    halted: bool  # stopped between steps by `halt`, until `run_from`
    running: bool  # the thread is alive
    error: str | None = None  # what ended the thread, if a step failed


@dataclass(frozen=True, slots=True)
class LoopReport(Generic[Result]):
    """The steps run since the last poll, as (step, result), and where the loop is now."""

    results: list[tuple[int, Result]] = field(default_factory=list)
    state: LoopState = LoopState(0, True, False, False)


class StepLoop(Generic[Result]):
    """Runs `step(step_id, new, aborts)` on a thread of its own while there is work: requests
    and aborts queued by `submit`, or what the node still holds (`has_work()`).
    `stalled(result)`: the step ran nothing, so only new work or a call can change that (a
    sequence the cache cannot hold yet must not spin the loop)."""

    def __init__(
        self,
        name: str,
        step: Callable[[int, list[NewRequest], list[str]], Result],
        has_work: Callable[[], bool],
        stalled: Callable[[Result], bool],
        join: Join | None = None,
        interrupt: Callable[[], None] = lambda: None,
        finishing: Callable[[], bool] = lambda: False,
    ) -> None:
        """`finishing()`: the node has a step under way that it must finish even while
        paused (a step launched ahead, already opened on its peers)."""
        self._name, self._step, self._has_work, self._stalled_by = name, step, has_work, stalled
        self._join, self._interrupt, self._finishing = join, interrupt, finishing
        self._cond = threading.Condition()
        self._new: list[NewRequest] = []
        self._aborts: list[str] = []
        self._outbox: list[tuple[int, Result]] = []
        self._next = 0
        self._error: str | None = None
        self._thread: threading.Thread | None = None
        self._stopping = self._paused = self._halting = self._halted = False
        self._parked = True
        self._stalled = False

    # ---- the orchestrator's side -------------------------------------------------------------
    def run_from(self, step: int) -> None:
        """Runs from `step` on: the first start, after a halt, or after a failed step. (A
        loop that runs and is not halted is only let go on, paused no more, if `step` is the
        one it is at.)"""
        with self._cond:
            if self._thread is not None and self._thread.is_alive() and not self._halted:
                if step != self._next:
                    raise RuntimeError(
                        f"{self._name}: run_from({step}) while the loop runs at {self._next}"
                    )
                self._paused = self._halting = False
                self._cond.notify_all()
                return
            self._next, self._error = step, None
            self._paused = self._halting = self._halted = False
            self._stalled = False
            self._cond.notify_all()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def submit(self, new: list[NewRequest], aborts: list[str]) -> None:
        with self._cond:
            gone = set(aborts)  # an abort also cancels a request still queued here
            self._new = [r for r in (*self._new, *new) if r.request_id not in gone]
            self._aborts += aborts
            self._stalled = False
            self._cond.notify_all()
        self._interrupt()

    def poll(self, timeout_s: float) -> LoopReport[Result]:
        """The results since the last poll (waiting up to `timeout_s` for one) and the state."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._outbox or self._error is not None or self._halted, timeout_s
            )
            out, self._outbox = self._outbox, []
            return LoopReport(out, self._state())

    def state(self) -> LoopState:
        with self._cond:
            return self._state()

    @property
    def paused(self) -> bool:
        """Paused for a boundary (the node's step reads it: it launches nothing ahead then)."""
        return self._paused

    def pause(self) -> None:
        """Starts no step of its own from now on; still answers calls."""
        with self._cond:
            self._paused = True
            self._cond.notify_all()
        self._interrupt()

    def halt(self) -> None:
        """Leaves the wait between steps until `run_from` (call once every node is paused and
        parked at the same step: then no call can come)."""
        with self._cond:
            self._halting = True
            self._cond.notify_all()
        self._interrupt()

    def stop(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._interrupt()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ---- the loop's side -----------------------------------------------------------------
    def _state(self) -> LoopState:
        alive = self._thread is not None and self._thread.is_alive()
        return LoopState(self._next, self._parked or not alive, self._halted, alive, self._error)

    def _ready(self) -> bool:
        """Work to start a step on (read without the lock by the join's predicate: a change
        is always followed by `_interrupt`, which makes the join look again)."""
        if self._paused:
            return self._finishing()
        return bool(self._new or self._aborts) or (self._has_work() and not self._stalled)

    def _look_up(self) -> bool:
        return self._stopping or self._halting or self._ready()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._parked = True
                self._cond.notify_all()
                while not self._stopping and (
                    self._halting or (self._join is None and not self._ready())
                ):
                    self._halted = self._halting
                    self._cond.notify_all()
                    self._cond.wait()
                self._halted = False
                if self._stopping:
                    return
                ready, step = self._ready(), self._next
                # decided on work of its own: no longer parked, in the same breath, so that an
                # orchestrator seeing every node parked knows none is about to start a step
                self._parked = not ready
            try:
                if not ready:
                    assert self._join is not None
                    if not self._join(step, self._look_up):
                        continue  # work of its own, a halt or a stop: look again
                with self._cond:
                    self._parked = False  # called: the caller is not parked, so no halt now
                    new, aborts, self._new, self._aborts = self._new, self._aborts, [], []
                result = self._step(step, new, aborts)
            except BaseException as err:
                with self._cond:
                    self._error = f"{type(err).__name__}: {err}"
                    self._parked = True
                    self._cond.notify_all()
                return
            with self._cond:
                self._stalled = self._stalled_by(result)
                self._outbox.append((step, result))
                self._next = step + 1
                self._cond.notify_all()
