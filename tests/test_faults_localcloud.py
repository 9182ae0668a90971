"""The localcloud knobs the fault tests stand on, each checked on its own.

`stt_script_shared` (one script cursor for every stream), the
`stt_abort_streams` countdown, `tts_fail_text`, and the `active_chats` counter.
Plain synchronous gRPC and HTTP clients, as Google's and OpenAI's clients are.
"""

from __future__ import annotations

import threading

import grpc
import httpx
import pytest
from audio_helpers import silence, tone
from google.cloud.speech_v1 import types as speech
from google.cloud.texttospeech_v1 import types as tts

from agentd.testbed.localcloud import LocalCloud, LocalCloudSettings

SCRIPT = ("first line", "second line", "third line")
UTTERANCE = tone(500) + silence(600)  # one voiced segment, closed by the silence after it
TIMEOUT_S = 20
MULAW = speech.RecognitionConfig.AudioEncoding.MULAW
_CONFIG = speech.RecognitionConfig(encoding=MULAW, sample_rate_hertz=8000, language_code="en-US")


@pytest.fixture
def cloud():
    with LocalCloud(LocalCloudSettings(script_lines=SCRIPT, stt_script_shared=True)) as lc:
        yield lc


def streamed(cloud: LocalCloud, audio: bytes, *, hang_up_on_first_result: bool = False):
    """One StreamingRecognize of `audio`: (transcripts of the finals, RpcError or None).

    The request stream stays open until a final arrives (or the server ends the
    call); `hang_up_on_first_result` cancels the call at its first (interim) result.
    """
    got_final = threading.Event()
    config = speech.StreamingRecognitionConfig(config=_CONFIG, interim_results=True)

    def requests():
        yield speech.StreamingRecognizeRequest(streaming_config=config)
        for start in range(0, len(audio), 480):
            yield speech.StreamingRecognizeRequest(audio_content=audio[start:start + 480])
        got_final.wait(TIMEOUT_S)

    finals: list[str] = []
    with grpc.insecure_channel(cloud.grpc_target) as channel:
        call = channel.stream_stream(
            "/google.cloud.speech.v1.Speech/StreamingRecognize",
            request_serializer=speech.StreamingRecognizeRequest.serialize,
            response_deserializer=speech.StreamingRecognizeResponse.deserialize,
        )(requests(), timeout=TIMEOUT_S)
        try:
            for response in call:
                if hang_up_on_first_result:
                    call.cancel()
                    break
                finals += [r.alternatives[0].transcript for r in response.results if r.is_final]
                if finals:
                    got_final.set()
        except grpc.RpcError as error:
            return finals, error
        finally:
            got_final.set()
    return finals, None


def recognized(cloud: LocalCloud, audio: bytes) -> list[str]:
    with grpc.insecure_channel(cloud.grpc_target) as channel:
        response = channel.unary_unary(
            "/google.cloud.speech.v1.Speech/Recognize",
            request_serializer=speech.RecognizeRequest.serialize,
            response_deserializer=speech.RecognizeResponse.deserialize,
        )(speech.RecognizeRequest(config=_CONFIG, audio=speech.RecognitionAudio(content=audio)), timeout=TIMEOUT_S)
    return [result.alternatives[0].transcript for result in response.results]


def test_a_shared_script_carries_on_across_streams_and_repeats_a_line_never_delivered(cloud):
    assert streamed(cloud, UTTERANCE) == (["first line"], None)
    # A client that hangs up mid-segment never got "second line": the next stream hears it again.
    assert streamed(cloud, UTTERANCE, hang_up_on_first_result=True)[0] == []
    assert streamed(cloud, UTTERANCE) == (["second line"], None)
    assert recognized(cloud, UTTERANCE) == ["third line"], "Recognize reads the same script"


def test_without_sharing_every_stream_starts_the_script_again():
    with LocalCloud(LocalCloudSettings(script_lines=SCRIPT)) as cloud:
        assert [streamed(cloud, UTTERANCE)[0] for _ in range(2)] == [["first line"], ["first line"]]


def test_abort_streams_counts_down_the_streams_stt_abort_after_s_kills(cloud):
    cloud.set_faults(stt_abort_after_s=0.3, stt_abort_streams=1)
    _, error = streamed(cloud, UTTERANCE)
    assert error is not None and error.code() is grpc.StatusCode.UNAVAILABLE
    assert streamed(cloud, UTTERANCE) == (["first line"], None), "the next stream lives"
    assert cloud.settings.faults.stt_abort_streams == 0


def test_tts_fail_text_fails_only_the_sentences_that_contain_it(cloud):
    cloud.set_faults(tts_fail_text="question")

    def synthesize(text: str) -> tts.SynthesizeSpeechResponse:
        with grpc.insecure_channel(cloud.grpc_target) as channel:
            return channel.unary_unary(
                "/google.cloud.texttospeech.v1.TextToSpeech/SynthesizeSpeech",
                request_serializer=tts.SynthesizeSpeechRequest.serialize,
                response_deserializer=tts.SynthesizeSpeechResponse.deserialize,
            )(tts.SynthesizeSpeechRequest(
                input=tts.SynthesisInput(text=text), voice=tts.VoiceSelectionParams(language_code="en-US"),
                audio_config=tts.AudioConfig(audio_encoding=tts.AudioEncoding.MULAW, sample_rate_hertz=8000),
            ), timeout=TIMEOUT_S)

    assert synthesize("We open at eight.").audio_content.startswith(b"RIFF")
    with pytest.raises(grpc.RpcError) as failed:
        synthesize("Any other question?")
    assert failed.value.code() is grpc.StatusCode.INTERNAL


def test_active_chats_counts_a_stalled_request_until_the_client_hangs_up(cloud):
    cloud.set_faults(llm_stall_first_token=True)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.Client(base_url=cloud.http_base_url, timeout=TIMEOUT_S) as client:
        with client.stream("POST", "/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines) == ": ping"
            assert cloud.stats()["active_chats"] == 1
    cloud.stop()  # waits for every connection to end: the count is settled now
    assert cloud.stats()["active_chats"] == 0
