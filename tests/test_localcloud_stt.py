"""localcloud's Speech service over real gRPC on 127.0.0.1, with a plain grpc client.

Audio is sent faster than real time; nothing here waits on the wall clock
except the audio-timeout test, which waits for the server's error.
"""

from __future__ import annotations

import datetime
import subprocess
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from google.cloud.speech_v1 import types as speech

from audio_helpers import silence, tone

from agentd.codecs import mulaw, pcm
from agentd.testbed.localcloud import LocalCloud, LocalCloudSettings

SCRIPT = ("hello there friend", "second line")
CALL_TIMEOUT_S = 20
MULAW = speech.RecognitionConfig.AudioEncoding.MULAW
EVENT = speech.StreamingRecognizeResponse.SpeechEventType


TWO_BURSTS = tone(800) + silence(600) + tone(500) + silence(600)


def espeak_mulaw(text: str) -> bytes:
    wav = subprocess.run(["espeak-ng", "--stdout", "-v", "en-us", text], capture_output=True, check=True).stdout
    start = wav.index(b"data") + 8
    samples = np.frombuffer(wav[start : len(wav) - (len(wav) - start) % 2], dtype="<i2")
    return mulaw.ulaw_encode(pcm.resample(samples, 22050, 8000))


def streaming_config(**overrides) -> speech.StreamingRecognitionConfig:
    recognition = dict(encoding=MULAW, sample_rate_hertz=8000, language_code="he-IL")
    recognition.update(overrides.pop("config", {}))
    return speech.StreamingRecognitionConfig(
        config=speech.RecognitionConfig(**recognition), **{"interim_results": True, **overrides}
    )


class Feed:
    """Requests of one stream: the given ones, then held open until `release()`."""

    def __init__(self, requests: list[speech.StreamingRecognizeRequest], hold: bool = True) -> None:
        self._requests = requests
        self._released = threading.Event()
        if not hold:
            self._released.set()

    def __iter__(self) -> Iterator[speech.StreamingRecognizeRequest]:
        yield from self._requests
        self._released.wait()

    def release(self) -> None:
        self._released.set()


def audio_requests(audio: bytes, chunk: int = 480) -> list[speech.StreamingRecognizeRequest]:
    return [speech.StreamingRecognizeRequest(audio_content=audio[i : i + chunk]) for i in range(0, len(audio), chunk)]


def streaming_recognize(channel: grpc.Channel):
    return channel.stream_stream(
        "/google.cloud.speech.v1.Speech/StreamingRecognize",
        request_serializer=speech.StreamingRecognizeRequest.serialize,
        response_deserializer=speech.StreamingRecognizeResponse.deserialize,
    )


def recognize(cloud: LocalCloud, request: speech.RecognizeRequest) -> speech.RecognizeResponse:
    with grpc.insecure_channel(cloud.grpc_target) as channel:
        call = channel.unary_unary(
            "/google.cloud.speech.v1.Speech/Recognize",
            request_serializer=speech.RecognizeRequest.serialize,
            response_deserializer=speech.RecognizeResponse.deserialize,
        )
        return call(request, timeout=CALL_TIMEOUT_S)


def raw_stream_error(cloud: LocalCloud, requests: list[speech.StreamingRecognizeRequest]) -> grpc.RpcError:
    """The error a stream of exactly `requests` ends with (fails the test if none)."""
    with grpc.insecure_channel(cloud.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(streaming_recognize(channel)(iter(requests), timeout=CALL_TIMEOUT_S))
    return caught.value


def stream(cloud: LocalCloud, config, audio: bytes, *, hold_until_finals: int | None = None):
    """Run one StreamingRecognize; returns (responses, RpcError or None).

    With `hold_until_finals`, the request stream stays open after the audio
    until that many finals arrived (or the server ends the call).
    """
    requests = [speech.StreamingRecognizeRequest(streaming_config=config), *audio_requests(audio)]
    feed = Feed(requests, hold=hold_until_finals is not None)
    responses: list[speech.StreamingRecognizeResponse] = []
    with grpc.insecure_channel(cloud.grpc_target) as channel:
        try:
            for response in streaming_recognize(channel)(iter(feed), timeout=CALL_TIMEOUT_S):
                responses.append(response)
                if hold_until_finals is not None and len(finals(responses)) >= hold_until_finals:
                    feed.release()
        except grpc.RpcError as error:
            return responses, error
        finally:
            feed.release()
    return responses, None


def results(responses) -> list[speech.StreamingRecognitionResult]:
    return [result for response in responses for result in response.results]


def finals(responses) -> list[speech.StreamingRecognitionResult]:
    return [r for r in results(responses) if r.is_final]


def transcripts(items) -> list[str]:
    return [r.alternatives[0].transcript for r in items]


@pytest.fixture
def cloud():
    with LocalCloud(LocalCloudSettings(script_lines=SCRIPT)) as lc:
        yield lc


# --- Google's request rules ------------------------------------------------------------------------


def test_first_request_must_carry_the_config(cloud):
    error = raw_stream_error(cloud, audio_requests(silence(100)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "Malordered Data Received. Send exactly one config, followed by audio data."


def test_config_alone_is_a_valid_stream(cloud):
    assert stream(cloud, streaming_config(), b"") == ([], None)


def test_later_requests_may_carry_only_audio(cloud):
    config = speech.StreamingRecognizeRequest(streaming_config=streaming_config())
    error = raw_stream_error(cloud, [config, *audio_requests(silence(100)), config])
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "Expected audio but none was set" in error.details()


@pytest.mark.parametrize(
    "recognition",
    [
        dict(encoding=speech.RecognitionConfig.AudioEncoding.LINEAR16, sample_rate_hertz=8000),
        dict(encoding=MULAW, sample_rate_hertz=16000),
    ],
)
def test_only_mulaw_at_8000_hz_is_accepted(cloud, recognition):
    _, error = stream(cloud, streaming_config(config=recognition), TWO_BURSTS)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("Invalid recognition 'config'")


def test_stream_duration_limit_aborts_out_of_range(cloud):
    cloud.configure(stt_stream_limit_s=1)
    responses, error = stream(cloud, streaming_config(), silence(1000) + silence(100), hold_until_finals=99)
    assert error.code() is grpc.StatusCode.OUT_OF_RANGE
    assert error.details() == "Exceeded maximum allowed stream duration of 1 seconds."


def test_stream_of_exactly_the_limit_is_fine(cloud):
    cloud.configure(stt_stream_limit_s=1)
    _, error = stream(cloud, streaming_config(), silence(1000))
    assert error is None


def test_no_audio_for_the_audio_timeout_aborts_out_of_range(cloud):
    cloud.configure(stt_audio_timeout_s=0.3)
    _, error = stream(cloud, streaming_config(), silence(100), hold_until_finals=99)
    assert error.code() is grpc.StatusCode.OUT_OF_RANGE
    assert error.details() == (
        "Audio Timeout Error: Long duration elapsed without audio. Audio should be sent close to real time."
    )


# --- the script engine -------------------------------------------------------------------------------


def test_script_engine_reveals_each_line_word_by_word_then_finalizes(cloud):
    responses, error = stream(cloud, streaming_config(), TWO_BURSTS, hold_until_finals=2)
    assert error is None
    all_results = results(responses)
    first_final = next(i for i, r in enumerate(all_results) if r.is_final)
    first, second = all_results[: first_final + 1], all_results[first_final + 1 :]
    assert transcripts(first) == ["hello", "hello there", "hello there friend", "hello there friend"]
    assert transcripts(second) == ["second", "second line", "second line"]
    assert [r.is_final for r in first + second] == [False, False, False, True, False, False, True]
    assert all(r.stability == pytest.approx(0.9) for r in first + second if not r.is_final)
    assert all(r.language_code == "he-il" for r in first + second)


def test_final_result_end_time_is_the_end_of_the_voiced_audio(cloud):
    responses, _ = stream(cloud, streaming_config(), TWO_BURSTS, hold_until_finals=2)
    assert [r.result_end_time for r in finals(responses)] == [
        datetime.timedelta(milliseconds=800),
        datetime.timedelta(milliseconds=1900),
    ]


def test_a_held_back_final_goes_out_before_the_next_segment(cloud):
    cloud.configure(stt_final_delay_ms=60_000)
    responses, error = stream(cloud, streaming_config(), TWO_BURSTS, hold_until_finals=1)
    assert error is None
    assert transcripts(results(responses))[3:5] == ["hello there friend", "second"]
    assert results(responses)[3].is_final


def test_interim_results_only_when_requested(cloud):
    responses, _ = stream(cloud, streaming_config(interim_results=False), TWO_BURSTS, hold_until_finals=2)
    assert [r.is_final for r in results(responses)] == [True, True]


def test_segments_past_the_end_of_the_script_get_no_result(cloud):
    cloud.configure(script_lines=("only line",))
    responses, error = stream(cloud, streaming_config(), TWO_BURSTS)
    assert error is None
    assert transcripts(finals(responses)) == ["only line"]


def test_quiet_audio_is_not_a_segment(cloud):
    responses, _ = stream(cloud, streaming_config(), tone(800, dbfs=-55) + silence(600))
    assert responses == []


def test_single_utterance_ends_the_stream_after_the_first_final(cloud):
    responses, error = stream(cloud, streaming_config(single_utterance=True), TWO_BURSTS, hold_until_finals=99)
    assert error is None
    events = [r.speech_event_type for r in responses if r.speech_event_type]
    assert events == [EVENT.END_OF_SINGLE_UTTERANCE]
    assert transcripts(finals(responses)) == ["hello there friend"]


def test_voice_activity_events_when_asked(cloud):
    config = streaming_config(enable_voice_activity_events=True, interim_results=False)
    responses, _ = stream(cloud, config, TWO_BURSTS, hold_until_finals=2)
    events = [(r.speech_event_type, r.speech_event_time) for r in responses if r.speech_event_type]
    ms = datetime.timedelta(milliseconds=1)
    assert events == [
        (EVENT.SPEECH_ACTIVITY_BEGIN, 0 * ms),
        (EVENT.SPEECH_ACTIVITY_END, 800 * ms),
        (EVENT.SPEECH_ACTIVITY_BEGIN, 1400 * ms),
        (EVENT.SPEECH_ACTIVITY_END, 1900 * ms),
    ]


def test_unary_recognize_uses_the_same_engine(cloud):
    request = speech.RecognizeRequest(
        config=speech.RecognitionConfig(encoding=MULAW, sample_rate_hertz=8000, language_code="en-US"),
        audio=speech.RecognitionAudio(content=TWO_BURSTS),
    )
    response = recognize(cloud, request)
    assert transcripts(response.results) == list(SCRIPT)
    assert response.results[0].language_code == "en-us"
    assert cloud.stats()["recognize_calls"] == 1


# --- faults and counters -----------------------------------------------------------------------------


def test_fail_opens_rejects_the_next_n_streams(cloud):
    cloud.set_faults(stt_fail_opens=2)
    outcomes = [stream(cloud, streaming_config(), TWO_BURSTS)[1] for _ in range(3)]
    assert [e.code() if e else None for e in outcomes] == [grpc.StatusCode.UNAVAILABLE] * 2 + [None]
    assert cloud.stats()["streams_opened"] == 3
    assert cloud.stats()["active_streams"] == 0


def test_abort_after_aborts_each_stream_unavailable(cloud):
    cloud.set_faults(stt_abort_after_s=0.5)
    responses, error = stream(cloud, streaming_config(), TWO_BURSTS, hold_until_finals=99)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert finals(responses) == []


# --- the pocketsphinx engine ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sphinx_cloud():
    with LocalCloud(LocalCloudSettings(stt_engine="pocketsphinx")) as lc:
        yield lc


def test_pocketsphinx_recognizes_english_speech(sphinx_cloud):
    audio = silence(300) + espeak_mulaw("what time do you open tomorrow") + silence(600)
    config = streaming_config(config=dict(language_code="en-US"))
    responses, error = stream(sphinx_cloud, config, audio, hold_until_finals=1)
    assert error is None
    (final,) = finals(responses)
    assert {"open", "tomorrow"} <= set(final.alternatives[0].transcript.split())
    assert len(results(responses)) > 1, "interim hypotheses came before the final"


def test_pocketsphinx_serves_unary_recognize(sphinx_cloud):
    request = speech.RecognizeRequest(
        config=speech.RecognitionConfig(encoding=MULAW, sample_rate_hertz=8000, language_code="en-US"),
        audio=speech.RecognitionAudio(content=espeak_mulaw("i would like to book a table for two people")),
    )
    response = recognize(sphinx_cloud, request)
    words = set(" ".join(transcripts(response.results)).split())
    assert {"like", "people"} <= words


def test_every_stream_starts_from_the_same_decoder_state(sphinx_cloud):
    def heard(text: str) -> str:
        request = speech.RecognizeRequest(
            config=speech.RecognitionConfig(encoding=MULAW, sample_rate_hertz=8000, language_code="en-US"),
            audio=speech.RecognitionAudio(content=silence(200) + espeak_mulaw(text) + silence(300)),
        )
        return " ".join(transcripts(recognize(sphinx_cloud, request).results))

    first = heard("what time do you open tomorrow")
    heard("please call me back later")
    assert heard("what time do you open tomorrow") == first


# --- lifecycle -------------------------------------------------------------------------------------


def test_stop_ends_live_streams():
    cloud = LocalCloud(LocalCloudSettings(script_lines=SCRIPT))
    cloud.start()
    seen_first_result = threading.Event()
    outcome: list = []

    def caller() -> None:
        requests = [speech.StreamingRecognizeRequest(streaming_config=streaming_config()), *audio_requests(tone(800))]
        feed = Feed(requests)
        with grpc.insecure_channel(cloud.grpc_target) as channel:
            try:
                for _ in streaming_recognize(channel)(iter(feed), timeout=CALL_TIMEOUT_S):
                    seen_first_result.set()
            except grpc.RpcError as error:
                outcome.append(error.code())
            finally:
                feed.release()

    thread = threading.Thread(target=caller)
    thread.start()
    assert seen_first_result.wait(CALL_TIMEOUT_S)
    assert cloud.stats()["active_streams"] == 1
    cloud.stop()
    thread.join(CALL_TIMEOUT_S)
    assert outcome and outcome[0] is not grpc.StatusCode.DEADLINE_EXCEEDED
