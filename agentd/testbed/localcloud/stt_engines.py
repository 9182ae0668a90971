"""Speech recognition engines behind localcloud's Speech service.

A `StreamRecognizer` (one per stream, synchronous, no I/O) frames the
decoded 8 kHz PCM, segments it with the energy VAD of `segmenter`, and hands
each voiced segment to a `SegmentDecoder`:

- `ScriptDecoder` answers the n-th segment with the n-th script line,
  revealed one word per `partial_interval_ms` of voiced audio (the n-th of
  the stream, or, with a shared `ScriptCursor`, of the whole localcloud);
  a line marked as continuing makes one result of two segments;
- `PocketsphinxDecoder` runs pocketsphinx's en-us model on the segment.

pocketsphinx is fed 16 kHz audio, linearly upsampled from the 8 kHz phone
audio. Measured on espeak-ng English pushed through mu-law 8 kHz: at
samprate=8000 (model copy with upperf=3500) the hypotheses were nonsense
("what time do you open tomorrow" -> "he or"), upsampled to 16 kHz they keep
most words ("i you put tomorrow", "i would like the book titled or two
people"), because the en-us model was trained on 16 kHz features.

pocketsphinx costs ~0.2 s of CPU per second of audio and a decoder takes
~0.4 s to load, so `cpu_bound` recognizers are driven from a worker thread
by the service, and decoders are pooled per localcloud instance.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from agentd.testbed.localcloud.segmenter import (
    FRAME_MS,
    EnergySegmenter,
    Framer,
    PreRoll,
    SegmentEnded,
    SegmentStarted,
)

PREROLL_FRAMES = 10  # 200 ms of audio before the VAD fired
SCRIPT_STABILITY = 0.9
SCRIPT_CONFIDENCE = 0.95
SPHINX_STABILITY = 0.5
SPHINX_BLOCK_MS = 200  # decode (and maybe emit an interim) once per 200 ms of segment audio


@dataclass(frozen=True, slots=True, kw_only=True)
class Hypothesis:
    """One recognition result; `end_s` is an offset in this stream's audio."""

    transcript: str
    is_final: bool
    stability: float
    confidence: float
    end_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechActivity:
    """Voice activity began (`begin`) or ended at `at_s` in the stream's audio."""

    begin: bool
    at_s: float


RecognitionEvent = Hypothesis | SpeechActivity


class SegmentDecoder(Protocol):
    """Turns one voiced segment at a time into text."""

    stability: float
    confidence: float

    def begin(self, preroll: np.ndarray) -> None:
        """A segment starts; `preroll` is the audio just before it."""

    def frame(self, pcm: np.ndarray, *, voiced_ms: int) -> str | None:
        """Audio inside the segment; returns a new interim transcript or None."""

    def end(self) -> str | None:
        """The segment ended; returns its final transcript, None for no result."""

    def final_sent(self) -> None:
        """The oldest final this decoder produced and not yet reported has reached the client."""

    def close(self) -> None:
        """The stream is over; release resources."""


class StreamRecognizer:
    """Segments one stream's audio and runs a `SegmentDecoder` on each segment.

    Calls are serialized by a lock: a cancelled stream's last `feed` may still
    be running in a worker thread when `close` is called from another.
    """

    def __init__(self, decoder: SegmentDecoder, *, threshold_dbfs: float, gap_ms: int, cpu_bound: bool) -> None:
        self.cpu_bound = cpu_bound
        self._decoder = decoder
        self._framer = Framer()
        self._segmenter = EnergySegmenter(threshold_dbfs=threshold_dbfs, gap_ms=gap_ms)
        self._preroll = PreRoll(PREROLL_FRAMES)
        self._last_interim: str | None = None
        self._lock = threading.Lock()
        self._closed = False

    def feed(self, pcm: np.ndarray) -> list[RecognitionEvent]:
        """Process 8 kHz PCM of any length; returns the events it caused, in order."""
        events: list[RecognitionEvent] = []
        with self._lock:
            if self._closed:
                return events
            for frame in self._framer.push(pcm):
                events.extend(self._frame(frame))
        return events

    def finish(self) -> list[RecognitionEvent]:
        """The audio ended: process the remainder and close any open segment."""
        events: list[RecognitionEvent] = []
        with self._lock:
            if self._closed:
                return events
            for frame in self._framer.drain():
                events.extend(self._frame(frame))
            ended = self._segmenter.close()
            if ended is not None:
                events.extend(self._end(ended))
        return events

    def final_sent(self) -> None:
        """The service delivered the oldest unreported final (finals go out in order).

        Not under the lock: it is cheap, and it is called from the service's loop,
        where a CPU-bound decoder's `feed` may be holding the lock in a worker.
        """
        self._decoder.final_sent()

    def close(self) -> None:
        """Release the decoder; later calls return no events. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._decoder.close()

    def _frame(self, frame: np.ndarray) -> list[RecognitionEvent]:
        was_in_segment = self._segmenter.in_segment
        event = self._segmenter.push(frame)
        if isinstance(event, SegmentEnded):
            self._preroll.push(frame)
            return self._end(event)
        if isinstance(event, SegmentStarted):
            self._decoder.begin(self._preroll.take())
            self._last_interim = None
            return [SpeechActivity(begin=True, at_s=event.start_s), *self._interim(frame)]
        if was_in_segment:
            return self._interim(frame)
        self._preroll.push(frame)
        return []

    def _interim(self, frame: np.ndarray) -> list[RecognitionEvent]:
        text = self._decoder.frame(frame, voiced_ms=self._segmenter.voiced_ms)
        if not text or text == self._last_interim:
            return []
        self._last_interim = text
        hypothesis = Hypothesis(
            transcript=text,
            is_final=False,
            stability=self._decoder.stability,
            confidence=0.0,  # Google leaves confidence at 0 on interim results
            end_s=self._segmenter.position_s,
        )
        return [hypothesis]

    def _end(self, ended: SegmentEnded) -> list[RecognitionEvent]:
        events: list[RecognitionEvent] = [SpeechActivity(begin=False, at_s=ended.end_s)]
        text = self._decoder.end()
        if text:
            events.append(
                Hypothesis(
                    transcript=text,
                    is_final=True,
                    stability=0.0,
                    confidence=self._decoder.confidence,
                    end_s=ended.end_s,
                )
            )
        return events


class ScriptCursor:
    """The script position shared by every stream of one localcloud (`stt_script_shared`).

    Real recognition depends on the audio, not on the stream carrying it: a
    client that replaces a stream (rotation, reconnect) and replays the audio
    no final covered gets the same words again. So a segment takes the line at
    the cursor without moving it, and the cursor moves past a line only when
    that line's final has reached the client (or the line has no words, so
    there is nothing to deliver). A segment whose stream died first -- even
    with its final already made and held back by `stt_final_delay_ms` -- is
    answered with the same line by the next stream.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0

    def peek(self) -> int:
        with self._lock:
            return self._next

    def delivered(self, line: int) -> None:
        with self._lock:
            self._next = max(self._next, line + 1)


CONTINUES = "+"  # a script line starting with this continues the segment before it


class ScriptDecoder:
    """The n-th segment of a stream is answered by the n-th script line.

    While the segment is voiced the line is revealed one word per
    `partial_interval_ms` of voiced audio; past the end of the script,
    segments get no result at all. With a `cursor`, "n-th" counts across
    every stream of the localcloud (see `ScriptCursor`).

    A line that starts with `CONTINUES` ("+ for four people tomorrow.") makes
    one result of two segments, as Google does when a caller's pause is too
    short to close a result: the segment before it ends with no final, and
    this segment's partials and final start with the earlier segment's words.
    Without the marker each segment is a result of its own (Google's
    `is_final` after a pause: it closes a segment, not the caller's turn).
    """

    stability = SCRIPT_STABILITY
    confidence = SCRIPT_CONFIDENCE

    def __init__(self, lines: tuple[str, ...], *, partial_interval_ms: int, cursor: ScriptCursor | None = None) -> None:
        self._lines = lines
        self._interval_ms = partial_interval_ms
        self._cursor = cursor
        self._next_line = 0
        self._line = 0
        self._unsent: deque[int] = deque()  # lines whose finals are made but not yet delivered
        self._carried: list[str] = []  # words of earlier segments of the same result
        self._words: list[str] = []

    def begin(self, preroll: np.ndarray) -> None:
        self._line = self._cursor.peek() if self._cursor is not None else self._next_line
        self._next_line = self._line + 1
        words = self._lines[self._line].split() if self._line < len(self._lines) else []
        if words[:1] == [CONTINUES]:
            words = words[1:]
        else:
            self._carried = []
        self._words = words

    def frame(self, pcm: np.ndarray, *, voiced_ms: int) -> str | None:
        shown = min(len(self._words), voiced_ms // self._interval_ms)
        if not shown:
            return None  # nothing new yet (carried words were already shown before the pause)
        return " ".join(self._carried + self._words[:shown])

    def end(self) -> str | None:
        words = self._carried + self._words
        if self._continued_by_next_line():
            self._carried = words
            if self._cursor is not None:
                self._cursor.delivered(self._line)  # this line has no final of its own to deliver
            return None
        if self._cursor is not None:
            if words:
                self._unsent.append(self._line)
            else:
                self._cursor.delivered(self._line)  # no final to lose: move on now
        return " ".join(words) or None

    def _continued_by_next_line(self) -> bool:
        following = self._line + 1
        return following < len(self._lines) and self._lines[following].split()[:1] == [CONTINUES]

    def final_sent(self) -> None:
        if self._cursor is not None and self._unsent:
            self._cursor.delivered(self._unsent.popleft())

    def close(self) -> None:
        pass


class DecoderPool:
    """Idle pocketsphinx decoders, shared by the streams of one localcloud.

    Loading a decoder costs ~0.4 s, so each is reused by later streams. A
    decoder's cepstral mean adapts to what it heard, which made the same
    audio decode differently depending on the previous stream; `acquire`
    resets it to the model's initial value, so every stream starts equal.
    `acquire` may load a decoder: call it from a worker thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._initial_cmn: str | None = None

    def acquire(self) -> Any:
        with self._lock:
            decoder = self._idle.pop() if self._idle else None
        if decoder is None:
            decoder = _load_decoder()
            with self._lock:
                self._initial_cmn = self._initial_cmn or decoder.get_cmn()
        decoder.set_cmn(self._initial_cmn)
        return decoder

    def release(self, decoder: Any) -> None:
        with self._lock:
            self._idle.append(decoder)


def _load_decoder() -> Any:
    import pocketsphinx  # deferred: only the pocketsphinx engine needs it

    # fwdflat=False: the second (flat-lexicon) pass made finals worse than the
    # interim hypotheses on espeak-ng phone audio ("open tomorrow" -> "tomorrow").
    return pocketsphinx.Decoder(loglevel="ERROR", fwdflat=False)


class PocketsphinxDecoder:
    """Real English recognition of each segment with pocketsphinx (en-us model, 16 kHz)."""

    stability = SPHINX_STABILITY
    confidence = 0.8  # pocketsphinx gives no calibrated confidence without lattices

    def __init__(self, pool: DecoderPool) -> None:
        self._pool = pool
        self._decoder: Any = None
        self._pending: list[np.ndarray] = []
        self._pending_ms = 0
        self._previous_sample = 0
        self._in_utterance = False

    def begin(self, preroll: np.ndarray) -> None:
        if self._decoder is None:
            self._decoder = self._pool.acquire()
        self._decoder.start_utt()
        self._in_utterance = True
        self._previous_sample = int(preroll[0]) if len(preroll) else 0
        self._pending = [preroll]
        self._pending_ms = len(preroll) * 1000 // 8000

    def frame(self, pcm: np.ndarray, *, voiced_ms: int) -> str | None:
        self._pending.append(pcm)
        self._pending_ms += FRAME_MS
        if self._pending_ms < SPHINX_BLOCK_MS:
            return None
        self._decode_pending()
        return self._text()

    def end(self) -> str | None:
        self._decode_pending()
        self._decoder.end_utt()
        self._in_utterance = False
        return self._text()

    def final_sent(self) -> None:
        pass  # the words come from the audio: nothing to keep track of

    def close(self) -> None:
        if self._decoder is not None:
            if self._in_utterance:  # a pooled decoder must be idle for the next start_utt
                self._decoder.end_utt()
                self._in_utterance = False
            self._pool.release(self._decoder)
            self._decoder = None

    def _decode_pending(self) -> None:
        block = np.concatenate(self._pending) if self._pending else np.zeros(0, dtype=np.int16)
        self._pending, self._pending_ms = [], 0
        if len(block):
            upsampled, self._previous_sample = upsample_2x(block, self._previous_sample)
            self._decoder.process_raw(upsampled.tobytes())

    def _text(self) -> str | None:
        hypothesis = self._decoder.hyp()
        if hypothesis is None:
            return None
        return hypothesis.hypstr.strip() or None


def upsample_2x(pcm: np.ndarray, previous: int) -> tuple[np.ndarray, int]:
    """8 -> 16 kHz by linear interpolation, continuous across blocks.

    Each input sample is preceded by the midpoint with the sample before it
    (`previous` for the first); returns the output and the new `previous`.
    Blockwise `pcm.resample` would put an edge artefact every block.
    """
    x = np.asarray(pcm, dtype=np.int32)
    before = np.concatenate(([previous], x[:-1]))
    out = np.empty(2 * len(x), dtype=np.int16)
    out[0::2] = (before + x) // 2
    out[1::2] = x
    return out, int(x[-1]) if len(x) else previous


def open_recognizer(settings: Any, pool: DecoderPool, cursor: ScriptCursor | None = None) -> StreamRecognizer:
    """A recognizer for a new stream, configured from a `LocalCloudSettings` snapshot.

    `cursor` is the localcloud's shared script position, used when `stt_script_shared` is set.
    """
    if settings.stt_engine == "pocketsphinx":
        decoder: SegmentDecoder = PocketsphinxDecoder(pool)
    else:
        shared = cursor if settings.stt_script_shared else None
        decoder = ScriptDecoder(settings.script_lines, partial_interval_ms=settings.stt_partial_interval_ms,
                                cursor=shared)
    return StreamRecognizer(
        decoder,
        threshold_dbfs=settings.stt_vad_threshold_dbfs,
        gap_ms=settings.stt_segment_gap_ms,
        cpu_bound=settings.stt_engine == "pocketsphinx",
    )
