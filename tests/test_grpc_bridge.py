"""The gRPC bridge against localcloud over real sockets on 127.0.0.1.

Requests and responses cross the bridge as serialized bytes; the tests build
them with Google's own message classes, as the adapters do. Waits for the
server's side of things poll localcloud's counters under a `fail_after` guard;
nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest
import trio
from google.cloud.speech_v1 import types as speech
from google.cloud.texttospeech_v1 import types as tts

from audio_helpers import silence, tone

from agentd.codecs import riff
from agentd.adapters.grpc_bridge import OUTBOX_DELAY_S, GrpcBridge, RpcFailure
from agentd.testbed.localcloud import LocalCloud, LocalCloudSettings

GUARD_S = 10
SCRIPT_LINE = "hello there friend"
SYNTHESIZE = "/google.cloud.texttospeech.v1.TextToSpeech/SynthesizeSpeech"
STREAMING_RECOGNIZE = "/google.cloud.speech.v1.Speech/StreamingRecognize"


@pytest.fixture
def cloud():
    # A long audio timeout: a stream only ends when the test (or a fault) ends it.
    with LocalCloud(LocalCloudSettings(script_lines=(SCRIPT_LINE,), stt_audio_timeout_s=60)) as lc:
        yield lc


@pytest.fixture
async def channel(cloud, nursery):
    bridge = await nursery.start(GrpcBridge().serve)
    return await bridge.open_channel(cloud.grpc_target, tls=False)




def synthesize_request(text: str) -> bytes:
    return tts.SynthesizeSpeechRequest.serialize(tts.SynthesizeSpeechRequest(
        input=tts.SynthesisInput(text=text),
        voice=tts.VoiceSelectionParams(language_code="en-US"),
        audio_config=tts.AudioConfig(audio_encoding=tts.AudioEncoding.MULAW, sample_rate_hertz=8000),
    ))


def config_request() -> bytes:
    config = speech.RecognitionConfig(
        encoding=speech.RecognitionConfig.AudioEncoding.MULAW, sample_rate_hertz=8000, language_code="en-US"
    )
    request = speech.StreamingRecognizeRequest(
        streaming_config=speech.StreamingRecognitionConfig(config=config, interim_results=True)
    )
    return speech.StreamingRecognizeRequest.serialize(request)


def audio_requests(audio: bytes, chunk: int = 480) -> list[bytes]:
    Request = speech.StreamingRecognizeRequest
    return [Request.serialize(Request(audio_content=audio[i:i + chunk])) for i in range(0, len(audio), chunk)]


async def wait_until(condition) -> None:
    while not condition():
        await trio.sleep(0.01)


async def test_a_unary_call_returns_the_serialized_response(channel):
    with trio.fail_after(GUARD_S):
        data = await channel.unary(SYNTHESIZE, synthesize_request("hello"), timeout_s=GUARD_S)

    response = tts.SynthesizeSpeechResponse.deserialize(data)
    wav = riff.parse_wav(response.audio_content)
    assert (wav.format_tag, wav.sample_rate_hz) == (riff.MULAW, 8000)
    assert len(wav.data) > 1600, "at least 200 ms of speech"


async def test_a_bidi_stream_carries_requests_out_and_responses_back(channel):
    responses = []
    with trio.fail_after(GUARD_S):
        with channel.open_stream(STREAMING_RECOGNIZE) as stream:
            stream.send_nowait(config_request())
            for request in audio_requests(silence(200) + tone(600) + silence(600)):
                stream.send_nowait(request)
            stream.done_writing()
            with pytest.raises(trio.EndOfChannel):  # the server finishes after our half-close
                while True:
                    responses.append(speech.StreamingRecognizeResponse.deserialize(await stream.receive()))

    results = [result for response in responses for result in response.results]
    assert [r.alternatives[0].transcript for r in results if r.is_final] == [SCRIPT_LINE]
    assert any(not r.is_final for r in results), "interim results came through too"


async def test_a_failed_stream_raises_rpc_failure_with_the_status_name(channel, cloud):
    cloud.set_faults(stt_fail_opens=1)
    with trio.fail_after(GUARD_S):
        with channel.open_stream(STREAMING_RECOGNIZE) as stream:
            # Nothing is written: a write racing the server's abort can turn the status into
            # INTERNAL "Internal error from Core" inside grpc.aio (grpc/grpc#36066).
            with pytest.raises(RpcFailure) as failure:
                await stream.receive()

    assert failure.value.code == "UNAVAILABLE", failure.value.details
    assert "unavailable" in failure.value.details.lower()


async def test_a_failed_unary_call_raises_rpc_failure_with_the_status_name(channel, cloud):
    cloud.set_faults(tts_error=True)
    with trio.fail_after(GUARD_S):
        with pytest.raises(RpcFailure) as failure:
            await channel.unary(SYNTHESIZE, synthesize_request("hello"), timeout_s=GUARD_S)

    assert failure.value.code == "INTERNAL"


async def test_a_unary_call_past_its_deadline_fails_as_deadline_exceeded(channel, cloud):
    cloud.set_faults(tts_delay_ms=5000)
    with trio.fail_after(GUARD_S):
        with pytest.raises(RpcFailure) as failure:
            await channel.unary(SYNTHESIZE, synthesize_request("hello"), timeout_s=0.2)

    assert failure.value.code == "DEADLINE_EXCEEDED"


async def test_cancelling_the_trio_caller_cancels_the_stream(channel, cloud):
    with trio.fail_after(GUARD_S):
        with trio.move_on_after(1.0) as deadline:
            with channel.open_stream(STREAMING_RECOGNIZE) as stream:
                stream.send_nowait(config_request())
                await wait_until(lambda: cloud.stats()["active_streams"] == 1)
                await stream.receive()  # no audio: nothing will come before the deadline
        assert deadline.cancelled_caught
        await wait_until(lambda: cloud.stats()["active_streams"] == 0)


async def test_cancelling_the_trio_caller_releases_it_from_a_unary_call(channel, cloud):
    cloud.set_faults(tts_delay_ms=5000)
    with trio.fail_after(GUARD_S):
        with trio.move_on_after(0.2) as deadline:
            await channel.unary(SYNTHESIZE, synthesize_request("hello"), timeout_s=GUARD_S)
    assert deadline.cancelled_caught


async def test_the_bridge_thread_ends_when_its_nursery_is_cancelled(cloud):
    # trio.to_thread keeps idle worker threads cached; warm the cache so that the
    # worker the bridge borrows is one already counted in the baseline.
    await trio.to_thread.run_sync(lambda: None)
    baseline = threading.active_count()

    loop_errors: list[str] = []

    async def running_loop() -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: loop_errors.append(context["message"]))
        return loop

    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            bridge = await nursery.start(GrpcBridge().serve)
            channel = await bridge.open_channel(cloud.grpc_target, tls=False)
            loop = await bridge.run(running_loop)
            stream = channel.open_stream(STREAMING_RECOGNIZE)  # left open on purpose
            stream.send_nowait(config_request())
            await wait_until(lambda: cloud.stats()["active_streams"] == 1)
            nursery.cancel_scope.cancel()
        await wait_until(lambda: threading.active_count() <= baseline)

    assert not loop.is_running() and loop.is_closed()
    assert not asyncio.all_tasks(loop), "the open stream's tasks finished before the loop closed"
    gc.collect()  # a task destroyed while pending would report itself now
    assert loop_errors == []
    with trio.fail_after(GUARD_S):
        await wait_until(lambda: cloud.stats()["active_streams"] == 0)


async def test_calls_to_the_loop_run_there_in_call_order_across_handover_windows():
    # Trio -> loop calls are handed over once per OUTBOX_DELAY_S window (at 100 calls, ~1,700
    # STT batches a second would otherwise wake the loop thread one by one).
    ran: list[tuple[int, int, bool]] = []
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            bridge = await nursery.start(GrpcBridge().serve)
            for window in range(3):
                for index in range(5):
                    bridge.call_soon(lambda w=window, i=index: ran.append(
                        (w, i, threading.current_thread() is not threading.main_thread())))
                await trio.sleep(OUTBOX_DELAY_S / 2 if window == 0 else OUTBOX_DELAY_S * 2)
            await wait_until(lambda: len(ran) == 15)
            nursery.cancel_scope.cancel()
    assert ran == [(w, i, True) for w in range(3) for i in range(5)]
