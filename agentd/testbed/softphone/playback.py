"""Twilio's outbound playback buffer and the call recording, as sans-I/O objects.

Theory of operation
-------------------
Twilio queues every outbound `media` payload (any size) and plays the queue at
real time, 160 bytes of mu-law per 20 ms. A `mark` sits in the queue at its
position; Twilio echoes it when playback reaches it. `clear` empties the queue
and echoes every mark still pending at once -- the documented quirk that makes
an echoed mark weak evidence that audio was heard.

The softphone drives time in 20 ms *slots*. At the start of slot k the driver
calls `play_slot(k * 20)`: marks whose audio has finished are returned for
echoing, and the next 160 bytes are taken for slot k. Time enters only through
arguments (`at_ms`, media time since the stream started), so tests can drive
this object by hand and the driver owns the clock.

Fine print, chosen to match what a listener would observe:
- A mark that lands in the middle of a 160-byte frame is echoed at the end of
  that frame (the next slot), so marks are late by < 20 ms, never early.
- A mark sent while nothing is queued or playing is echoed immediately.
- A short tail (< 160 bytes) is played padded with line silence.
- `clear` stops playback: a mark sent right after it is echoed immediately.
"""

from collections import deque
from dataclasses import dataclass

import numpy as np

from agentd.codecs.mulaw import FRAME_BYTES, SAMPLE_RATE_HZ, SILENCE_BYTE, ulaw_decode
from agentd.codecs.riff import PCM, build_wav

SLOT_MS = FRAME_BYTES * 1000 // SAMPLE_RATE_HZ  # 20


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotPlayback:
    """What the simulated Twilio plays in one 20 ms slot.

    `frame` is 160 bytes (agent audio padded with line silence) or None when
    nothing was queued; `audio_bytes` counts the real agent bytes in it;
    `marks` are the names to echo now, in queue order.
    """

    frame: bytes | None
    audio_bytes: int
    marks: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Mark:
    name: str


class PlaybackBuffer:
    """Twilio's outbound queue: audio chunks and marks, drained one slot at a time."""

    def __init__(self) -> None:
        self._queue: deque[bytes | _Mark] = deque()
        self._queued_bytes = 0
        self._due: list[str] = []  # marks crossed inside the frame now playing
        self._playing = False  # a frame occupies the current slot
        self._last_activity_ms: float | None = None

    def __repr__(self) -> str:
        return f"<PlaybackBuffer queued={self._queued_bytes}B items={len(self._queue)} playing={self._playing}>"

    @property
    def queued_bytes(self) -> int:
        """Audio bytes waiting to be played (marks not counted)."""
        return self._queued_bytes

    def append_audio(self, payload: bytes, *, at_ms: float) -> None:
        """Queue an outbound media payload received `at_ms` into the stream."""
        if payload:
            self._queue.append(bytes(payload))
            self._queued_bytes += len(payload)
        self._touch(at_ms)

    def add_mark(self, name: str) -> tuple[str, ...]:
        """Queue a mark; returns it at once (to echo now) if nothing is queued or playing."""
        if not self._queue and not self._playing:
            return (name,)
        self._queue.append(_Mark(name))
        return ()

    def clear(self) -> tuple[str, ...]:
        """Empty the queue and stop playback; returns every pending mark, to echo now."""
        pending = self._due + [item.name for item in self._queue if isinstance(item, _Mark)]
        self._queue.clear()
        self._queued_bytes = 0
        self._due = []
        self._playing = False
        return tuple(pending)

    def play_slot(self, at_ms: float) -> SlotPlayback:
        """Advance playback to the slot starting `at_ms` and take its frame."""
        marks = self._due
        self._due = []
        while self._queue and isinstance(self._queue[0], _Mark):
            marks.append(self._queue.popleft().name)
        frame = self._take_frame()
        self._playing = bool(frame)
        if not frame:
            return SlotPlayback(frame=None, audio_bytes=0, marks=tuple(marks))
        self._touch(at_ms + SLOT_MS)  # the agent is audible until this frame ends
        padded = frame + bytes([SILENCE_BYTE]) * (FRAME_BYTES - len(frame))
        return SlotPlayback(frame=padded, audio_bytes=len(frame), marks=tuple(marks))

    def quiet_ms(self, now_ms: float) -> float:
        """How long the agent has been silent: nothing queued or playing, and no media arriving.

        0 while audio is queued or playing; infinity if the agent never sent anything.
        """
        if self._queued_bytes or self._playing:
            return 0.0
        if self._last_activity_ms is None:
            return float("inf")
        return max(0.0, now_ms - self._last_activity_ms)

    def _take_frame(self) -> bytes:
        frame = bytearray()
        while self._queue and len(frame) < FRAME_BYTES:
            head = self._queue.popleft()
            if isinstance(head, _Mark):
                self._due.append(head.name)  # reached inside this frame: echo when it ends
                continue
            need = FRAME_BYTES - len(frame)
            frame += head[:need]
            if len(head) > need:
                self._queue.appendleft(head[need:])
        self._queued_bytes -= len(frame)
        return bytes(frame)

    def _touch(self, at_ms: float) -> None:
        if self._last_activity_ms is None or at_ms > self._last_activity_ms:
            self._last_activity_ms = at_ms


class Recording:
    """Both sides of the call on one timeline of 20 ms slots (mu-law, one frame per slot)."""

    def __init__(self) -> None:
        self._caller = bytearray()
        self._agent = bytearray()

    def add_slot(self, *, caller: bytes | None, agent: bytes | None) -> None:
        """Record one slot; None (or a short frame) is filled with line silence."""
        self._caller += _fit(caller)
        self._agent += _fit(agent)

    @property
    def slots(self) -> int:
        return len(self._caller) // FRAME_BYTES

    @property
    def caller_mulaw(self) -> bytes:
        return bytes(self._caller)

    @property
    def agent_mulaw(self) -> bytes:
        return bytes(self._agent)

    def stereo_pcm16(self) -> bytes:
        """Interleaved little-endian PCM16 at 8 kHz: left = caller, right = agent."""
        both = np.stack([ulaw_decode(bytes(self._caller)), ulaw_decode(bytes(self._agent))], axis=1)
        return both.astype("<i2").tobytes()

    def stereo_wav(self) -> bytes:
        """The recording as a stereo 8 kHz PCM16 WAV file (left = caller, right = agent)."""
        return build_wav(self.stereo_pcm16(), format_tag=PCM, channels=2, sample_rate_hz=SAMPLE_RATE_HZ,
                         bits_per_sample=16)


def _fit(frame: bytes | None) -> bytes:
    frame = (frame or b"")[:FRAME_BYTES]
    return frame + bytes([SILENCE_BYTE]) * (FRAME_BYTES - len(frame))
