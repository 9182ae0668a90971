"""Google Text-to-Speech v1 over raw gRPC: text in, raw mu-law 8 kHz out.

Google returns MULAW audio wrapped in a WAV/RIFF container; the header is
parsed off properly (chunk by chunk, never a fixed 44 bytes), because header
bytes sent to Twilio play as a click and raise error 31924. One channel per
process, shared by every call; nothing is written to disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from google.cloud.texttospeech_v1.types import cloud_tts

from agentd.codecs import riff
from agentd.errors import UpstreamUnavailable
from agentd.metrics import count_upstream_error
from agentd.adapters.grpc_bridge import Channel, RpcFailure

_METHOD = "/google.cloud.texttospeech.v1.TextToSpeech/SynthesizeSpeech"
_STREAM_METHOD = "/google.cloud.texttospeech.v1.TextToSpeech/StreamingSynthesize"
_StreamRequest = cloud_tts.StreamingSynthesizeRequest.pb()
_StreamResponse = cloud_tts.StreamingSynthesizeResponse.pb()
_Request = cloud_tts.SynthesizeSpeechRequest.pb()
_Response = cloud_tts.SynthesizeSpeechResponse.pb()
_AudioConfig = cloud_tts.AudioConfig.pb()
_MULAW = cloud_tts.AudioEncoding.MULAW.value


@dataclass(frozen=True, slots=True, kw_only=True)
class Voice:
    language: str  # BCP-47, e.g. "he-IL"
    name: str  # e.g. "he-IL-Standard-A"
    speaking_rate: float = 1.0


class Synthesizer(Protocol):
    """The one-method seam for speech synthesis."""

    async def synthesize(self, text: str, voice: Voice) -> bytes:
        """Raw mu-law 8 kHz audio for ``text``; raises UpstreamUnavailable."""
        ...


def synthesize_request(text: str, voice: Voice) -> bytes:
    return _Request(
        input={"text": text},
        voice={"language_code": voice.language, "name": voice.name},
        audio_config=_AudioConfig(
            audio_encoding=_MULAW, sample_rate_hertz=8000, speaking_rate=voice.speaking_rate
        ),
    ).SerializeToString()


def audio_from_response(data: bytes) -> bytes:
    """The raw mu-law samples of a SynthesizeSpeechResponse (RIFF header removed)."""
    blob = _Response.FromString(data).audio_content
    try:
        audio = riff.strip_wav_header(blob)
    except riff.RiffError as exc:
        raise UpstreamUnavailable(f"TTS returned a bad WAV container: {exc}") from exc
    if blob[:4] == b"RIFF":
        wav = riff.parse_wav(blob)
        if wav.format_tag != riff.MULAW or wav.sample_rate_hz != 8000:
            raise UpstreamUnavailable(
                f"TTS returned format {wav.format_tag} at {wav.sample_rate_hz} Hz, not mu-law 8 kHz"
            )
    if not audio:
        raise UpstreamUnavailable("TTS returned no audio")
    return audio


def _counted(parse, data: bytes) -> bytes:
    """`parse(data)`, counting an UpstreamUnavailable it raises as a bad response."""
    try:
        return parse(data)
    except UpstreamUnavailable:
        count_upstream_error("tts", "bad_response")
        raise


class GoogleTts:
    """SynthesizeSpeech, MULAW 8000 Hz."""

    def __init__(self, channel: Channel, *, timeout_s: float):
        self._channel = channel
        self._timeout_s = timeout_s

    async def synthesize(self, text: str, voice: Voice) -> bytes:
        try:
            data = await self._channel.unary(
                _METHOD, synthesize_request(text, voice), timeout_s=self._timeout_s
            )
        except RpcFailure as exc:
            count_upstream_error("tts", "rpc")
            raise UpstreamUnavailable(f"TTS failed: {exc}") from exc
        return _counted(audio_from_response, data)


def streaming_config_request(voice: Voice) -> bytes:
    """First request of a StreamingSynthesize stream: voice and MULAW 8 kHz output."""
    return _StreamRequest(streaming_config={
        "voice": {"language_code": voice.language, "name": voice.name},
        "streaming_audio_config": {"audio_encoding": _MULAW, "sample_rate_hertz": 8000,
                                   "speaking_rate": voice.speaking_rate},
    }).SerializeToString()


def streaming_input_request(text: str) -> bytes:
    return _StreamRequest(input={"text": text}).SerializeToString()


class GoogleStreamingTts:
    """StreamingSynthesize (Chirp 3 HD voices): audio arrives in chunks while the
    sentence is still being synthesized, so playback starts on the first chunk.

    Google does not document whether streamed MULAW carries a RIFF header (the
    unary reply does); a chunk stream that starts with one has it parsed off.
    """

    def __init__(self, channel: Channel, *, timeout_s: float):
        self._channel = channel
        self._timeout_s = timeout_s

    async def synthesize(self, text: str, voice: Voice) -> bytes:
        chunks: list[bytes] = []

        async def collect(chunk: bytes) -> None:
            chunks.append(chunk)

        await self.synthesize_into(text, voice, collect)
        return b"".join(chunks)

    async def synthesize_into(self, text: str, voice: Voice,
                              sink: Callable[[bytes], Awaitable[None]]) -> None:
        """Feed ``sink`` raw mu-law chunks as they arrive; raises UpstreamUnavailable."""
        got_audio = False
        try:
            with self._channel.open_stream(_STREAM_METHOD) as stream:
                stream.send_nowait(streaming_config_request(voice))
                stream.send_nowait(streaming_input_request(text))
                stream.done_writing()
                while True:
                    try:
                        with trio.fail_after(self._timeout_s):  # waiting on Google, not on playback
                            data = await stream.receive()
                    except trio.EndOfChannel:
                        break
                    chunk = _StreamResponse.FromString(data).audio_content
                    if not got_audio and chunk[:4] == b"RIFF":
                        chunk = audio_from_response(cloud_tts.SynthesizeSpeechResponse.pb()(
                            audio_content=chunk).SerializeToString())
                    if chunk:
                        got_audio = True
                        await sink(chunk)
        except RpcFailure as exc:
            count_upstream_error("tts", "rpc")
            raise UpstreamUnavailable(f"TTS stream failed: {exc}") from exc
        except trio.TooSlowError as exc:
            count_upstream_error("tts", "timeout")
            raise UpstreamUnavailable(f"TTS stream silent for {self._timeout_s} s") from exc
        if not got_audio:
            count_upstream_error("tts", "bad_response")
            raise UpstreamUnavailable("TTS stream returned no audio")
