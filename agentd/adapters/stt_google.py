"""Google Speech-to-Text v1 over raw gRPC: one streaming recognizer per call.

The caller's audio is batched to ``batch_ms`` requests (Google wants 20-100 ms
per request) and keeps flowing while the agent speaks, because Google aborts a
stream that hears nothing for ~10 s. Results become FSM events: ``Partial``
(throttled to one per ``partial_debounce_ms``) and ``Final``. A result's
``result_end_time`` is an offset in *this stream's* audio; it is mapped back to
the call clock through the receive time of the stream's first audio byte.

Opening is retried ``open_attempts`` times; then ``SttLost`` tells the FSM to
use the non-blocking fallback (unary ``Recognize`` of the buffered utterance,
through the gRPC bridge, so off the Trio thread) and streaming is tried again
after a back-off. A stream that dies young without delivering a final counts
as a failed attempt too, so a fault that kills every stream (even on the
replay) backs off instead of reconnecting in a tight loop. Every new stream is
first fed the caller audio no final covers yet, less old line silence.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio
from google.cloud.speech_v1.types import cloud_speech

from agentd import fsm, logsafe
from agentd.config import Config
from agentd.errors import UpstreamUnavailable
from agentd.metrics import count_upstream_error
from agentd.adapters.grpc_bridge import Channel, RpcFailure

log = logging.getLogger(__name__)

_SERVICE = "/google.cloud.speech.v1.Speech/"
_Request = cloud_speech.StreamingRecognizeRequest.pb()
_Response = cloud_speech.StreamingRecognizeResponse.pb()
_StreamingConfig = cloud_speech.StreamingRecognitionConfig.pb()
_RecognitionConfig = cloud_speech.RecognitionConfig.pb()
_RecognizeRequest = cloud_speech.RecognizeRequest.pb()
_RecognizeResponse = cloud_speech.RecognizeResponse.pb()
_BYTES_PER_S = 8000  # mu-law 8 kHz
_HISTORY_S = 30.0  # caller audio kept for the fallback and for replay
_MAX_REPLAY_S = 15.0  # unfinalized audio kept to replay into a new stream
_REPLAY_GAP_S = 1.0  # caller silence (VAD) that separates a replay from older audio
_REPLAY_PREROLL_S = 0.5  # of that silence, kept in front of the speech that follows
_FRAME_S = 0.02
_RECOGNIZE_RETRY_S = 0.1  # first pause before retrying an UNAVAILABLE fallback (doubling, to 1 s)
_ROTATE_GRACE_S = 45.0  # how long a rotation may wait for the caller to be quiet
_ROTATE_HARD_S = 295.0  # Google ends a stream at ~305 s of audio
_ROTATE_POLL_S = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class SttSettings:
    language: str
    model: str
    use_enhanced: bool
    automatic_punctuation: bool
    batch_ms: int
    partial_debounce_ms: int
    open_attempts: int
    open_timeout_s: float
    retry_after_s: float
    rotate_after_s: float
    fallback_timeout_s: float

    @classmethod
    def from_config(cls, config: Config, language: str) -> SttSettings:
        """The ``[stt]`` section of the loaded config, recognizing ``language`` (the business's)."""
        s = config.stt
        return cls(language=language, model=s.model, use_enhanced=s.use_enhanced,
                   automatic_punctuation=s.automatic_punctuation, batch_ms=s.batch_ms,
                   partial_debounce_ms=s.partial_debounce_ms, open_attempts=s.open_attempts,
                   open_timeout_s=s.open_timeout_ms / 1000, retry_after_s=s.retry_after_ms / 1000,
                   rotate_after_s=s.rotate_after_s, fallback_timeout_s=s.fallback_timeout_ms / 1000)


@dataclass(frozen=True, slots=True)
class SttResult:
    text: str
    is_final: bool
    end_offset_s: float


# -------------------------------------------------------- pure protobuf ---

def _recognition_config(settings: SttSettings) -> object:
    return _RecognitionConfig(
        encoding=_RecognitionConfig.AudioEncoding.MULAW,
        sample_rate_hertz=8000,
        language_code=settings.language,
        model=settings.model,
        use_enhanced=settings.use_enhanced,
        enable_automatic_punctuation=settings.automatic_punctuation,
    )


def config_request(settings: SttSettings) -> bytes:
    """The first request of a stream: only ``streaming_config``."""
    streaming = _StreamingConfig(
        config=_recognition_config(settings), interim_results=True, single_utterance=False
    )
    return _Request(streaming_config=streaming).SerializeToString()


def audio_request(audio: bytes) -> bytes:
    """Every later request: only ``audio_content``."""
    return _Request(audio_content=audio).SerializeToString()


def recognize_request(settings: SttSettings, audio: bytes) -> bytes:
    return _RecognizeRequest(
        config=_recognition_config(settings), audio={"content": audio}
    ).SerializeToString()


def parse_streaming_response(data: bytes) -> list[SttResult]:
    """Transcript results of one StreamingRecognizeResponse (events and empties skipped)."""
    response = _Response.FromString(data)
    if response.HasField("error") and response.error.code:
        raise UpstreamUnavailable(f"STT error {response.error.code}: {logsafe.redact(response.error.message)}")
    results = []
    for result in response.results:
        if not result.alternatives:
            continue
        end = result.result_end_time
        results.append(SttResult(
            text=result.alternatives[0].transcript,
            is_final=result.is_final,
            end_offset_s=end.seconds + end.nanos / 1e9,
        ))
    return results


def parse_recognize_response(data: bytes) -> str:
    response = _RecognizeResponse.FromString(data)
    parts = [r.alternatives[0].transcript for r in response.results if r.alternatives]
    return " ".join(p.strip() for p in parts if p.strip())


# ------------------------------------------------------------ recognizer ---

class StreamingRecognizer:
    """One call's recognizer: push audio synchronously, run() reports events.

    ``is_quiet`` (the call's VAD: is the caller silent now?) picks quiet moments
    to rotate streams and marks the line silence a replay may skip; without it
    a stream rotates whenever due and every unfinalized chunk is replayed.
    """

    def __init__(self, channel: Channel, settings: SttSettings, emit: Callable[[fsm.Event], None],
                 *, is_quiet: Callable[[], bool] | None = None):
        self._channel = channel
        self._settings = settings
        self._emit = emit
        self._batch_bytes = max(settings.batch_ms * 8, 160)
        self._pending = bytearray()
        self._pending_at: float | None = None
        self._history: collections.deque[tuple[float, bytes]] = collections.deque()
        # (received at, audio, the caller was quiet): sent, but no final covers it yet
        self._unfinalized: collections.deque[tuple[float, bytes, bool]] = collections.deque()
        self._is_quiet = is_quiet
        self._stream = None
        self._stream_t0: float | None = None
        self._last_partial_at = float("-inf")
        self._held_partial: fsm.Partial | None = None
        self.streams_opened = 0
        self.on_stream_open: Callable[[float], None] = lambda at: None

    # -- audio in (sync: called by the reader for every media frame) --------

    def push_audio(self, audio: bytes, at: float) -> None:
        """Queue caller audio received at ``at``; sends a request every batch_ms."""
        self._history.append((at, audio))
        while self._history and self._history[0][0] < at - _HISTORY_S:
            self._history.popleft()
        if self._pending_at is None:
            self._pending_at = at
        self._pending += audio
        if len(self._pending) >= self._batch_bytes:
            self._flush()

    def _flush(self) -> None:
        """Send the batch, and keep it until a final result covers it (for replay)."""
        if not self._pending:
            return
        at = self._pending_at if self._pending_at is not None else trio.current_time()
        chunk = bytes(self._pending)
        self._pending.clear()
        self._pending_at = None
        self._unfinalized.append((at, chunk, self._is_quiet is not None and self._is_quiet()))
        while self._unfinalized and self._unfinalized[0][0] < at - _MAX_REPLAY_S:
            self._unfinalized.popleft()
        if self._stream is not None:
            if self._stream_t0 is None:
                self._stream_t0 = at
            self._stream.send_nowait(audio_request(chunk))

    def _finalized_until(self, audio_end_at: float) -> None:
        """A final covers the audio up to ``audio_end_at``: no need to replay it."""
        while self._unfinalized:
            at, chunk, _quiet = self._unfinalized[0]
            if at + len(chunk) / _BYTES_PER_S > audio_end_at + _FRAME_S:
                break
            self._unfinalized.popleft()

    def _trim_replay(self) -> None:
        """Drop unfinalized audio from before the caller's last long silence, but its pre-roll.

        No final covers line silence, so it piles up while the agent talks;
        replayed whole it would eat the new stream's duration limit (a stream
        rotated after rotate_after_s could start seconds from the limit). Speech
        before a silence of _REPLAY_GAP_S has had its chance at a final (the
        recognizer closes a segment at a much shorter pause), so it goes too.
        """
        chunks = list(self._unfinalized)
        cut, run_start, run_s = 0, None, 0.0
        for index, (_at, chunk, quiet) in enumerate([*chunks, (0.0, b"", False)]):  # a sentinel ends the last run
            if quiet:
                run_start = index if run_start is None else run_start
                run_s += len(chunk) / _BYTES_PER_S
                continue
            if run_start is not None and run_s >= _REPLAY_GAP_S:
                cut, kept_s = index, 0.0
                while cut > run_start and kept_s < _REPLAY_PREROLL_S:
                    cut -= 1
                    kept_s += len(chunks[cut][1]) / _BYTES_PER_S
            run_start, run_s = None, 0.0
        for _ in range(cut):
            self._unfinalized.popleft()

    def audio_between(self, start_at: float, end_at: float) -> bytes:
        """Buffered caller audio received between two call-clock instants."""
        return b"".join(chunk for at, chunk in self._history if start_at <= at <= end_at)

    # -- fallback ------------------------------------------------------------

    async def recognize(self, audio: bytes) -> str:
        """Unary Recognize of a whole utterance (the fallback); raises UpstreamUnavailable.

        The fallback runs exactly when the service is in trouble, often while it
        comes back (a restart, a network blip): an UNAVAILABLE answer is retried
        until fallback_timeout_s has passed, rather than losing the turn at once.
        """
        request = recognize_request(self._settings, audio)
        deadline = trio.current_time() + self._settings.fallback_timeout_s
        pause_s = _RECOGNIZE_RETRY_S
        while True:
            try:
                data = await self._channel.unary(_SERVICE + "Recognize", request,
                                                 timeout_s=max(deadline - trio.current_time(), _RECOGNIZE_RETRY_S))
                return parse_recognize_response(data)
            except RpcFailure as exc:
                if exc.code != "UNAVAILABLE" or trio.current_time() + pause_s >= deadline:
                    count_upstream_error("stt", "recognize")
                    raise UpstreamUnavailable(f"STT Recognize failed: {exc}") from exc
            await trio.sleep(pause_s)
            pause_s = min(2 * pause_s, 1.0)

    # -- streaming -----------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep a stream open for the life of the call: rotate it before Google's
        ~305 s limit, reconnect when it dies, degrade to the fallback when it
        cannot be opened. Every new stream is first fed the audio that no final
        result covered yet, so nothing the caller said is lost in between."""
        task_status.started()
        failures = 0
        previous = stream = None
        try:
            while True:
                stream = self._open()
                if previous is not None:
                    previous.cancel()  # the new stream is open (and replayed): retire the old
                    previous = None
                opened_at = trio.current_time()
                outcome = await self._pump(stream, opened_at)
                if outcome == "rotate":
                    previous, failures = stream, 0
                    continue
                self._stream = None
                stream.cancel()
                if outcome == "heard" or trio.current_time() - opened_at > self._settings.open_timeout_s:
                    failures = 0
                    continue  # a stream that worked and then died: reopen (and replay) at once
                # Died young without a final (e.g. on the replay itself): an attempt that failed,
                # so a fault that kills every stream backs off instead of reopening in a tight loop.
                failures += 1
                if failures < self._settings.open_attempts:
                    await trio.sleep(0.2 * 2 ** (failures - 1))
                    continue
                log.warning("streaming STT failed to open %d times; using the fallback", failures)
                self._emit(fsm.SttLost(at=trio.current_time()))
                await trio.sleep(self._settings.retry_after_s)
                failures = 0
        finally:
            self._stream = None
            for s in (stream, previous):
                if s is not None:
                    s.cancel()

    def _open(self):
        """Open a stream: config first, then the audio not yet covered by a final."""
        stream = self._channel.open_stream(_SERVICE + "StreamingRecognize")
        stream.send_nowait(config_request(self._settings))
        self._stream = stream
        self._trim_replay()
        self._stream_t0 = self._unfinalized[0][0] if self._unfinalized else None
        for _at, chunk, _quiet in self._unfinalized:
            stream.send_nowait(audio_request(chunk))
        self.streams_opened += 1
        now = trio.current_time()
        self.on_stream_open(now)
        self._emit(fsm.SttReady(at=now))
        return stream

    async def _pump(self, stream, opened_at: float) -> str:
        """Deliver one stream's results until it should rotate ("rotate") or
        ends ("heard" if it delivered a final, else "silent"). Partials do not
        count: a replay yields partials at once even from a stream doomed to die."""
        heard = False
        try:
            while not self._rotation_due(opened_at):
                data = await self._receive(stream, opened_at)
                if data is not None and self._handle_response(data):
                    heard = True
            return "rotate"
        except RpcFailure as exc:
            count_upstream_error("stt", "stream")
            log.info("STT stream ended: %s", exc)
        except trio.EndOfChannel:
            log.info("STT stream closed by the server")
        except UpstreamUnavailable as exc:
            count_upstream_error("stt", "stream_error")
            log.info("STT stream error: %s", exc)
        return "heard" if heard else "silent"

    def _rotation_due(self, opened_at: float) -> bool:
        """Past rotate_after_s and the caller is quiet, or past the hard limit."""
        age = trio.current_time() - opened_at
        soft = self._settings.rotate_after_s
        quiet = self._is_quiet is None or self._is_quiet()
        return age >= min(soft + _ROTATE_GRACE_S, _ROTATE_HARD_S) or (age >= soft and quiet)

    async def _receive(self, stream, opened_at: float) -> bytes | None:
        """Next response, or None when a held partial or a rotation check came due first."""
        wake = opened_at + self._settings.rotate_after_s
        if trio.current_time() >= wake:
            wake = trio.current_time() + _ROTATE_POLL_S
        if self._held_partial is not None:
            wake = min(wake, self._last_partial_at + self._settings.partial_debounce_ms / 1000)
        with trio.move_on_at(wake):
            return await stream.receive()
        held = self._held_partial
        if held is not None and trio.current_time() >= self._last_partial_at + self._settings.partial_debounce_ms / 1000:
            self._release_partial(held)
        return None

    def _handle_response(self, data: bytes) -> bool:
        """Emit the response's results; True if one of them was a final."""
        now = trio.current_time()
        finals = False
        for result in parse_streaming_response(data):
            t0 = self._stream_t0 if self._stream_t0 is not None else now
            audio_end = t0 + result.end_offset_s
            if result.is_final:
                finals = True
                self._held_partial = None
                self._finalized_until(audio_end)
                self._emit(fsm.Final(at=now, text=result.text, audio_end_at=audio_end))
            else:
                self._offer_partial(fsm.Partial(at=now, text=result.text, audio_end_at=audio_end))
        return finals

    def _offer_partial(self, partial: fsm.Partial) -> None:
        """Throttle partials: at most one per debounce interval, the latest wins."""
        if partial.at - self._last_partial_at >= self._settings.partial_debounce_ms / 1000:
            self._release_partial(partial)
        else:
            self._held_partial = partial

    def _release_partial(self, partial: fsm.Partial) -> None:
        self._held_partial = None
        self._last_partial_at = trio.current_time()
        self._emit(partial)
