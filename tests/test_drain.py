"""The drain against the Call interface it relies on (wind_down, end_now), on Trio's mock clock.

The same drain runs over real sockets and real signals in tests/test_service.py.
"""

from __future__ import annotations

import trio
import trio.testing

from agentd.drain import GOODBYE_GRACE_S, LiveCalls, drain

TIMEOUT_S = 300.0


class FakeCall:
    """A call that ends `ends_after_s` from now, or `goodbye_s` after wind_down, or at once on end_now."""

    def __init__(self, calls: LiveCalls, ends_after_s: float, goodbye_s: float | None = 3.0) -> None:
        self.calls, self.ends_after_s, self.goodbye_s = calls, ends_after_s, goodbye_s
        self.asked: list[str] = []
        self.ended_at: float | None = None
        self.scope = trio.CancelScope(deadline=trio.current_time() + ends_after_s)
        calls.add(self)

    async def run(self) -> None:
        with self.scope:
            await trio.sleep_forever()
        self.ended_at = trio.current_time()
        self.calls.discard(self)

    def wind_down(self, reason: str) -> None:
        self.asked.append(f"wind_down {reason}")
        if self.goodbye_s is not None:
            self.scope.deadline = min(self.scope.deadline, trio.current_time() + self.goodbye_s)

    def end_now(self, reason: str) -> None:
        self.asked.append(f"end_now {reason}")
        self.scope.cancel()


class Server:
    def __init__(self) -> None:
        self.draining = False
        self.calls = LiveCalls()


async def drained(server: Server, calls_ending_after_s: list[float], **call_options) -> tuple[list[FakeCall], float]:
    """Run the drain with calls that end by themselves after the given times; (calls, when the drain returned)."""
    notified = []

    async def on_start() -> None:
        notified.append(server.draining)

    async with trio.open_nursery() as nursery:
        calls = [FakeCall(server.calls, after, **call_options) for after in calls_ending_after_s]
        for call in calls:
            nursery.start_soon(call.run)
        start = trio.current_time()
        await drain(server, TIMEOUT_S, on_start)
        took = trio.current_time() - start
    assert notified == [True], "new calls are refused before anyone hears of the drain"
    return calls, took


async def test_calls_that_end_in_time_are_left_alone(autojump_clock):
    server = Server()
    calls, took = await drained(server, [10.0, 120.0])
    assert [c.asked for c in calls] == [[], []]
    assert took == 120.0 and server.draining


async def test_calls_still_up_at_the_timeout_hear_their_goodbye(autojump_clock):
    server = Server()
    calls, took = await drained(server, [10.0, 1000.0, 2000.0], goodbye_s=3.0)
    assert [c.asked for c in calls] == [[], ["wind_down drain timeout"], ["wind_down drain timeout"]]
    assert took == TIMEOUT_S + 3.0


async def test_a_call_that_ignores_its_goodbye_is_ended_after_the_grace(autojump_clock):
    server = Server()
    calls, took = await drained(server, [1000.0], goodbye_s=None)
    assert calls[0].asked == ["wind_down drain timeout", "end_now shutdown"]
    assert took == TIMEOUT_S + GOODBYE_GRACE_S


async def test_an_idle_server_drains_at_once(autojump_clock):
    _, took = await drained(Server(), [])
    assert took == 0.0


async def test_end_all_ends_every_call_now(autojump_clock):
    calls = LiveCalls()
    async with trio.open_nursery() as nursery:
        fakes = [FakeCall(calls, 1000.0) for _ in range(3)]
        for call in fakes:
            nursery.start_soon(call.run)
        await trio.testing.wait_all_tasks_blocked()
        calls.end_all("shutdown")
        with trio.fail_after(1):
            await calls.wait_empty()
    assert [c.asked for c in fakes] == [["end_now shutdown"]] * 3
    assert {c.ended_at for c in fakes} == {fakes[0].ended_at}
