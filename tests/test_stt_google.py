"""Google STT adapter: pure request/response codecs, then the recognizer over real gRPC.

The recognizer runs against localcloud (script engine: the n-th voiced segment
of a stream is answered with the n-th script line) through the real gRPC
bridge. Caller audio is pushed one 20 ms frame at a time on an absolute
real-time schedule, each frame stamped with its slot on that schedule, so
assertions compare call-clock instants with push stamps, never durations.
What localcloud cannot show (how audio is cut into requests) is observed with
a small recording gRPC server, also on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import socket
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import trio
from google.cloud.speech_v1.types import cloud_speech

from audio_helpers import silence, tone
from shipped import SHIPPED

from agentd import fsm
from agentd.errors import UpstreamUnavailable
from agentd.adapters.grpc_bridge import GrpcBridge
from agentd.testbed.localcloud import LocalCloud, LocalCloudSettings
from agentd.adapters.stt_google import (
    SttResult,
    SttSettings,
    StreamingRecognizer,
    audio_request,
    config_request,
    parse_recognize_response,
    parse_streaming_response,
    recognize_request,
)

GUARD_S = 10  # a hang fails the test; not a performance assertion
FRAME_S = 0.02
FRAME_BYTES = 160
LINE = "hello there friend"
LONG_LINE = "one two three four five six seven eight nine ten eleven twelve"

Request = cloud_speech.StreamingRecognizeRequest
Response = cloud_speech.StreamingRecognizeResponse


def stt_settings(language: str = "he-IL", **changes) -> SttSettings:
    """The shipped [stt] settings for ``language``, with ``changes``."""
    return dataclasses.replace(SttSettings.from_config(SHIPPED, language), **changes)




def frames_of(audio: bytes) -> list[bytes]:
    return [audio[i:i + FRAME_BYTES] for i in range(0, len(audio), FRAME_BYTES)]


# ------------------------------------------------------------- pure codecs ---

def test_the_first_request_carries_only_the_streaming_config():
    settings = stt_settings(model="default", use_enhanced=False, automatic_punctuation=True)
    request = Request.deserialize(config_request(settings))

    assert Request.pb(request).WhichOneof("streaming_request") == "streaming_config"
    streaming = request.streaming_config
    assert streaming.interim_results is True and streaming.single_utterance is False
    config = streaming.config
    assert config.encoding == cloud_speech.RecognitionConfig.AudioEncoding.MULAW
    assert config.sample_rate_hertz == 8000
    assert (config.language_code, config.model) == ("he-IL", "default")
    assert config.use_enhanced is False and config.enable_automatic_punctuation is True


def test_later_requests_carry_only_the_audio_bytes():
    audio = bytes(range(256)) * 2
    request = Request.deserialize(audio_request(audio))

    assert Request.pb(request).WhichOneof("streaming_request") == "audio_content"
    assert request.audio_content == audio


def test_a_recognize_request_carries_the_same_config_and_the_audio_inline():
    settings = stt_settings("en-US")
    request = cloud_speech.RecognizeRequest.deserialize(recognize_request(settings, b"\x7f" * 800))

    assert request.config.encoding == cloud_speech.RecognitionConfig.AudioEncoding.MULAW
    assert (request.config.sample_rate_hertz, request.config.language_code) == (8000, "en-US")
    assert request.audio.content == b"\x7f" * 800


def streaming_response(*results: dict, **fields) -> bytes:
    return Response.serialize(Response(results=[cloud_speech.StreamingRecognitionResult(**r) for r in results],
                                       **fields))


def alternative(text: str) -> list:
    return [cloud_speech.SpeechRecognitionAlternative(transcript=text)]


def test_results_are_parsed_with_their_end_offset_and_finality():
    data = streaming_response(
        {"alternatives": alternative("hello there"), "is_final": False,
         "result_end_time": {"seconds": 1, "nanos": 250_000_000}},
        {"alternatives": [], "is_final": False},  # no alternative: skipped
        {"alternatives": alternative("hello there friend"), "is_final": True, "result_end_time": {"seconds": 2}},
    )

    assert parse_streaming_response(data) == [
        SttResult(text="hello there", is_final=False, end_offset_s=1.25),
        SttResult(text="hello there friend", is_final=True, end_offset_s=2.0),
    ]


def test_speech_events_carry_no_results():
    event = Response.SpeechEventType.SPEECH_ACTIVITY_BEGIN
    assert parse_streaming_response(streaming_response(speech_event_type=event)) == []


def test_an_in_band_error_raises_upstream_unavailable():
    data = streaming_response(error={"code": 11, "message": "Exceeded maximum allowed stream duration"})
    with pytest.raises(UpstreamUnavailable, match="Exceeded maximum"):
        parse_streaming_response(data)


def test_a_recognize_response_joins_the_transcripts_of_its_results():
    response = cloud_speech.RecognizeResponse(results=[
        cloud_speech.SpeechRecognitionResult(alternatives=alternative(" hello there ")),
        cloud_speech.SpeechRecognitionResult(alternatives=[]),
        cloud_speech.SpeechRecognitionResult(alternatives=alternative("friend")),
    ])
    assert parse_recognize_response(cloud_speech.RecognizeResponse.serialize(response)) == "hello there friend"


# ------------------------------------------------------------- over gRPC ---

@pytest.fixture
def cloud():
    settings = LocalCloudSettings(script_lines=(LINE,), stt_audio_timeout_s=60)
    with LocalCloud(settings) as lc:
        yield lc


@pytest.fixture
async def bridge(nursery):
    return await nursery.start(GrpcBridge().serve)


@pytest.fixture
async def channel(bridge, cloud):
    return await bridge.open_channel(cloud.grpc_target, tls=False)


class Events:
    """The recognizer's emit callback: every event with the trio time it was emitted."""

    def __init__(self):
        self.log: list[tuple[float, fsm.Event]] = []
        self._changed = trio.Event()

    def __call__(self, event: fsm.Event) -> None:
        self.log.append((trio.current_time(), event))
        self._changed.set()
        self._changed = trio.Event()

    def of(self, kind: type) -> list:
        return [event for _, event in self.log if isinstance(event, kind)]

    async def wait_for(self, kind: type, count: int = 1) -> None:
        while len(self.of(kind)) < count:
            await self._changed.wait()


async def speak(stt: StreamingRecognizer, audio: bytes, *, origin: float | None = None) -> list[float]:
    """Push `audio` one frame per 20 ms of real time; returns each frame's call-clock stamp.

    Frames are stamped with their slot on the schedule (`origin` + i * 20 ms,
    `origin` defaulting to now), as a media timestamp would place them.
    """
    start = trio.current_time()
    origin = start if origin is None else origin
    stamps = []
    for index, frame in enumerate(frames_of(audio)):
        await trio.sleep_until(start + index * FRAME_S)
        stamps.append(origin + index * FRAME_S)
        stt.push_audio(frame, stamps[-1])
    return stamps


async def test_speech_gives_ready_then_partials_then_the_scripted_final(channel, cloud, nursery):
    events = Events()
    stt = StreamingRecognizer(channel, stt_settings("en-US"), events)
    await nursery.start(stt.run)
    lead_in, voiced = silence(200), tone(800)
    with trio.fail_after(GUARD_S):
        stamps = await speak(stt, lead_in + voiced + silence(600))
        await events.wait_for(fsm.Final)

    kinds = [type(event) for _, event in events.log]
    assert kinds[0] is fsm.SttReady and kinds[-1] is fsm.Final
    assert set(kinds[1:-1]) == {fsm.Partial}, "only partials between ready and the final"
    assert [p.text for p in events.of(fsm.Partial)] == ["hello", "hello there", "hello there friend"]
    [final] = events.of(fsm.Final)
    assert final.text == LINE
    assert stt.streams_opened == cloud.stats()["streams_opened"] == 1

    # The final's audio ends where the voiced frames end, on the stamps' clock.
    first_silent = (len(lead_in) + len(voiced)) // FRAME_BYTES
    assert stamps[first_silent - 1] < final.audio_end_at <= stamps[first_silent + 1]
    assert final.audio_end_at < final.at, "the result came after the audio it covers"
    for partial in events.of(fsm.Partial):
        assert stamps[len(lead_in) // FRAME_BYTES] < partial.audio_end_at <= final.audio_end_at


async def test_partials_are_throttled_and_the_latest_one_wins(channel, cloud, nursery):
    # localcloud reveals a word per 20 ms of voice: far more partials than the debounce lets through.
    cloud.configure(script_lines=(LONG_LINE,), stt_partial_interval_ms=20)
    debounce_ms = 150
    events = Events()
    stt = StreamingRecognizer(channel, stt_settings("en-US", partial_debounce_ms=debounce_ms), events)
    await nursery.start(stt.run)
    with trio.fail_after(GUARD_S):
        await speak(stt, tone(600) + silence(500))
        await events.wait_for(fsm.Final)

    partials = [(at, event) for at, event in events.log if isinstance(event, fsm.Partial)]
    assert len(partials) >= 2
    emitted_at = [at for at, _ in partials]
    gaps = [later - earlier for earlier, later in zip(emitted_at, emitted_at[1:])]
    assert min(gaps) >= debounce_ms / 1000 - 1e-9, "no two partials closer than the debounce"
    word_counts = [len(event.text.split()) for _, event in partials]
    assert word_counts == sorted(word_counts) and max(b - a for a, b in zip(word_counts, word_counts[1:])) > 1, \
        "partials in between were skipped, newer ones kept"
    assert partials[-1][1].text == LONG_LINE, "the newest partial was held back, not lost"
    assert events.of(fsm.Final)[0].text == LONG_LINE


async def test_when_streams_cannot_open_stt_lost_follows_the_third_attempt(channel, cloud, nursery):
    cloud.set_faults(stt_fail_opens=3)
    opened_when_lost: list[int] = []
    events = Events()

    def emit(event: fsm.Event) -> None:
        if isinstance(event, fsm.SttLost):
            opened_when_lost.append(cloud.stats()["streams_opened"])
        events(event)

    stt = StreamingRecognizer(channel, stt_settings(open_attempts=3, retry_after_s=0.3), emit)
    await nursery.start(stt.run)
    with trio.fail_after(GUARD_S):
        await events.wait_for(fsm.SttLost)
        await events.wait_for(fsm.SttReady, count=4)  # streaming is retried after the back-off
        while cloud.stats()["active_streams"] != 1:
            await trio.sleep(0.01)

    assert opened_when_lost == [3]
    kinds = [type(event) for _, event in events.log]
    assert kinds.index(fsm.SttLost) == 3 and kinds.count(fsm.SttLost) == 1
    assert cloud.stats()["streams_opened"] == 4, "the fourth stream opened and stayed open"


async def test_recognize_transcribes_buffered_audio(channel):
    stt = StreamingRecognizer(channel, stt_settings("en-US"), Events())
    audio = silence(200) + tone(800) + silence(400)
    for index, frame in enumerate(frames_of(audio)):
        stt.push_audio(frame, 100.0 + index * FRAME_S)

    utterance = stt.audio_between(100.0, 100.0 + 1.38)
    assert utterance == audio
    with trio.fail_after(GUARD_S):
        assert await stt.recognize(utterance) == LINE


async def test_recognize_raises_upstream_unavailable_when_the_service_refuses(channel):
    stt = StreamingRecognizer(channel, stt_settings("en-US"), Events())
    too_long = silence(61_000)  # Recognize takes at most 60 s of audio
    with trio.fail_after(GUARD_S), pytest.raises(UpstreamUnavailable, match="INVALID_ARGUMENT"):
        await stt.recognize(too_long)


async def test_recognize_raises_upstream_unavailable_when_the_service_is_down(bridge):
    with socket.socket() as closed_port:  # bound, never listening: connections are refused
        closed_port.bind(("127.0.0.1", 0))
        target = "127.0.0.1:%d" % closed_port.getsockname()[1]
        dead = await bridge.open_channel(target, tls=False)
        stt = StreamingRecognizer(dead, stt_settings(fallback_timeout_s=5.0), Events())
        with trio.fail_after(GUARD_S), pytest.raises(UpstreamUnavailable, match="UNAVAILABLE"):
            await stt.recognize(tone(500))


# ------------------------------------------- request batching (recorded) ---

class RecordingSpeech:
    """A StreamingRecognize server on 127.0.0.1 that records each raw request and never answers."""

    def __init__(self):
        self.requests: list[bytes] = []
        self._server = grpc.server(ThreadPoolExecutor(max_workers=2))
        handler = grpc.stream_stream_rpc_method_handler(self._stream)  # no deserializer: raw bytes
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("google.cloud.speech.v1.Speech", {"StreamingRecognize": handler}),)
        )
        self.target = "127.0.0.1:%d" % self._server.add_insecure_port("127.0.0.1:0")

    def _stream(self, requests, context):
        for request in requests:
            self.requests.append(request)
        return iter(())

    def audio(self) -> list[bytes]:
        """The audio_content of every request after the first (which must be the config)."""
        parsed = [Request.deserialize(raw) for raw in self.requests]
        kinds = [Request.pb(r).WhichOneof("streaming_request") for r in parsed]
        assert kinds[0] == "streaming_config" and set(kinds[1:]) <= {"audio_content"}, kinds
        return [r.audio_content for r in parsed[1:]]

    def __enter__(self):
        self._server.start()
        return self

    def __exit__(self, *exc_info):
        self._server.stop(grace=None)


@pytest.fixture
def recorder():
    with RecordingSpeech() as server:
        yield server


async def test_audio_goes_out_in_batch_ms_requests_and_a_partial_batch_waits(bridge, recorder, nursery):
    channel = await bridge.open_channel(recorder.target, tls=False)
    events = Events()
    stt = StreamingRecognizer(channel, stt_settings(batch_ms=60), events)
    await nursery.start(stt.run)
    audio = tone(1000)  # 50 frames: 16 batches of 3, and 2 frames left over
    with trio.fail_after(GUARD_S):
        await events.wait_for(fsm.SttReady)
        for index, frame in enumerate(frames_of(audio)):
            stt.push_audio(frame, 100.0 + index * FRAME_S)
        while len(recorder.requests) < 1 + 16:
            await trio.sleep(0.01)
        await trio.sleep(0.2)  # give a wrongly sent 17th request the time to show up

    sent = recorder.audio()
    assert [len(chunk) for chunk in sent] == [480] * 16
    assert b"".join(sent) == audio[:16 * 480], "in order, nothing lost"


async def test_audio_that_arrives_while_the_stream_opens_follows_the_config_in_batches(bridge, recorder, nursery):
    channel = await bridge.open_channel(recorder.target, tls=False)
    stt = StreamingRecognizer(channel, stt_settings(batch_ms=60), Events())
    audio = tone(600)  # 30 frames = 10 batches, all pushed before the stream exists
    for index, frame in enumerate(frames_of(audio)):
        stt.push_audio(frame, 100.0 + index * FRAME_S)
    await nursery.start(stt.run)
    with trio.fail_after(GUARD_S):
        while len(recorder.requests) < 1 + 10:
            await trio.sleep(0.01)

    sent = recorder.audio()
    assert [len(chunk) for chunk in sent] == [480] * 10
    assert b"".join(sent) == audio


# ------------------------------------------------ a clock that starts at zero ---

async def test_audio_end_at_holds_on_a_call_clock_that_starts_at_zero(channel, nursery):
    events = Events()
    stt = StreamingRecognizer(channel, stt_settings("en-US"), events)
    await nursery.start(stt.run)
    with trio.fail_after(GUARD_S):
        await events.wait_for(fsm.SttReady)
        stamps = await speak(stt, tone(800) + silence(600), origin=0.0)
        await events.wait_for(fsm.Final)

    [final] = events.of(fsm.Final)
    first_silent = 800 // 20
    assert stamps[first_silent - 1] < final.audio_end_at <= stamps[first_silent + 1]
