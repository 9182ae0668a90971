"""The TX queue: pacing, back-pressure, ordering, `clear`, and drops on a stalled link.

Every test runs on Trio's autojump MockClock, so "at once" and "every 20 ms"
are exact virtual times, never wall-clock tolerances. The wire is a fake
`send` that records (virtual time, message); frames are rendered as "f<index>"
so the tests can say exactly which frame went out when.
"""

from __future__ import annotations

import math

import pytest
import trio

from agentd.metronome import Metronome
from agentd.tx import TxQueue

FRAME_S = 0.02
GUARD_S = 60  # virtual seconds: a hang fails the test instead of blocking it
PLENTY_S = 10  # virtual seconds: long enough for any queue in these tests to drain


def frame(index: int) -> bytes:
    """A 160-byte frame that carries its index, so the wire shows which frame it was."""
    return index.to_bytes(4, "big") * 40


def frames(start: int, stop: int) -> list[bytes]:
    return [frame(i) for i in range(start, stop)]


def render(data: bytes) -> str:
    """One media message: frames due together share one ("f3+f4+f5"); the wire counts each frame."""
    return "+".join(f"f{int.from_bytes(data[i:i + 4], 'big')}" for i in range(0, len(data), 160))


class Wire:
    """A fake WebSocket send: records (trio time, frame or control message); can stall on one.

    ``sent`` has one entry per frame, ``messages_sent`` one per WebSocket message."""

    def __init__(self, *, stall_on: str | None = None, stall_s: float = 0.0):
        self.sent: list[tuple[float, str]] = []
        self.messages_sent: list[str] = []
        self._stall_on = stall_on
        self._stall_s = stall_s
        self.observers: list = []

    async def send(self, message: str) -> None:
        self.messages_sent.append(message)
        parts = message.split("+")
        for part in parts:
            self.sent.append((trio.current_time(), part))
            for observe in self.observers:
                observe(part)
        if self._stall_on in parts:
            await trio.sleep(self._stall_s)

    def messages(self) -> list[str]:
        return [message for _, message in self.sent]

    def frame_times(self) -> dict[str, float]:
        return {message: at for at, message in self.sent if message.startswith("f")}

    def time_of(self, wanted: str) -> float:
        return next(at for at, message in self.sent if message == wanted)


def times(start: float, *offsets: float) -> list[float]:
    return [pytest.approx(start + offset) for offset in offsets]


async def started(nursery: trio.Nursery, wire: Wire, **options) -> TxQueue:
    metronome = Metronome()
    await nursery.start(metronome.run)
    tx = TxQueue(wire.send, render, metronome=metronome, **options)
    await nursery.start(tx.run)
    return tx


async def test_a_burst_sends_the_lead_at_once_then_one_frame_per_20_ms(autojump_clock):
    wire = Wire()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            tx = await started(nursery, wire, lead_frames=5)
            t0 = trio.current_time()
            await tx.put_frames(frames(0, 12), epoch=tx.epoch)
            await trio.sleep(PLENTY_S)
            nursery.cancel_scope.cancel()

    assert wire.messages() == [f"f{i}" for i in range(12)]
    sent_at = [at for at, _ in wire.sent]
    assert sent_at[:5] == times(t0, 0, 0, 0, 0, 0), "the first lead_frames go at once"
    assert sent_at[5:] == times(t0, *(FRAME_S * k for k in range(1, 8))), "then exactly one per 20 ms"
    assert tx.frames_sent == 12 and tx.drops == 0



async def test_paced_frames_can_leave_two_per_message_each_pair_when_its_first_frame_is_due(autojump_clock):
    wire = Wire()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            tx = await started(nursery, wire, lead_frames=3, frames_per_message=2)
            t0 = trio.current_time()
            await tx.put_frames(frames(0, 10), epoch=tx.epoch)
            await trio.sleep(PLENTY_S)
            nursery.cancel_scope.cancel()

    assert wire.messages_sent == ["f0+f1+f2", "f3+f4", "f5+f6", "f7+f8", "f9"]
    times_sent = wire.frame_times()
    # f3 is due 20 ms after the burst began, f5 at 60 ms, ...: one message per 40 ms, never late,
    # so Twilio holds between lead_frames and ahead_frames of audio.
    assert [times_sent[f"f{k}"] for k in (0, 3, 5, 7, 9)] == times(t0, 0, 0.02, 0.06, 0.10, 0.14)
    assert tx.ahead_frames == 4
    assert tx.lateness_summary()["max"] == 0


async def test_frames_due_together_leave_in_one_message_and_a_mark_ends_the_batch(autojump_clock):
    wire = Wire()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            tx = await started(nursery, wire, lead_frames=5)
            await tx.put_frames(frames(0, 3), epoch=tx.epoch)
            tx.put_control("mark-a", epoch=tx.epoch)
            await tx.put_frames(frames(3, 7), epoch=tx.epoch)
            await trio.sleep(PLENTY_S)
            nursery.cancel_scope.cancel()

    # The lead (f0..f4) is due at once but split by the mark; f5, f6 are paced one per message.
    assert wire.messages_sent == ["f0+f1+f2", "mark-a", "f3+f4", "f5", "f6"]
    assert tx.frames_sent == 7


async def test_audio_that_arrives_after_its_due_time_leaves_at_once_in_one_message(autojump_clock):
    wire = Wire()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            tx = await started(nursery, wire, lead_frames=2)
            await tx.put_frames(frames(0, 3), epoch=tx.epoch)
            await trio.sleep(3 * FRAME_S)  # f2 went at its time; Twilio still plays the lead
            t_late = trio.current_time()
            await tx.put_frames(frames(3, 6), epoch=tx.epoch)  # f3 was due already, f4 due now
            await trio.sleep(PLENTY_S)
            nursery.cancel_scope.cancel()

    assert wire.messages_sent == ["f0+f1", "f2", "f3+f4", "f5"]
    assert wire.frame_times()["f3"] == pytest.approx(t_late)


async def test_a_producer_ahead_of_real_time_waits_for_room_and_nothing_is_dropped(autojump_clock):
    wire = Wire()
    capacity = 10
    backlog: list[int] = []
    returned_after: list[int] = []
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            tx = await started(nursery, wire, lead_frames=2, capacity_frames=capacity)
            wire.observers.append(lambda _: backlog.append(tx.queued_frames))
            await tx.put_frames(frames(0, 50), epoch=tx.epoch)
            returned_after.append(tx.frames_sent)
            await trio.sleep(PLENTY_S)
            nursery.cancel_scope.cancel()

    assert wire.messages() == [f"f{i}" for i in range(50)], "every frame, in order"
    assert tx.drops == 0 and tx.frames_sent == 50
    assert max(backlog) <= capacity, "the queue never held more than capacity_frames"
    assert returned_after[0] >= 50 - capacity, "put_frames returned only once the rest fitted"


async def test_marks_and_hooks_go_out_in_order_after_the_frames_queued_before_them(autojump_clock):
    wire = Wire()
    hook_ran: list[tuple[float, int]] = []
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            tx = await started(nursery, wire, lead_frames=2)
            epoch = tx.epoch
            await tx.put_frames(frames(0, 8), epoch=epoch)
            tx.put_control("mark-a", epoch=epoch)
            tx.put_hook(lambda: hook_ran.append((trio.current_time(), len(wire.sent))), epoch=epoch)
            await tx.put_frames(frames(8, 11), epoch=epoch)
            tx.put_control("mark-b", epoch=epoch)
            await trio.sleep(PLENTY_S)
            nursery.cancel_scope.cancel()

    assert wire.messages() == [*(f"f{i}" for i in range(8)), "mark-a", "f8", "f9", "f10", "mark-b"]
    sent = wire.frame_times()
    [(hook_at, sent_before_hook)] = hook_ran
    assert sent_before_hook == 9, "the hook ran after f0..f7 and mark-a, before f8"
    assert sent["f7"] <= hook_at < sent["f8"]
    assert wire.time_of("mark-a") == sent["f7"], "a mark does not wait for playback"
    assert tx.frames_sent == 11


async def test_clear_goes_out_first_and_empties_the_queue(autojump_clock):
    wire = Wire()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            tx = await started(nursery, wire, lead_frames=5)
            old = tx.epoch
            await tx.put_frames(frames(0, 30), epoch=old)
            tx.put_control("mark-old", epoch=old)
            await trio.sleep(0.05)  # f0..f6 are out, f7 is due at +0.06
            cleared_at = trio.current_time()
            dropped = tx.clear("clear")
            assert tx.queued_frames == 0
            new = tx.epoch
            tx.put_control("mark-stale", epoch=old)  # the old reply's mark arrives late
            await tx.put_frames(frames(100, 103), epoch=new)
            await trio.sleep(PLENTY_S)
            nursery.cancel_scope.cancel()

    messages = wire.messages()
    assert messages == [*(f"f{i}" for i in range(7)), "clear", "f100", "f101", "f102"]
    assert new != old and dropped == 30 - 7
    assert wire.time_of("clear") == pytest.approx(cleared_at), "clear does not wait for the frames' pacing"
    assert tx.frames_sent == 10


async def test_clear_fences_off_a_producer_that_was_waiting_for_room(autojump_clock):
    wire = Wire()
    outcome: dict[str, object] = {}
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            tx = await started(nursery, wire, lead_frames=2, capacity_frames=10)

            async def old_reply(epoch: int) -> None:
                await tx.put_frames(frames(0, 100), epoch=epoch)  # parks: 100 > capacity
                outcome["returned_at"] = trio.current_time()
                tx.put_control("mark-old", epoch=epoch)
                tx.put_hook(lambda: outcome.setdefault("old_hook_ran", True), epoch=epoch)

            t0 = trio.current_time()
            nursery.start_soon(old_reply, tx.epoch)
            await trio.sleep_until(t0 + 0.11)  # between two frame slots
            assert tx.queued_frames == 10, "the old reply is parked on a full queue"
            cleared_at = trio.current_time()
            tx.clear("clear")
            await tx.put_frames(frames(500, 503), epoch=tx.epoch)
            await trio.sleep(PLENTY_S)
            nursery.cancel_scope.cancel()

    messages = wire.messages()
    after_clear = messages[messages.index("clear") + 1:]
    assert after_clear == ["f500", "f501", "f502"], "nothing of the old epoch after clear"
    assert "mark-old" not in messages and "old_hook_ran" not in outcome
    assert outcome["returned_at"] == pytest.approx(cleared_at), "the parked producer was released, not stuck"


async def test_after_the_queue_runs_dry_and_twilio_drains_the_next_reply_gets_a_fresh_lead(autojump_clock):
    wire = Wire()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            tx = await started(nursery, wire, lead_frames=5)
            t0 = trio.current_time()
            await tx.put_frames(frames(0, 10), epoch=tx.epoch)  # plays until t0 + 0.2
            await trio.sleep_until(t0 + 1.0)
            await tx.put_frames(frames(10, 20), epoch=tx.epoch)
            await trio.sleep(PLENTY_S)
            nursery.cancel_scope.cancel()

    sent = wire.frame_times()
    second = [sent[f"f{i}"] for i in range(10, 20)]
    assert second == times(t0 + 1.0, 0, 0, 0, 0, 0, 0.02, 0.04, 0.06, 0.08, 0.10)


async def test_a_reply_that_arrives_before_twilio_drains_continues_the_schedule(autojump_clock):
    wire = Wire()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            tx = await started(nursery, wire, lead_frames=5)
            t0 = trio.current_time()
            await tx.put_frames(frames(0, 10), epoch=tx.epoch)  # f9 goes at +0.10, plays until +0.20
            await trio.sleep_until(t0 + 0.15)
            await tx.put_frames(frames(10, 16), epoch=tx.epoch)
            await trio.sleep(PLENTY_S)
            nursery.cancel_scope.cancel()

    sent = wire.frame_times()
    # f10 and f11 are late for their slots (+0.12, +0.14) and go at once; then the
    # 20 ms cadence resumes: Twilio still holds audio, so no second full lead is sent.
    assert [sent[f"f{i}"] for i in range(10, 16)] == times(t0, 0.15, 0.15, 0.16, 0.18, 0.20, 0.22)


async def test_a_stalled_link_drops_frames_that_are_too_late_and_counts_them(autojump_clock):
    stall_s, max_lag_s, total = 2.0, 0.45, 150
    wire = Wire(stall_on="f10", stall_s=stall_s)
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            tx = await started(nursery, wire, lead_frames=5, capacity_frames=200, max_lag_s=max_lag_s)
            t0 = trio.current_time()
            await tx.put_frames(frames(0, total), epoch=tx.epoch)
            await trio.sleep(PLENTY_S)
            nursery.cancel_scope.cancel()

    sent = wire.frame_times()
    # f10 was handed to the link at +0.12 and the link came back at +2.12. Frame k's
    # slot is +0.02*(k-4); frames whose slot is over 0.45 s before +2.12 (k <= 87) are
    # stale and dropped; f88 (0.44 s late) onward still play.
    resumed = sorted(sent, key=lambda m: int(m[1:]))
    assert resumed == [f"f{i}" for i in [*range(11), *range(88, total)]]
    assert tx.drops == 88 - 11
    assert tx.frames_sent == len(sent) == total - tx.drops
    assert sent["f88"] == pytest.approx(t0 + 0.12 + stall_s)
    for index in range(88, total):
        slot = t0 + FRAME_S * (index - 4)
        assert sent[f"f{index}"] - slot <= max_lag_s, f"f{index} was sent more than max_lag_s late"


async def test_pacing_lateness_is_summarized_per_call(autojump_clock):
    sent: list[tuple[float, str]] = []

    async def send(message: str) -> None:
        sent.append((trio.current_time(), message))

    metronome = Metronome()
    tx = TxQueue(send, lambda frame: "media", metronome=metronome, capacity_frames=10, lead_frames=2)
    assert tx.lateness_summary() == {}
    async with trio.open_nursery() as nursery:
        await nursery.start(metronome.run)
        await nursery.start(tx.run)
        await tx.put_frames([b"\xff" * 160] * 6, epoch=tx.epoch)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert tx.frames_sent == 6
    assert tx.lateness_summary() == {"p50": 0, "p99": 0, "max": 0}  # a virtual clock is never late


async def test_a_burst_that_starts_between_metronome_ticks_sends_its_lead_at_once_and_paces_on_the_grid(autojump_clock):
    wire = Wire()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            tx = await started(nursery, wire, lead_frames=2)
            await trio.sleep(0.0123)  # off the 5 ms grid
            t0 = trio.current_time()
            await tx.put_frames(frames(0, 5), epoch=tx.epoch)
            await trio.sleep(PLENTY_S)
            nursery.cancel_scope.cancel()

    sent_at = [at for at, _ in wire.sent]
    assert sent_at[:2] == times(t0, 0, 0), "the lead does not wait for a tick"
    grid_t0 = math.ceil(t0 / 0.005) * 0.005  # the first 5 ms tick after t0
    assert sent_at[2:] == [pytest.approx(grid_t0 + FRAME_S * k) for k in (1, 2, 3)]


async def test_a_producer_gap_within_the_lead_is_not_counted_as_pacing_lateness(autojump_clock):
    wire = Wire()
    async with trio.open_nursery() as nursery:
        tx = await started(nursery, wire, lead_frames=5)
        await tx.put_frames(frames(0, 6), epoch=tx.epoch)  # the 6th frame is due at +20 ms
        await trio.sleep(0.07)  # the next sentence's audio comes 50 ms after its first frame was due
        await tx.put_frames(frames(6, 9), epoch=tx.epoch)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert tx.frames_sent == 9
    assert wire.sent[6][0] - wire.sent[0][0] == pytest.approx(0.07), "the late frame goes as soon as it arrives, on the old schedule"
    assert tx.lateness_summary()["max"] == 0, "the pacer sent it the moment it could"
