"""Real speech synthesis with the `espeak-ng` binary, and reading its WAV output.

`synthesize` runs espeak-ng as an asyncio subprocess (one synthesis never
blocks another, and a cancelled RPC kills its process) and returns 16-bit
PCM at espeak's native 22050 Hz. `encode_audio` turns that into what a
Google AudioConfig asks for. Nothing is cached on disk.

espeak-ng writes its WAV to a pipe before it knows the length, so its RIFF
and data sizes are placeholders (0x7ffff0xx); `agentd.codecs.riff` reads such
a data chunk to the end of the file.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from html import unescape

import numpy as np

from agentd.codecs import riff
from agentd.codecs.mulaw import ulaw_encode
from agentd.codecs.pcm import resample

ESPEAK_BINARY = "espeak-ng"
ESPEAK_DEFAULT_WPM = 175
_VOICES = {"he": "he", "iw": "he", "en-us": "en-us"}
_TAG = re.compile(r"<[^>]*>")


class SynthesisError(Exception):
    """espeak-ng refused the request (e.g. no voice for the language); message says why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Pcm:
    """Mono 16-bit PCM samples at `sample_rate_hz`."""

    samples: np.ndarray
    sample_rate_hz: int


def espeak_voice(language_code: str) -> str:
    """espeak-ng voice for a BCP-47 code: he-IL -> he, en-US -> en-us, xx-YY -> xx."""
    code = language_code.strip().lower()
    if code in _VOICES:
        return _VOICES[code]
    primary = code.split("-")[0]
    return _VOICES.get(primary, primary)


def espeak_words_per_minute(speaking_rate: float) -> int:
    """Google's speaking_rate (1.0 normal, 0 = unset, 0.25..4.0) as espeak's -s value."""
    rate = speaking_rate if speaking_rate > 0 else 1.0
    return int(min(450, max(80, round(ESPEAK_DEFAULT_WPM * rate))))


def ssml_to_text(ssml: str) -> str:
    """Plain text of an SSML document: tags dropped, entities decoded."""
    return " ".join(unescape(_TAG.sub(" ", ssml)).split())


async def synthesize(text: str, *, language_code: str, speaking_rate: float = 1.0) -> Pcm:
    """Speak `text` with espeak-ng; raises SynthesisError if espeak-ng fails."""
    command = [
        ESPEAK_BINARY,
        "--stdout",
        "--stdin",  # text via stdin: no argv quoting, and a leading "-" is not an option
        "-v",
        espeak_voice(language_code),
        "-s",
        str(espeak_words_per_minute(speaking_rate)),
    ]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        wav, errors = await process.communicate(text.encode("utf-8"))
    finally:
        if process.returncode is None:  # cancelled mid-synthesis
            process.kill()
            await process.wait()
    if process.returncode != 0:
        raise SynthesisError(errors.decode("utf-8", "replace").strip() or f"espeak-ng exit {process.returncode}")
    return pcm_from_wav(wav)


def encode_audio(pcm: Pcm, *, sample_rate_hz: int, mulaw: bool) -> bytes:
    """Headerless audio at `sample_rate_hz`: mu-law bytes, or little-endian int16."""
    samples = resample(pcm.samples, pcm.sample_rate_hz, sample_rate_hz)
    if mulaw:
        return ulaw_encode(samples)
    return samples.astype("<i2").tobytes()


def pcm_from_wav(data: bytes) -> Pcm:
    """The first channel of a 16-bit PCM WAV file; raises RiffError if it is not one."""
    wav = riff.parse_wav(data)  # takes a too-large data size as "to the end", as espeak-ng needs
    if wav.format_tag != riff.PCM or wav.bits_per_sample != 16:
        raise riff.RiffError(f"fmt: need 16-bit PCM, got format_tag={wav.format_tag} bits={wav.bits_per_sample}")
    samples = np.frombuffer(wav.data, dtype="<i2").reshape(-1, wav.channels)[:, 0]
    return Pcm(samples=samples.astype(np.int16), sample_rate_hz=wav.sample_rate_hz)
