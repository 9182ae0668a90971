"""Energy voice-activity segmentation of 8 kHz PCM, pure and synchronous.

Both STT engines cut a stream into voiced segments the same way, so the n-th
segment means the same thing to the `script` engine and to `pocketsphinx`:

- audio is judged in 20 ms frames; a frame is *voiced* when its RMS level is
  at or above `threshold_dbfs` (-45 dBFS suits phone audio: mu-law idle noise
  sits far below it, espeak-ng and real voices far above);
- a segment starts at the first of `start_frames` consecutive voiced frames
  (one click does not open a segment);
- it ends once `gap_ms` of unvoiced audio has followed its last voiced frame;
  its `end_s` is the end of that last voiced frame, not the end of the gap.

Times are offsets in the stream's audio (seconds), never wall-clock time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from agentd.codecs.pcm import rms_dbfs

SAMPLE_RATE_HZ = 8000
FRAME_MS = 20
FRAME_SAMPLES = SAMPLE_RATE_HZ * FRAME_MS // 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class SegmentStarted:
    """Voice began at `start_s` (the first voiced frame of the run)."""

    start_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SegmentEnded:
    """The segment that began at `start_s` had its last voiced frame end at `end_s`."""

    start_s: float
    end_s: float


class Framer:
    """Cuts PCM of any length into whole 20 ms frames, keeping the remainder."""

    def __init__(self) -> None:
        self._rest = np.zeros(0, dtype=np.int16)

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        """All complete frames now available, oldest first."""
        data = np.concatenate((self._rest, np.asarray(pcm, dtype=np.int16)))
        whole = len(data) - len(data) % FRAME_SAMPLES
        self._rest = data[whole:]
        return [data[i : i + FRAME_SAMPLES] for i in range(0, whole, FRAME_SAMPLES)]

    def drain(self) -> list[np.ndarray]:
        """The remainder, zero-padded to one frame (or nothing)."""
        if len(self._rest) == 0:
            return []
        frame = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        frame[: len(self._rest)] = self._rest
        self._rest = np.zeros(0, dtype=np.int16)
        return [frame]


class EnergySegmenter:
    """Turns a sequence of 20 ms frames into segment start/end events."""

    def __init__(self, *, threshold_dbfs: float = -45.0, gap_ms: int = 300, start_frames: int = 2) -> None:
        self._threshold_dbfs = threshold_dbfs
        self._gap_frames = max(1, -(-gap_ms // FRAME_MS))
        self._start_frames = start_frames
        self._frames_seen = 0
        self._voiced_run = 0
        self._segment_start: int | None = None  # frame index
        self._last_voiced: int = -1  # frame index
        self._voiced_frames = 0

    @property
    def in_segment(self) -> bool:
        return self._segment_start is not None

    @property
    def voiced_ms(self) -> int:
        """Voiced audio so far in the current segment (0 outside one)."""
        return self._voiced_frames * FRAME_MS

    @property
    def position_s(self) -> float:
        """Offset of the end of the last frame pushed."""
        return self._frames_seen * FRAME_MS / 1000

    def push(self, frame: np.ndarray) -> SegmentStarted | SegmentEnded | None:
        """Judge one 20 ms frame; returns the event it causes, if any."""
        index = self._frames_seen
        self._frames_seen += 1
        voiced = rms_dbfs(frame) >= self._threshold_dbfs
        self._voiced_run = self._voiced_run + 1 if voiced else 0
        if self._segment_start is None:
            return self._maybe_start(index)
        if voiced:
            self._last_voiced = index
            self._voiced_frames += 1
            return None
        if index - self._last_voiced >= self._gap_frames:
            return self.close()
        return None

    def close(self) -> SegmentEnded | None:
        """End the open segment now (stream over); None if none is open."""
        if self._segment_start is None:
            return None
        event = SegmentEnded(start_s=self._seconds(self._segment_start), end_s=self._seconds(self._last_voiced + 1))
        self._segment_start = None
        self._voiced_frames = 0
        return event

    def _maybe_start(self, index: int) -> SegmentStarted | None:
        if self._voiced_run < self._start_frames:
            return None
        self._segment_start = index - self._start_frames + 1
        self._last_voiced = index
        self._voiced_frames = self._start_frames
        return SegmentStarted(start_s=self._seconds(self._segment_start))

    @staticmethod
    def _seconds(frame_index: int) -> float:
        return frame_index * FRAME_MS / 1000


class PreRoll:
    """The last few frames before a segment starts (onsets are quieter than -45 dBFS)."""

    def __init__(self, frames: int) -> None:
        self._frames: deque[np.ndarray] = deque(maxlen=frames)

    def push(self, frame: np.ndarray) -> None:
        self._frames.append(frame)

    def take(self) -> np.ndarray:
        """The buffered audio, oldest first; empties the buffer."""
        audio = np.concatenate(self._frames) if self._frames else np.zeros(0, dtype=np.int16)
        self._frames.clear()
        return audio
