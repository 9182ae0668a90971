"""One process-wide clock that every call's TX pacer sleeps on.

Why not ``trio.sleep_until`` per frame: a Trio sleep is a cancel scope with a
deadline, and its expiry is a ``Cancelled`` exception raised into the task,
caught, and left behind as a reference cycle for the garbage collector. At
50 frames a second per call that was the largest single CPU cost of a
200-call process and a main source of long GC pauses (bench/RESULTS.md).

Here a sleeper is a heap entry and a parked task: ``Metronome.run`` (one task
per process) sleeps until the earliest entry is due and reschedules every
sleeper due by then, so the Trio deadline machinery runs once per tick for
all calls instead of once per frame per call. Due times are meant to lie on
a grid of ``tick_s`` (see ``align``): pacers that share a tick wake in one
pass, and calls spread over the grid's phases.

A sleeper can be woken early (``Alarm.ring``), e.g. when a ``clear`` must go
out now. Cancellation works as for any Trio sleep.
"""

from __future__ import annotations

import heapq
import itertools
import math

import trio

TICK_S = 0.005


class Alarm:
    """One pending wake-up of one task; ring() wakes it now (no-op once woken)."""

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None

    def ring(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        self._task = trio.lowlevel.current_task()

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class Metronome:
    """Wakes sleepers at their due times; run ``run()`` once, in the server's nursery."""

    def __init__(self, tick_s: float = TICK_S) -> None:
        self.tick_s = tick_s
        self._heap: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()  # ties: first come, first woken
        self._changed = trio.lowlevel.ParkingLot()
        self._sleeping_until = math.inf  # when run() wakes next on its own

    def __repr__(self) -> str:
        return f"<Metronome tick={self.tick_s * 1000:g}ms sleepers={len(self._heap)}>"

    def align(self, t: float) -> float:
        """The first grid time at or after ``t`` (a whisker of float error is forgiven)."""
        return math.ceil(t / self.tick_s - 1e-6) * self.tick_s

    def alarm(self, at: float) -> Alarm:
        """An alarm due at ``at``; ``await alarm.wait()`` sleeps until then or until rung."""
        alarm = Alarm()
        heapq.heappush(self._heap, (at, next(self._order), alarm))
        if at < self._sleeping_until:
            self._changed.unpark_all()
        return alarm

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                heapq.heappop(heap)[2].ring()
            self._sleeping_until = heap[0][0] if heap else math.inf
            with trio.move_on_at(self._sleeping_until):
                await self._changed.park()
