"""`google.cloud.speech.v1.Speech` on grpc.aio: StreamingRecognize and Recognize.

Google's rules that clients trip over are enforced with Google's codes and
wording: the first request carries only `streaming_config`, later ones only
`audio_content`; a stream may carry `stt_stream_limit_s` of audio (305 s)
and must not go `stt_audio_timeout_s` (10 s) without a request. Only MULAW at
8000 Hz is accepted (what agentd sends).

Each stream runs two asyncio tasks: a reader that feeds audio to its
`StreamRecognizer` (in the worker pool when the engine is CPU-bound, so one
stream's decoding never stalls another's audio) and the handler task itself,
the only writer, which delays each final by `stt_final_delay_ms` of wall
time. A final still waiting is sent before anything that follows it, so
results always arrive in stream order.
"""

from __future__ import annotations

import asyncio
import datetime
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import grpc
from google.cloud.speech_v1 import types as speech

from agentd.codecs.mulaw import SAMPLE_RATE_HZ, ulaw_decode
from agentd.testbed.localcloud.settings import CloudState
from agentd.testbed.localcloud.stt_engines import (
    DecoderPool,
    Hypothesis,
    RecognitionEvent,
    ScriptCursor,
    SpeechActivity,
    StreamRecognizer,
    open_recognizer,
)

SERVICE = "google.cloud.speech.v1.Speech"
MALORDERED_FIRST = "Malordered Data Received. Send exactly one config, followed by audio data."
MALORDERED_LATER = (
    "Malordered Data Received. Expected audio but none was set. Send exactly one config, followed by audio data."
)
STREAM_LIMIT = "Exceeded maximum allowed stream duration of {limit:g} seconds."
AUDIO_TIMEOUT = (
    "Audio Timeout Error: Long duration elapsed without audio. Audio should be sent close to real time."
)
UNAVAILABLE = "The service is currently unavailable."
SYNC_TOO_LONG = "Sync input too long. For audio longer than 1 min use LongRunningRecognize with a 'uri' parameter."
SYNC_LIMIT_S = 60.0

_Event = speech.StreamingRecognizeResponse.SpeechEventType


@dataclass(frozen=True, slots=True, kw_only=True)
class _Abort:
    """End the RPC with this status (queued by the reader for the writer)."""

    code: grpc.StatusCode
    details: str


@dataclass(frozen=True, slots=True, kw_only=True)
class _Send:
    """A response to write; finals wait `stt_final_delay_ms` first."""

    response: speech.StreamingRecognizeResponse
    delayed: bool


_END = object()  # the reader is done: flush and finish the RPC


class SpeechService:
    """The Speech servicer; `generic_handler()` registers it on a grpc.aio server."""

    def __init__(self, state: CloudState, pool: DecoderPool, executor: Executor,
                 *, script_cursor: ScriptCursor | None = None) -> None:
        self._state = state
        self._pool = pool
        self._executor = executor
        self._script_cursor = script_cursor or ScriptCursor()

    def generic_handler(self) -> grpc.GenericRpcHandler:
        streaming = grpc.stream_stream_rpc_method_handler(
            self.streaming_recognize,
            request_deserializer=speech.StreamingRecognizeRequest.deserialize,
            response_serializer=speech.StreamingRecognizeResponse.serialize,
        )
        unary = grpc.unary_unary_rpc_method_handler(
            self.recognize,
            request_deserializer=speech.RecognizeRequest.deserialize,
            response_serializer=speech.RecognizeResponse.serialize,
        )
        return grpc.method_handlers_generic_handler(SERVICE, {"StreamingRecognize": streaming, "Recognize": unary})

    async def streaming_recognize(self, request_iterator: AsyncIterator[Any], context: Any) -> None:
        """Bidi StreamingRecognize; aborts with Google's status on every rule broken."""
        self._state.count("streams_opened")
        self._state.count("active_streams")
        recognizer: StreamRecognizer | None = None
        try:
            if self._state.take_stt_fail_open():
                await context.abort(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE)
            requests = aiter(request_iterator)
            config = await self._read_config(requests, context)
            if config is None:
                return
            recognizer = open_recognizer(self._state.settings, self._pool, self._script_cursor)
            session = _StreamSession(config, recognizer, self._state, self._runner(recognizer))
            outcome = await session.run(requests, context.write)
            if outcome is not None:
                await context.abort(outcome.code, outcome.details)
        finally:
            self._state.count("active_streams", -1)
            if recognizer is not None:
                await self._runner(recognizer)(recognizer.close)

    async def recognize(self, request: Any, context: Any) -> speech.RecognizeResponse:
        """Unary Recognize: the whole buffer through the same engine."""
        self._state.count("recognize_calls")
        problem = config_problem(request.config)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if request.audio.uri:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "localcloud does not read audio.uri")
        audio = request.audio.content
        if len(audio) / SAMPLE_RATE_HZ > SYNC_LIMIT_S:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, SYNC_TOO_LONG)
        recognizer = open_recognizer(self._state.settings, self._pool, self._script_cursor)
        run = self._runner(recognizer)
        try:
            events = await run(_recognize_all, recognizer, audio)
            finals = _finals(events)
            for _ in finals:
                recognizer.final_sent()  # returned below, in the same loop turn
        finally:
            await run(recognizer.close)
        language = request.config.language_code.lower()
        return speech.RecognizeResponse(results=[_sync_result(h, language) for h in finals])

    async def _read_config(self, requests: AsyncIterator[Any], context: Any) -> Any:
        """The first request's `streaming_config`, or abort; None if the client sent nothing."""
        try:
            timeout_s = self._state.settings.stt_audio_timeout_s
            first = await asyncio.wait_for(anext(requests, None), timeout_s)
        except TimeoutError:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, AUDIO_TIMEOUT)
        if first is None:
            return None
        if _request_kind(first) != "streaming_config":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALORDERED_FIRST)
        problem = config_problem(first.streaming_config.config)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return first.streaming_config

    def _runner(self, recognizer: StreamRecognizer) -> Callable[..., Any]:
        """How to call the recognizer: in the worker pool if it is CPU-bound."""
        loop = asyncio.get_running_loop()

        async def run(function: Callable[..., Any], *args: Any) -> Any:
            if recognizer.cpu_bound:
                return await loop.run_in_executor(self._executor, function, *args)
            return function(*args)

        return run


class _StreamSession:
    """One StreamingRecognize after its config: a reader task and this writer."""

    def __init__(self, config: Any, recognizer: StreamRecognizer, state: CloudState, run: Callable[..., Any]) -> None:
        self._config = config
        self._recognizer = recognizer
        self._state = state
        self._run = run
        self._language = config.config.language_code.lower()
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._audio_s = 0.0

    async def run(self, requests: AsyncIterator[Any], write: Callable[..., Any]) -> _Abort | None:
        """Serve the stream; returns the status to abort with, None for OK."""
        async with asyncio.TaskGroup() as group:
            reader = group.create_task(self._read(requests))
            outcome = await self._write(write)
            reader.cancel()
        return outcome

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        while True:
            timeout_s = self._state.settings.stt_audio_timeout_s
            try:
                request = await asyncio.wait_for(anext(requests, None), timeout_s)
            except TimeoutError:
                self._outbox.put_nowait(_Abort(code=grpc.StatusCode.OUT_OF_RANGE, details=AUDIO_TIMEOUT))
                return
            if request is None:
                break
            abort = self._admit(request)
            if abort is not None:
                self._outbox.put_nowait(abort)
                return
            events = await self._run(self._recognizer.feed, ulaw_decode(request.audio_content))
            if self._queue_events(events):
                return
        self._queue_events(await self._run(self._recognizer.finish))
        self._outbox.put_nowait(_END)

    def _admit(self, request: Any) -> _Abort | None:
        """Check one audio request against Google's rules and the injected faults."""
        if _request_kind(request) != "audio_content":
            return _Abort(code=grpc.StatusCode.INVALID_ARGUMENT, details=MALORDERED_LATER)
        self._audio_s += len(request.audio_content) / SAMPLE_RATE_HZ
        settings = self._state.settings
        if self._audio_s > settings.stt_stream_limit_s + 1e-9:
            details = STREAM_LIMIT.format(limit=settings.stt_stream_limit_s)
            return _Abort(code=grpc.StatusCode.OUT_OF_RANGE, details=details)
        abort_after_s = settings.faults.stt_abort_after_s
        if abort_after_s > 0 and self._audio_s >= abort_after_s and self._state.take_stt_abort():
            return _Abort(code=grpc.StatusCode.UNAVAILABLE, details=UNAVAILABLE)
        return None

    def _queue_events(self, events: list[RecognitionEvent]) -> bool:
        """Queue the responses for `events`; True once a single utterance is over."""
        for event in events:
            if isinstance(event, SpeechActivity):
                self._queue_activity(event)
            elif event.is_final or self._config.interim_results:
                response = _streaming_response(event, self._language)
                self._outbox.put_nowait(_Send(response=response, delayed=event.is_final))
            if self._config.single_utterance and isinstance(event, Hypothesis) and event.is_final:
                self._outbox.put_nowait(_END)
                return True
        return False

    def _queue_activity(self, event: SpeechActivity) -> None:
        if self._config.single_utterance and not event.begin:
            self._send_event(_Event.END_OF_SINGLE_UTTERANCE, event.at_s)
        if self._config.enable_voice_activity_events:
            kind = _Event.SPEECH_ACTIVITY_BEGIN if event.begin else _Event.SPEECH_ACTIVITY_END
            self._send_event(kind, event.at_s)

    def _send_event(self, kind: Any, at_s: float) -> None:
        response = speech.StreamingRecognizeResponse(speech_event_type=kind, speech_event_time=_duration(at_s))
        self._outbox.put_nowait(_Send(response=response, delayed=False))

    async def _write(self, write: Callable[..., Any]) -> _Abort | None:
        """The only writer: sends queued responses, holding finals back by the final delay."""
        loop = asyncio.get_running_loop()
        held: deque[tuple[float, Any]] = deque()
        while True:
            timeout = max(0.0, held[0][0] - loop.time()) if held else None
            try:
                item = await asyncio.wait_for(self._outbox.get(), timeout)
            except TimeoutError:
                await self._write_final(write, held.popleft()[1])
                continue
            if isinstance(item, _Abort):
                return item
            if item is not _END and item.delayed:
                delay_s = self._state.settings.stt_final_delay_ms / 1000
                held.append((loop.time() + delay_s, item.response))
                continue
            while held:  # keep stream order: an earlier final goes first, early
                await self._write_final(write, held.popleft()[1])
            if item is _END:
                return None
            await write(item.response)

    async def _write_final(self, write: Callable[..., Any], response: Any) -> None:
        await write(response)
        self._recognizer.final_sent()  # only now may a shared script move past its line


def config_problem(config: Any) -> str | None:
    """Why a RecognitionConfig is refused (Google's 'Invalid recognition' wording), or None."""
    encoding = speech.RecognitionConfig.AudioEncoding
    if config.encoding == encoding.MULAW and config.sample_rate_hertz == SAMPLE_RATE_HZ:
        return None
    return (
        "Invalid recognition 'config': localcloud accepts only encoding MULAW at sample_rate_hertz 8000, "
        f"got {encoding(config.encoding).name} at {config.sample_rate_hertz}."
    )


def _request_kind(request: Any) -> str | None:
    return type(request).pb(request).WhichOneof("streaming_request")


def _duration(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(milliseconds=round(seconds * 1000))


def _streaming_response(hypothesis: Hypothesis, language: str) -> speech.StreamingRecognizeResponse:
    alternative = speech.SpeechRecognitionAlternative(
        transcript=hypothesis.transcript, confidence=hypothesis.confidence
    )
    result = speech.StreamingRecognitionResult(
        alternatives=[alternative],
        is_final=hypothesis.is_final,
        stability=hypothesis.stability,
        result_end_time=_duration(hypothesis.end_s),
        language_code=language,
    )
    return speech.StreamingRecognizeResponse(results=[result])


def _recognize_all(recognizer: StreamRecognizer, audio: bytes) -> list[RecognitionEvent]:
    return recognizer.feed(ulaw_decode(audio)) + recognizer.finish()


def _finals(events: list[RecognitionEvent]) -> list[Hypothesis]:
    return [e for e in events if isinstance(e, Hypothesis) and e.is_final]


def _sync_result(hypothesis: Hypothesis, language: str) -> speech.SpeechRecognitionResult:
    alternative = speech.SpeechRecognitionAlternative(
        transcript=hypothesis.transcript, confidence=hypothesis.confidence
    )
    return speech.SpeechRecognitionResult(
        alternatives=[alternative], result_end_time=_duration(hypothesis.end_s), language_code=language
    )
