"""The shared metronome that TX pacers sleep on: due times, order, early wake-ups, cancellation.

All on Trio's autojump MockClock: "at 0.035" is an exact virtual time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from agentd.metronome import Metronome

GUARD_S = 60


@asynccontextmanager
async def running_metronome() -> AsyncIterator[tuple[trio.Nursery, Metronome, float]]:
    """A running Metronome, the nursery it runs in and the time it started; on exit, the nursery is cancelled."""
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            metronome = Metronome()
            await nursery.start(metronome.run)
            yield nursery, metronome, trio.current_time()
            nursery.cancel_scope.cancel()


async def sleeper(metronome: Metronome, at: float, woke: list[tuple[str, float]], name: str) -> None:
    await metronome.alarm(at).wait()
    woke.append((name, trio.current_time()))


def test_align_rounds_up_to_the_grid_and_keeps_grid_times():
    metronome = Metronome(tick_s=0.005)
    assert metronome.align(0.0) == 0.0
    assert metronome.align(0.0011) == pytest.approx(0.005)
    assert metronome.align(0.02) == pytest.approx(0.02), "0.02 / 0.005 is 4.000...01 in floats: still on the grid"
    assert metronome.align(1.2349) == pytest.approx(1.235)


async def test_sleepers_wake_at_their_due_times_in_time_order(autojump_clock):
    woke: list[tuple[str, float]] = []
    async with running_metronome() as (nursery, metronome, t0):
        for name, offset in (("late", 0.04), ("early", 0.01), ("same-as-early", 0.01)):
            nursery.start_soon(sleeper, metronome, t0 + offset, woke, name)
        await trio.sleep(1)
    assert dict(woke) == {"early": pytest.approx(t0 + 0.01), "same-as-early": pytest.approx(t0 + 0.01),
                          "late": pytest.approx(t0 + 0.04)}
    assert woke[-1][0] == "late"


async def test_an_earlier_sleeper_arriving_while_the_metronome_waits_for_a_later_one_is_not_late(autojump_clock):
    woke: list[tuple[str, float]] = []
    async with running_metronome() as (nursery, metronome, t0):
        nursery.start_soon(sleeper, metronome, t0 + 0.5, woke, "far")
        await trio.sleep(0.1)
        nursery.start_soon(sleeper, metronome, t0 + 0.12, woke, "near")
        await trio.sleep(1)
    assert woke == [("near", pytest.approx(t0 + 0.12)), ("far", pytest.approx(t0 + 0.5))]


async def test_ringing_an_alarm_wakes_its_sleeper_now_and_its_due_time_later_does_nothing(autojump_clock):
    woke_at: list[float] = []
    async with running_metronome() as (nursery, metronome, t0):
        alarm = metronome.alarm(t0 + 0.3)

        async def wait_then_sleep_past_the_old_due_time() -> None:
            await alarm.wait()
            woke_at.append(trio.current_time())
            await trio.sleep(1)  # a stale ring at +0.3 would raise inside trio's sleep

        nursery.start_soon(wait_then_sleep_past_the_old_due_time)
        await trio.sleep(0.1)
        alarm.ring()
        alarm.ring()  # a second ring is harmless
        await trio.sleep(2)
    assert woke_at == [pytest.approx(t0 + 0.1)]


async def test_a_cancelled_sleeper_leaves_and_is_not_woken_later(autojump_clock):
    woke: list[tuple[str, float]] = []
    async with running_metronome() as (nursery, metronome, t0):
        with trio.move_on_after(0.05) as scope:
            await metronome.alarm(t0 + 0.2).wait()
        assert scope.cancelled_caught
        nursery.start_soon(sleeper, metronome, t0 + 0.3, woke, "next")
        await trio.sleep(1)
    assert woke == [("next", pytest.approx(t0 + 0.3))]
