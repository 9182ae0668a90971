"""Google TTS adapter: the response parser on hand-built containers, then GoogleTts over real gRPC.

localcloud speaks with espeak-ng and, like Google, wraps MULAW in a RIFF
container whose header is not 44 bytes (a `fact` chunk follows an 18-byte
`fmt `); its faults stand in for Google's failures.
"""

from __future__ import annotations

import struct

import pytest
import trio
from google.cloud.texttospeech_v1.types import cloud_tts

from agentd.codecs import riff
from agentd.codecs.mulaw import ulaw_decode
from agentd.codecs.pcm import rms_dbfs
from agentd.errors import UpstreamUnavailable
from agentd.adapters.grpc_bridge import GrpcBridge
from agentd.testbed.localcloud import LocalCloud, LocalCloudSettings
from agentd.adapters.tts_google import GoogleTts, Voice, audio_from_response, synthesize_request

GUARD_S = 20  # a hang fails the test; not a performance assertion
SAMPLES = bytes(range(1, 201))  # 25 ms of mu-law, no byte looks like a header
ENGLISH = Voice(language="en-US", name="en-US-Standard-A")
SYNTHESIZE = "/google.cloud.texttospeech.v1.TextToSpeech/SynthesizeSpeech"


# ---------------------------------------------------------- pure parsing ---

def response(audio_content: bytes) -> bytes:
    return cloud_tts.SynthesizeSpeechResponse.serialize(cloud_tts.SynthesizeSpeechResponse(audio_content=audio_content))


def chunk(chunk_id: bytes, body: bytes) -> bytes:
    return chunk_id + struct.pack("<I", len(body)) + body + (b"\x00" if len(body) % 2 else b"")


def wav(*chunks: bytes) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def fmt(tag: int = riff.MULAW, rate: int = 8000, bits: int = 8) -> bytes:
    align = bits // 8
    return chunk(b"fmt ", struct.pack("<HHIIHHH", tag, 1, rate, rate * align, align, bits, 0))


def test_the_data_chunk_is_found_past_extra_chunks_of_any_size():
    blob = wav(chunk(b"LIST", b"INFOISFT\x05\x00\x00\x00lavf\x00"), fmt(), chunk(b"fact", struct.pack("<I", 200)),
               chunk(b"JUNK", b"\x00" * 27), chunk(b"data", SAMPLES))
    assert audio_from_response(response(blob)) == SAMPLES


def test_headerless_audio_passes_through_untouched():
    assert audio_from_response(response(SAMPLES)) == SAMPLES


@pytest.mark.parametrize("content, problem", [
    (b"", "no audio"),
    (wav(fmt(), chunk(b"data", b"")), "no audio"),
    (wav(fmt(tag=riff.PCM, bits=16), chunk(b"data", SAMPLES)), "format 1"),
    (wav(fmt(rate=24000), chunk(b"data", SAMPLES)), "24000 Hz"),
    (b"RIFF\x00\x00", "bad WAV container"),
    (wav(chunk(b"data", SAMPLES)), "bad WAV container"),  # no fmt chunk
], ids=["empty", "empty-data", "linear16", "24kHz", "truncated", "no-fmt"])
def test_audio_that_is_not_mulaw_8khz_is_an_upstream_failure(content, problem):
    with pytest.raises(UpstreamUnavailable, match=problem):
        audio_from_response(response(content))


def test_the_request_asks_for_mulaw_8khz_in_the_given_voice():
    request = cloud_tts.SynthesizeSpeechRequest.deserialize(
        synthesize_request("שלום", Voice(language="he-IL", name="he-IL-Wavenet-B", speaking_rate=1.2))
    )
    assert request.input.text == "שלום"
    assert (request.voice.language_code, request.voice.name) == ("he-IL", "he-IL-Wavenet-B")
    config = request.audio_config
    assert config.audio_encoding == cloud_tts.AudioEncoding.MULAW and config.sample_rate_hertz == 8000
    assert config.speaking_rate == pytest.approx(1.2)


# ---------------------------------------------------------- over gRPC ---

@pytest.fixture
def cloud():
    with LocalCloud(LocalCloudSettings()) as lc:
        yield lc


@pytest.fixture
async def channel(cloud, nursery):
    bridge = await nursery.start(GrpcBridge().serve)
    return await bridge.open_channel(cloud.grpc_target, tls=False)


async def test_synthesis_returns_the_raw_mulaw_of_the_data_chunk(channel):
    tts = GoogleTts(channel, timeout_s=GUARD_S)
    with trio.fail_after(GUARD_S):
        audio = await tts.synthesize("Hello, we open at eight.", ENGLISH)
        raw = await channel.unary(SYNTHESIZE, synthesize_request("Hello, we open at eight.", ENGLISH),
                                  timeout_s=GUARD_S)

    container = cloud_tts.SynthesizeSpeechResponse.deserialize(raw).audio_content
    assert container[:4] == b"RIFF", "localcloud wraps the audio like Google does"
    assert audio == riff.parse_wav(container).data, "exactly the samples: no header bytes, none cut off"
    assert b"RIFF" not in audio[:64] and b"WAVE" not in audio[:64]
    assert len(audio) > 8000 * 0.5, "at least half a second of speech"
    assert rms_dbfs(ulaw_decode(audio)) > -40, "it is speech, not silence"


@pytest.mark.parametrize("fault, problem", [
    ("tts_error", "INTERNAL"),
    ("tts_empty_audio", "no audio"),
    ("tts_bad_riff", "bad WAV container"),
])
async def test_a_failing_service_is_reported_as_upstream_unavailable(channel, cloud, fault, problem):
    cloud.set_faults(**{fault: True})
    tts = GoogleTts(channel, timeout_s=GUARD_S)
    with trio.fail_after(GUARD_S), pytest.raises(UpstreamUnavailable, match=problem):
        await tts.synthesize("Hello.", ENGLISH)


async def test_a_slow_service_is_reported_as_upstream_unavailable_at_the_timeout(channel, cloud):
    cloud.set_faults(tts_delay_ms=5000)
    tts = GoogleTts(channel, timeout_s=0.3)
    with trio.fail_after(GUARD_S), pytest.raises(UpstreamUnavailable, match="DEADLINE_EXCEEDED"):
        await tts.synthesize("Hello.", ENGLISH)
