"""`google.cloud.texttospeech.v1.TextToSpeech` on grpc.aio, spoken by espeak-ng.

- SynthesizeSpeech: like Google, MULAW and LINEAR16 come back inside a
  WAV/RIFF container built by `agentd.codecs.riff.build_wav` (mu-law: format
  tag 7 with a `fact` chunk, so the header is not 44 bytes); PCM (=7) comes
  back headerless.
- StreamingSynthesize (Chirp 3 HD style): first request `streaming_config`,
  then `input.text` requests; each input is answered with audio chunks of
  about 200 ms. Whether Google's streamed MULAW chunks carry a RIFF header is
  unconfirmed (docs/wire.md); localcloud sends them **headerless**, the
  stricter case for a client that would otherwise cut a fixed header.
- ListVoices: a small static catalogue (Hebrew and US English).

Faults: `tts_error` -> INTERNAL (`tts_fail_text`: only for input text
containing that string, e.g. a reply's second sentence); `tts_delay_ms`
and the `tts_ttfb_ms` setting delay the first audio of each answer;
`tts_empty_audio` answers with empty audio_content (streaming: no chunks
for the input); `tts_bad_riff` corrupts the RIFF container (unary only:
streamed chunks have no header).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.cloud.texttospeech_v1 import types as tts

from agentd.codecs import riff
from agentd.testbed.localcloud.espeak import SynthesisError, encode_audio, ssml_to_text, synthesize
from agentd.testbed.localcloud.settings import CloudState

SERVICE = "google.cloud.texttospeech.v1.TextToSpeech"
STREAM_CHUNK_MS = 200
DEFAULT_RATE_HZ = 8000
ESPEAK_RATE_HZ = 22050
INTERNAL = "Internal error encountered."
STREAMING_ORDER = "The first request must carry only streaming_config; later requests only input."
CHIRP_ONLY = "StreamingSynthesize supports only Chirp 3: HD voices, got voice name '{name}'."
_Encoding = tts.AudioEncoding
_CACHE_ENTRIES = 1024
_VOICE_CATALOGUE = (
    *(("he-IL", f"he-IL-Standard-{x}", g) for x, g in zip("ABCD", "FMFM")),
    *(("he-IL", f"he-IL-Wavenet-{x}", g) for x, g in zip("ABCD", "FMFM")),
    *(("he-IL", f"he-IL-Chirp3-HD-{x}", g) for x, g in (("Aoede", "F"), ("Charon", "M"))),
    *(("en-US", f"en-US-Standard-{x}", g) for x, g in zip("ABCE", "MMMF")),
    *(("en-US", f"en-US-Chirp3-HD-{x}", g) for x, g in (("Aoede", "F"), ("Charon", "M"))),
)


class TextToSpeechService:
    """The TextToSpeech servicer; `generic_handler()` registers it on a grpc.aio server."""

    def __init__(self, state: CloudState) -> None:
        self._state = state
        self._synthesized: dict[tuple[str, str, float], asyncio.Future[bytes]] = {}  # settings.tts_cache

    def generic_handler(self) -> grpc.GenericRpcHandler:
        handlers = {
            "SynthesizeSpeech": grpc.unary_unary_rpc_method_handler(
                self.synthesize_speech,
                request_deserializer=tts.SynthesizeSpeechRequest.deserialize,
                response_serializer=tts.SynthesizeSpeechResponse.serialize,
            ),
            "StreamingSynthesize": grpc.stream_stream_rpc_method_handler(
                self.streaming_synthesize,
                request_deserializer=tts.StreamingSynthesizeRequest.deserialize,
                response_serializer=tts.StreamingSynthesizeResponse.serialize,
            ),
            "ListVoices": grpc.unary_unary_rpc_method_handler(
                self.list_voices,
                request_deserializer=tts.ListVoicesRequest.deserialize,
                response_serializer=tts.ListVoicesResponse.serialize,
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    async def synthesize_speech(self, request: Any, context: Any) -> tts.SynthesizeSpeechResponse:
        """Unary synthesis; MULAW/LINEAR16 wrapped in RIFF like Google does."""
        self._state.count("synth_calls")
        text = _input_text(request.input)
        config = request.audio_config
        if not text:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Either input.text or input.ssml must be set.")
        allowed = (_Encoding.MULAW, _Encoding.LINEAR16, _Encoding.PCM)
        await self._check_encoding(config.audio_encoding, context, allowed=allowed)
        audio = await self._speak(text, request.voice, config.speaking_rate, config, context)
        faults = self._state.faults
        if faults.tts_empty_audio:
            return tts.SynthesizeSpeechResponse(audio_content=b"")
        rate = config.sample_rate_hertz or DEFAULT_RATE_HZ
        content = _container(audio, config.audio_encoding, rate)
        if faults.tts_bad_riff:
            content = corrupt_riff(content)
        return tts.SynthesizeSpeechResponse(audio_content=content)

    async def streaming_synthesize(self, request_iterator: AsyncIterator[Any], context: Any) -> None:
        """Bidi synthesis: config first, then one answer of headerless chunks per input."""
        self._state.count("streaming_synth_calls")
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            return
        if _tts_request_kind(first) != "streaming_config":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, STREAMING_ORDER)
        config = first.streaming_config
        name = config.voice.name
        if name and "Chirp3-HD" not in name and "Chirp-HD" not in name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, CHIRP_ONLY.format(name=name))
        audio_config = config.streaming_audio_config
        await self._check_encoding(audio_config.audio_encoding, context, allowed=(_Encoding.MULAW, _Encoding.PCM))
        async for request in requests:
            if _tts_request_kind(request) != "input":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, STREAMING_ORDER)
            text = request.input.text or ssml_to_text(request.input.markup)
            if text.strip():
                audio = await self._speak(text, config.voice, audio_config.speaking_rate, audio_config, context)
                if self._state.faults.tts_empty_audio:
                    continue  # the input is answered with no audio at all
                rate = audio_config.sample_rate_hertz or DEFAULT_RATE_HZ
                mulaw = audio_config.audio_encoding == _Encoding.MULAW
                await _write_chunks(context, audio, rate=rate, mulaw=mulaw)

    async def list_voices(self, request: Any, context: Any) -> tts.ListVoicesResponse:
        """The static catalogue, filtered by `language_code` when given."""
        self._state.count("list_voices_calls")
        wanted = request.language_code.lower()
        voices = [
            tts.Voice(
                language_codes=[language],
                name=name,
                ssml_gender=tts.SsmlVoiceGender.FEMALE if gender == "F" else tts.SsmlVoiceGender.MALE,
                natural_sample_rate_hertz=ESPEAK_RATE_HZ,
            )
            for language, name, gender in _VOICE_CATALOGUE
            if not wanted or language.lower().startswith(wanted)
        ]
        return tts.ListVoicesResponse(voices=voices)

    async def _speak(self, text: str, voice: Any, speaking_rate: float, config: Any, context: Any) -> bytes:
        """Headerless audio for `text` in `config`'s encoding, after the configured delays."""
        settings = self._state.settings
        fail_text = settings.faults.tts_fail_text
        if settings.faults.tts_error or (fail_text and fail_text in text):
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL)
        language = voice.language_code or _language_of(voice.name)
        try:
            pcm = await self._pcm(text, language, speaking_rate)
        except SynthesisError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Voice for language_code '{language}': {exc}")
        delay_ms = settings.tts_ttfb_ms + settings.faults.tts_delay_ms
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        rate = config.sample_rate_hertz or DEFAULT_RATE_HZ
        return encode_audio(pcm, sample_rate_hz=rate, mulaw=config.audio_encoding == _Encoding.MULAW)

    async def _pcm(self, text: str, language: str, speaking_rate: float) -> bytes:
        """espeak-ng's PCM for the request; with settings.tts_cache each text is synthesized once,
        and requests that arrive while it runs wait for that one synthesis (200 calls greeting at
        once must not start 200 espeak-ng processes for the same sentence)."""
        if not self._state.settings.tts_cache:
            return await synthesize(text, language_code=language, speaking_rate=speaking_rate)
        key = (text, language, speaking_rate)
        pending = self._synthesized.get(key)
        if pending is None:
            if len(self._synthesized) >= _CACHE_ENTRIES:
                self._synthesized.clear()  # a load generator repeats a few sentences; this never fills
            pending = self._synthesized[key] = asyncio.ensure_future(
                synthesize(text, language_code=language, speaking_rate=speaking_rate))
        else:
            self._state.count("tts_cache_hits")
        try:
            return await asyncio.shield(pending)  # one caller giving up must not cancel the others' audio
        except SynthesisError:
            self._synthesized.pop(key, None)
            raise

    @staticmethod
    async def _check_encoding(encoding: Any, context: Any, *, allowed: tuple[Any, ...]) -> None:
        if encoding not in allowed:
            names = ", ".join(e.name for e in allowed)
            message = f"localcloud supports audio_encoding {names}, got {_Encoding(encoding).name}."
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)


def corrupt_riff(content: bytes) -> bytes:
    """The same container with the fmt chunk claiming far more bytes than the file has."""
    if len(content) < 20 or content[12:16] != b"fmt ":
        return b"RIFF\x00\x00"  # headerless input: a truncated header is just as broken
    return content[:16] + struct.pack("<I", 0x7FFFFF00) + content[20:]


def _container(audio: bytes, encoding: Any, rate: int) -> bytes:
    if encoding == _Encoding.MULAW:
        return riff.build_wav(audio, format_tag=riff.MULAW, channels=1, sample_rate_hz=rate, bits_per_sample=8)
    if encoding == _Encoding.LINEAR16:
        return riff.build_wav(audio, format_tag=riff.PCM, channels=1, sample_rate_hz=rate, bits_per_sample=16)
    return audio  # PCM: headerless by definition


async def _write_chunks(context: Any, audio: bytes, *, rate: int, mulaw: bool) -> None:
    chunk = rate * STREAM_CHUNK_MS // 1000 * (1 if mulaw else 2)
    for offset in range(0, len(audio), chunk):
        await context.write(tts.StreamingSynthesizeResponse(audio_content=audio[offset : offset + chunk]))


def _input_text(synthesis_input: Any) -> str:
    if synthesis_input.text:
        return synthesis_input.text
    if synthesis_input.ssml:
        return ssml_to_text(synthesis_input.ssml)
    return synthesis_input.markup


def _language_of(voice_name: str) -> str:
    """'he-IL-Standard-A' -> 'he-IL' (voice given by name only)."""
    return "-".join(voice_name.split("-")[:2]) or "en-US"


def _tts_request_kind(request: Any) -> str | None:
    return type(request).pb(request).WhichOneof("streaming_request")
