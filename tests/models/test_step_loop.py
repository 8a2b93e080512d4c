"""The node step loop alone, with in-process fakes for the step and the peers' calls."""

from __future__ import annotations

import threading
from collections.abc import Callable

from afd.models.messages import AttentionStepResult, NewRequest, StepTimings
from afd.models.sampling import SamplingParams
from afd.models.step_loop import StepLoop

TIMEOUT_S = 30.0


def _result(tokens: int = 1) -> AttentionStepResult:
    return AttentionStepResult([], StepTimings(), tokens, 0, 0, 0, 0)


def test_the_step_loop_never_admits_a_request_aborted_while_queued() -> None:
    seen: list[tuple[list[str], list[str]]] = []
    first_step_running, release = threading.Event(), threading.Event()

    def step(step_id: int, new: list[NewRequest], aborts: list[str]) -> AttentionStepResult:
        seen.append(([r.request_id for r in new], aborts))
        first_step_running.set()
        release.wait(TIMEOUT_S)
        return _result()

    params = SamplingParams(max_tokens=1)
    loop = StepLoop("test", step, lambda: False, lambda r: r.tokens == 0)
    loop.run_from(0)
    try:
        loop.submit([NewRequest("a", [1], params)], [])
        assert first_step_running.wait(TIMEOUT_S)
        loop.submit([NewRequest("b", [1], params)], [])
        loop.submit([], ["b"])  # while "a"'s step runs: "b" is still queued
        release.set()
        results: list = []
        while len(results) < 2:
            results += loop.poll(TIMEOUT_S).results
    finally:
        release.set()
        loop.stop()
    assert seen == [(["a"], []), ([], ["b"])]
    assert [s for s, _ in results] == [0, 1]


def test_a_failed_step_is_reported_after_the_results_before_it_and_run_from_goes_on() -> None:
    fail_at = {2}

    def step(step_id: int, new: list[NewRequest], aborts: list[str]) -> AttentionStepResult:
        if step_id in fail_at:
            fail_at.clear()
            raise RuntimeError("a peer is gone")
        return _result()

    work = [3]  # steps left to run

    def has_work() -> bool:
        return work[0] > 0

    def counted(step_id: int, new: list[NewRequest], aborts: list[str]) -> AttentionStepResult:
        result = step(step_id, new, aborts)
        work[0] -= 1
        return result

    loop = StepLoop("test", counted, has_work, lambda r: False)
    loop.run_from(0)
    try:
        loop.submit([], [])
        results: list = []
        while True:
            report = loop.poll(TIMEOUT_S)
            results += report.results
            if report.state.error is not None:
                break
        assert [s for s, _ in results] == [0, 1]
        assert not report.state.running and "a peer is gone" in report.state.error
        loop.run_from(7)  # recovered: on from step 7, where the failed step's work waits
        while len(results) < 3:
            results += loop.poll(TIMEOUT_S).results
        assert [s for s, _ in results] == [0, 1, 7] and loop.state().error is None
    finally:
        loop.stop()


class _Calls:
    """A peer's calls to steps, as the exchange's control round would bring them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.called: set[int] = set()

    def call(self, step: int) -> None:
        with self.cond:
            self.called.add(step)
            self.cond.notify_all()

    def join(self, step: int, look_up: Callable[[], bool]) -> bool:
        with self.cond:
            self.cond.wait_for(lambda: step in self.called or look_up(), 0.05)
            return step in self.called

    def interrupt(self) -> None:
        with self.cond:
            self.cond.notify_all()


def test_an_idle_node_runs_the_steps_a_peer_calls_it_to_and_a_paused_one_starts_none() -> None:
    ran: list[tuple[int, list[str]]] = []

    def step(step_id: int, new: list[NewRequest], aborts: list[str]) -> AttentionStepResult:
        ran.append((step_id, [r.request_id for r in new]))
        return _result(0)

    calls = _Calls()
    loop = StepLoop("test", step, lambda: False, lambda r: True, calls.join, calls.interrupt)
    loop.run_from(5)
    try:
        assert loop.poll(0.1).results == [] and loop.state().parked  # nothing: no step
        calls.call(5)  # a peer has work: this node runs step 5, empty
        assert [s for s, _ in loop.poll(TIMEOUT_S).results] == [5]
        loop.pause()
        loop.submit([NewRequest("x", [1], SamplingParams(max_tokens=1))], [])
        assert loop.poll(0.1).results == []  # paused: it starts no step of its own...
        calls.call(6)  # ...but joins a peer's, taking its queued work along
        assert [s for s, _ in loop.poll(TIMEOUT_S).results] == [6]
        assert ran[-1] == (6, ["x"])
        loop.halt()
        assert loop.poll(TIMEOUT_S).state.halted
        calls.call(7)
        assert loop.poll(0.1).results == []  # halted: not even a call moves it
        loop.run_from(7)
        assert [s for s, _ in loop.poll(TIMEOUT_S).results] == [7]
    finally:
        loop.stop()


def test_a_paused_node_still_finishes_the_step_it_launched_ahead() -> None:
    """A node that launched a step ahead has opened it on its peers: paused, it still runs
    the step that reads it (and is not parked meanwhile), then starts nothing more."""
    launched = [True]
    ran: list[int] = []

    def step(step_id: int, new: list[NewRequest], aborts: list[str]) -> AttentionStepResult:
        ran.append(step_id)
        launched[0] = False  # read, and nothing launched after it: the node is paused
        return _result()

    calls = _Calls()
    loop = StepLoop(
        "test",
        step,
        lambda: False,  # no work of its own: unpaused, only a call would run a step
        lambda r: False,
        calls.join,
        calls.interrupt,
        finishing=lambda: launched[0],
    )
    loop.run_from(3)
    loop.pause()  # now the launched step must be finished, with no call
    try:
        assert [s for s, _ in loop.poll(TIMEOUT_S).results] == [3]
        assert loop.poll(0.1).results == [] and loop.state().parked
        assert loop.state().next_step == 4 and ran == [3]
    finally:
        loop.stop()
