"""localcloud's TextToSpeech service (espeak-ng) over real gRPC, with a plain grpc client."""

from __future__ import annotations

import concurrent.futures
import grpc
import numpy as np
import pytest
from google.cloud.texttospeech_v1 import types as tts

from agentd.codecs import mulaw, riff
from agentd.codecs.pcm import rms_dbfs
from agentd.testbed.localcloud import LocalCloud, LocalCloudSettings

CALL_TIMEOUT_S = 20
HEBREW = "שלום, אנחנו פתוחים מחר משמונה בבוקר."
ENGLISH = "Hello, we are open tomorrow from eight in the morning."
SERVICE = "/google.cloud.texttospeech.v1.TextToSpeech/"


@pytest.fixture
def cloud():
    with LocalCloud(LocalCloudSettings()) as lc:
        yield lc


def synthesize(cloud, *, text="", ssml="", language="he-IL", name="", encoding=tts.AudioEncoding.MULAW,
               rate_hz=8000) -> bytes:
    request = tts.SynthesizeSpeechRequest(
        input=tts.SynthesisInput(text=text) if text else tts.SynthesisInput(ssml=ssml),
        voice=tts.VoiceSelectionParams(language_code=language, name=name),
        audio_config=tts.AudioConfig(audio_encoding=encoding, sample_rate_hertz=rate_hz),
    )
    with grpc.insecure_channel(cloud.grpc_target) as channel:
        call = channel.unary_unary(
            SERVICE + "SynthesizeSpeech",
            request_serializer=tts.SynthesizeSpeechRequest.serialize,
            response_deserializer=tts.SynthesizeSpeechResponse.deserialize,
        )
        return call(request, timeout=CALL_TIMEOUT_S).audio_content


def stream_synthesize(cloud, requests: list[tts.StreamingSynthesizeRequest]) -> list[bytes]:
    with grpc.insecure_channel(cloud.grpc_target) as channel:
        call = channel.stream_stream(
            SERVICE + "StreamingSynthesize",
            request_serializer=tts.StreamingSynthesizeRequest.serialize,
            response_deserializer=tts.StreamingSynthesizeResponse.deserialize,
        )
        return [r.audio_content for r in call(iter(requests), timeout=CALL_TIMEOUT_S)]


def streaming_config(name="he-IL-Chirp3-HD-Aoede") -> tts.StreamingSynthesizeRequest:
    config = tts.StreamingSynthesizeConfig(
        voice=tts.VoiceSelectionParams(language_code="he-IL", name=name),
        streaming_audio_config=tts.StreamingAudioConfig(audio_encoding=tts.AudioEncoding.MULAW, sample_rate_hertz=8000),
    )
    return tts.StreamingSynthesizeRequest(streaming_config=config)


def text_input(text: str) -> tts.StreamingSynthesizeRequest:
    return tts.StreamingSynthesizeRequest(input=tts.StreamingSynthesisInput(text=text))


def speech_level_dbfs(mulaw_audio: bytes) -> float:
    return rms_dbfs(mulaw.ulaw_decode(mulaw_audio))


@pytest.mark.parametrize(("language", "text"), [("he-IL", HEBREW), ("en-US", ENGLISH)], ids=["hebrew", "english"])
def test_synthesis_returns_riff_mulaw_8k_speech(cloud, language, text):
    wav = riff.parse_wav(synthesize(cloud, text=text, language=language))
    assert (wav.format_tag, wav.channels, wav.sample_rate_hz, wav.bits_per_sample) == (riff.MULAW, 1, 8000, 8)
    assert 1.0 < wav.duration_s < 10.0
    assert speech_level_dbfs(wav.data) > -35


def test_mulaw_container_is_not_a_fixed_44_byte_header(cloud):
    blob = synthesize(cloud, text=ENGLISH, language="en-US")
    assert blob[:4] == b"RIFF" and blob[8:12] == b"WAVE"
    assert blob.index(b"data") + 8 != 44


def test_linear16_comes_back_as_riff_pcm(cloud):
    wav = riff.parse_wav(synthesize(cloud, text=ENGLISH, language="en-US", encoding=tts.AudioEncoding.LINEAR16))
    assert (wav.format_tag, wav.sample_rate_hz, wav.bits_per_sample) == (riff.PCM, 8000, 16)
    assert rms_dbfs(np.frombuffer(wav.data, dtype="<i2")) > -35


def test_ssml_tags_are_not_spoken(cloud):
    plain = riff.parse_wav(synthesize(cloud, text="Hello there.", language="en-US"))
    ssml = riff.parse_wav(synthesize(cloud, ssml="<speak>Hello <break time='1ms'/>there.</speak>", language="en-US"))
    assert abs(ssml.duration_s - plain.duration_s) < 0.2


def test_voice_name_alone_picks_the_language(cloud):
    wav = riff.parse_wav(synthesize(cloud, text=HEBREW, language="", name="he-IL-Standard-A"))
    assert wav.duration_s > 1.0


def test_unsupported_encoding_is_invalid_argument(cloud):
    with pytest.raises(grpc.RpcError) as caught:
        synthesize(cloud, text=ENGLISH, encoding=tts.AudioEncoding.MP3)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_empty_input_is_invalid_argument(cloud):
    with pytest.raises(grpc.RpcError) as caught:
        synthesize(cloud, ssml="<speak></speak>")
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_streaming_synthesis_answers_each_input_with_headerless_mulaw(cloud):
    chunks = stream_synthesize(cloud, [streaming_config(), text_input("שלום."), text_input(HEBREW)])
    assert len(chunks) > 2
    assert all(not c.startswith(b"RIFF") for c in chunks)
    assert all(len(c) <= 1600 for c in chunks)  # about 200 ms each
    assert speech_level_dbfs(b"".join(chunks)) > -35


def test_streaming_synthesis_needs_the_config_first(cloud):
    with pytest.raises(grpc.RpcError) as caught:
        stream_synthesize(cloud, [text_input(HEBREW)])
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_streaming_synthesis_is_for_chirp3_hd_voices_only(cloud):
    with pytest.raises(grpc.RpcError) as caught:
        stream_synthesize(cloud, [streaming_config(name="he-IL-Standard-A"), text_input(HEBREW)])
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "Chirp 3" in caught.value.details()


def test_list_voices_filters_by_language(cloud):
    with grpc.insecure_channel(cloud.grpc_target) as channel:
        call = channel.unary_unary(
            SERVICE + "ListVoices",
            request_serializer=tts.ListVoicesRequest.serialize,
            response_deserializer=tts.ListVoicesResponse.deserialize,
        )
        voices = call(tts.ListVoicesRequest(language_code="he-IL"), timeout=CALL_TIMEOUT_S).voices
    names = {v.name for v in voices}
    assert "he-IL-Standard-A" in names and "he-IL-Chirp3-HD-Aoede" in names
    assert all(v.language_codes == ["he-IL"] for v in voices)


# --- faults ------------------------------------------------------------------------------------------


def test_tts_error_fault_fails_with_internal(cloud):
    cloud.set_faults(tts_error=True)
    with pytest.raises(grpc.RpcError) as caught:
        synthesize(cloud, text=HEBREW)
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    with pytest.raises(grpc.RpcError) as caught:
        stream_synthesize(cloud, [streaming_config(), text_input(HEBREW)])
    assert caught.value.code() is grpc.StatusCode.INTERNAL


def test_empty_audio_fault(cloud):
    cloud.set_faults(tts_empty_audio=True)
    assert synthesize(cloud, text=HEBREW) == b""
    assert stream_synthesize(cloud, [streaming_config(), text_input(HEBREW)]) == []


def test_bad_riff_fault_breaks_the_container(cloud):
    cloud.set_faults(tts_bad_riff=True)
    blob = synthesize(cloud, text=HEBREW)
    assert blob[:4] == b"RIFF"
    with pytest.raises(riff.RiffError):
        riff.parse_wav(blob)


def test_faults_can_be_cleared_at_runtime(cloud):
    cloud.set_faults(tts_error=True, tts_delay_ms=1)
    cloud.clear_faults()
    assert riff.parse_wav(synthesize(cloud, text=HEBREW)).duration_s > 1.0


def test_with_tts_cache_a_text_is_synthesized_once_and_the_same_audio_served_again(cloud):
    first = synthesize(cloud, text=HEBREW)
    assert cloud.stats()["tts_cache_hits"] == 0, "off by default: every request runs espeak-ng"
    cloud.configure(tts_cache=True)
    assert synthesize(cloud, text=HEBREW) == first  # espeak-ng is deterministic: cached or not, same audio
    assert synthesize(cloud, text=HEBREW) == first
    assert synthesize(cloud, text=ENGLISH, language="en-US") != first
    assert cloud.stats()["tts_cache_hits"] == 1


def test_with_tts_cache_requests_that_arrive_together_share_one_synthesis(cloud):
    cloud.configure(tts_cache=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
        audio = list(pool.map(lambda _: synthesize(cloud, text=ENGLISH, language="en-US"), range(5)))
    assert len(set(audio)) == 1
    assert cloud.stats()["tts_cache_hits"] == 4, "one espeak-ng run; the other four waited for it"


def test_synthesis_calls_are_counted(cloud):
    synthesize(cloud, text=HEBREW)
    stream_synthesize(cloud, [streaming_config(), text_input(HEBREW)])
    stats = cloud.stats()
    assert (stats["synth_calls"], stats["streaming_synth_calls"]) == (1, 1)
