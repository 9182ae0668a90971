"""The TX queue: every byte agentd sends to Twilio leaves through here.

One object per call owns the WebSocket's write side (a single serialized
writer, as in trio-websocket). Agent audio is queued as 160-byte frames and
paced out: the first ``lead_frames`` of a burst go at once (Twilio buffers
them, so network jitter never starves playback), then ``frames_per_message``
frames per message on an absolute schedule -- a message leaves when its
first frame is due -- so Twilio's buffer stays ``lead_frames`` to
``ahead_frames`` ahead and a ``clear`` discards at most that much. Two frames
per message halve the pacer's wake-ups and sends (each ~25 us at 100 calls)
and cost no latency: the lead goes at once and a ``clear`` jumps the queue.

Policy (bounded, named, counted):
- The queue holds ``capacity_frames``; a producer that is ahead (TTS is
  faster than real time) *waits* -- agent speech is never dropped for that.
- Frames are dropped only when the link to Twilio stalls: a frame already
  ``max_lag_s`` late is discarded rather than bursting stale audio; every
  drop is counted.
- ``clear()`` empties the queue and sends Twilio ``clear`` ahead of anything
  queued; producers of the abandoned audio are fenced off by an epoch.

Queue items are frames (``bytes``), in-order control messages (``str``, e.g.
marks) and hooks (callables run when the pacer reaches them, for telemetry).
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Iterable

import trio

from agentd.metronome import Alarm, Metronome

FRAME_S = 0.02
MAX_BATCH_FRAMES = 10  # frames due together leave in one media message of at most 200 ms
_LATE_BINS = 101

Item = bytes | str | Callable[[], None]


class TxQueue:
    """Paced, bounded outbound audio for one call. Run ``run()`` in the call's nursery."""

    def __init__(self, send: Callable[[str], Awaitable[None]], render_media: Callable[[bytes], str],
                 *, metronome: Metronome, capacity_frames: int = 120, lead_frames: int = 5, max_lag_s: float = 0.5,
                 frames_per_message: int = 1):
        self._send = send
        self._metronome = metronome
        self._render_media = render_media
        self.capacity_frames = capacity_frames
        self.lead_frames = lead_frames
        self.frames_per_message = min(frames_per_message, MAX_BATCH_FRAMES)
        self._max_lag_s = max_lag_s
        self._items: collections.deque[Item] = collections.deque()
        self._frames_queued = 0
        self._urgent: collections.deque[str] = collections.deque()
        self._pacer_wakeup = trio.lowlevel.ParkingLot()  # the pacer waits here for items
        self._alarm: Alarm | None = None  # ... and on this for a frame's due time
        self._space = trio.lowlevel.ParkingLot()
        self._burst_t0 = float("-inf")
        self._grid_t0 = float("-inf")  # burst_t0 on the metronome's grid: paced frames are due on it
        self._burst_k = 0
        self._underrun = True  # the queue ran out of frames since the last one sent
        self.epoch = 0
        self.frames_sent = 0
        self.drops = 0
        # Pacing jitter: how late each frame left after it was both due and queued, in whole ms
        # (last bin: >= _LATE_BINS - 1 ms). A frame the producer delivered after its due time (TTS
        # between sentences) is late by the producer's gap, which Twilio's lead buffer absorbs; that
        # is not the pacer's lateness, so it counts from when the frame arrived.
        self._lateness_ms = [0] * _LATE_BINS
        self._refilled_at = float("-inf")  # when the last frame landed in an empty queue

    # -- producers ---------------------------------------------------------

    @property
    def queued_frames(self) -> int:
        return self._frames_queued

    @property
    def ahead_frames(self) -> int:
        """The most audio, in frames, that has left ahead of its playback time (all of it a `clear` discards)."""
        return self.lead_frames + self.frames_per_message - 1

    async def put_frames(self, frames: Iterable[bytes], *, epoch: int) -> None:
        """Queue frames for playback, waiting for room; frames of an old epoch are discarded."""
        for frame in frames:
            while self._frames_queued >= self.capacity_frames and epoch == self.epoch:
                await self._space.park()
            if epoch != self.epoch:
                return
            if not self._frames_queued:
                self._refilled_at = trio.current_time()
            self._items.append(frame)
            self._frames_queued += 1
            self._pacer_wakeup.unpark_all()

    def put_control(self, message: str, *, epoch: int) -> None:
        """Queue a message (e.g. a mark) to go out after the frames queued so far."""
        if epoch == self.epoch:
            self._items.append(message)
            self._pacer_wakeup.unpark_all()

    def put_hook(self, hook: Callable[[], None], *, epoch: int) -> None:
        """Run ``hook()`` when playback-send reaches this point of the queue."""
        if epoch == self.epoch:
            self._items.append(hook)
            self._pacer_wakeup.unpark_all()

    def clear(self, clear_message: str) -> int:
        """Drop everything queued, fence off its producers, send ``clear_message`` first."""
        dropped = self._frames_queued
        self._items.clear()
        self._frames_queued = 0
        self.epoch += 1
        self._burst_t0, self._underrun = float("-inf"), True
        self._urgent.append(clear_message)
        self._space.unpark_all()
        self._wake_for_urgent()
        return dropped

    def send_now(self, message: str) -> None:
        """Send a message ahead of the queue (out-of-band control)."""
        self._urgent.append(message)
        self._wake_for_urgent()

    def _wake_for_urgent(self) -> None:
        self._pacer_wakeup.unpark_all()
        if self._alarm is not None:
            self._alarm.ring()

    # -- the pacer (the only writer) ----------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            while self._urgent:
                await self._send(self._urgent.popleft())
            if not self._items:
                self._underrun = True
                await self._pacer_wakeup.park()
                continue
            item = self._items[0]
            if isinstance(item, bytes):
                await self._send_frame_on_time()
            else:
                self._items.popleft()
                if isinstance(item, str):
                    await self._send(item)
                else:
                    item()

    async def _send_frame_on_time(self) -> None:
        now = trio.current_time()
        if self._underrun and now > self._burst_t0 + self._burst_k * FRAME_S:
            # We ran out of audio and Twilio's buffer has played dry: new burst, fresh lead.
            self._burst_t0, self._burst_k = now, 0
            self._grid_t0 = self._metronome.align(now)
        self._underrun = False
        due = self._due(self._burst_k)
        while trio.current_time() < due:
            self._alarm = self._metronome.alarm(due)
            try:
                await self._alarm.wait()  # an urgent `clear` rings it early
            finally:
                self._alarm = None
            if self._urgent or not self._items or not isinstance(self._items[0], bytes):
                return
        now = trio.current_time()
        if now - due > self._max_lag_s:
            self._take_frame()
            self.drops += 1  # the link stalled: stale audio is worse than a gap
            self._burst_k += 1
            return
        batch = self._take_due_frames(now)
        await self._send(self._render_media(b"".join(batch)))
        self.frames_sent += len(batch)

    def _due(self, k: int) -> float:
        """When frame ``k`` of the burst is due.

        Frames 0..lead-1 are due at once; frame k >= lead is due (k - lead + 1) * 20 ms after the
        burst began, counted from the grid (at most one tick later; the lead covers it).
        """
        paced = k + 1 - self.lead_frames
        return self._grid_t0 + paced * FRAME_S if paced > 0 else self._burst_t0

    def _take_due_frames(self, now: float) -> list[bytes]:
        """The next frame and the queued frames right behind it that are due by ``now`` too, or
        that make up the message's ``frames_per_message``.

        They leave as one media message (Twilio plays a payload of any length
        in order): the lead of a burst, or audio that arrived after its due
        time, costs one WebSocket message instead of one per 20 ms. A mark or
        hook in the queue ends the batch, so the order on the wire is exact.
        """
        batch: list[bytes] = []
        while True:
            late_ms = int((now - max(self._due(self._burst_k), self._refilled_at)) * 1000)
            self._lateness_ms[min(max(late_ms, 0), _LATE_BINS - 1)] += 1
            batch.append(self._take_frame())
            self._burst_k += 1
            if (len(batch) >= MAX_BATCH_FRAMES or not self._items or not isinstance(self._items[0], bytes)
                    or (self._due(self._burst_k) > now and len(batch) >= self.frames_per_message)):
                return batch

    def _take_frame(self) -> bytes:
        frame = self._items.popleft()
        assert isinstance(frame, bytes)
        self._frames_queued -= 1
        self._space.unpark_all()
        return frame

    def lateness_summary(self) -> dict[str, int]:
        """Pacing jitter: p50/p99/max of how late frames left, in ms (bounded histogram)."""
        total = sum(self._lateness_ms)
        if not total:
            return {}
        summary, seen = {}, 0
        for ms, count in enumerate(self._lateness_ms):
            seen += count
            for name, q in (("p50", 0.5), ("p99", 0.99)):
                if name not in summary and seen >= q * total:
                    summary[name] = ms
            if count:
                summary["max"] = ms
        return summary
