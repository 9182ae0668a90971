"""Caller audio for the softphone: load WAVs, synthesize speech, find where speech ends.

Everything here is synchronous. `load_caller_wav` (16-bit PCM or mu-law WAV,
any rate) and `last_voiced_offset_ms` are pure transforms on bytes (plus
reading one file); `synthesize_caller_turns`
shells out to the espeak-ng binary, which is a test/demo convenience and never
runs inside a call.

The "end of speech" rule is deliberately simple and energy-based: a 20 ms frame
is voiced when its RMS level is above `threshold_dbfs`. The softphone measures
voice-to-voice latency from the end of the last voiced frame, which is the
moment a human caller would consider themselves finished.
"""

import subprocess
from pathlib import Path

import numpy as np

from agentd.codecs.mulaw import FRAME_BYTES, SAMPLE_RATE_HZ, split_frames, ulaw_decode, ulaw_encode
from agentd.codecs.pcm import resample, rms_dbfs
from agentd.codecs.riff import MULAW, PCM, RiffError, build_wav, parse_wav
from agentd.errors import AgentdError

DEFAULT_THRESHOLD_DBFS = -40.0
LEADING_SILENCE_MS = 200
_FRAME_MS = FRAME_BYTES * 1000 // SAMPLE_RATE_HZ


class CallerAudioError(AgentdError):
    """A caller WAV cannot be used, or espeak-ng failed; the message names the file."""


def load_caller_wav(path: str | Path) -> bytes:
    """Read a WAV (16-bit PCM or mu-law; any rate; mono or more channels) as 8 kHz mono mu-law.

    Channels are mixed down by averaging. Raises CallerAudioError naming the
    file for an unreadable file, a malformed WAV, or any other sample format.
    """
    path = Path(path)
    try:
        audio = parse_wav(path.read_bytes())
    except OSError as exc:
        raise CallerAudioError(f"{path}: cannot read ({exc})") from exc
    except RiffError as exc:
        raise CallerAudioError(f"{path}: not a usable WAV file ({exc})") from exc
    if audio.format_tag == PCM and audio.bits_per_sample == 16:
        samples = np.frombuffer(audio.data, dtype="<i2")
    elif audio.format_tag == MULAW and audio.bits_per_sample == 8:
        samples = ulaw_decode(audio.data)
    else:
        raise CallerAudioError(f"{path}: format tag {audio.format_tag} with {audio.bits_per_sample}-bit samples; "
                               "need 16-bit PCM (or 8-bit mu-law)")
    return pcm16_to_mulaw(samples, channels=audio.channels, sample_rate_hz=audio.sample_rate_hz)


def pcm16_to_mulaw(samples: np.ndarray, *, channels: int, sample_rate_hz: int) -> bytes:
    """Interleaved int16 samples at any rate -> mono 8 kHz mu-law bytes."""
    frames = np.asarray(samples, dtype=np.int16)[: len(samples) - len(samples) % channels].reshape(-1, channels)
    # Averaging in int32 avoids overflow; rounding keeps silence exactly zero.
    mono = np.round(frames.astype(np.int32).mean(axis=1)).astype(np.int16)
    return ulaw_encode(resample(mono, sample_rate_hz, SAMPLE_RATE_HZ))


def last_voiced_offset_ms(mulaw: bytes, threshold_dbfs: float = DEFAULT_THRESHOLD_DBFS) -> int:
    """Offset (ms from the start of `mulaw`) where the trailing silence begins.

    That is the end of the last 20 ms frame whose RMS level exceeds
    `threshold_dbfs` (capped at the audio's length for a short last frame).
    Returns 0 when no frame is voiced.
    """
    last_voiced = -1
    for index, frame in enumerate(split_frames(mulaw, pad=False)):
        if rms_dbfs(ulaw_decode(frame)) > threshold_dbfs:
            last_voiced = index
    if last_voiced < 0:
        return 0
    end_ms = (last_voiced + 1) * _FRAME_MS
    return min(end_ms, len(mulaw) * 1000 // SAMPLE_RATE_HZ)


def synthesize_caller_turns(texts: list[str], lang: str = "en-us", *, out_dir: str | Path) -> list[Path]:
    """Speak each text with espeak-ng into `out_dir/turn_NN.wav`; return the paths.

    Each WAV is espeak-ng's own PCM16 output with LEADING_SILENCE_MS of silence
    prepended, so a caller turn does not start on its first syllable (real
    callers breathe first, and endpointers need some line noise to calibrate).
    Raises CallerAudioError if espeak-ng is missing or fails.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, text in enumerate(texts, start=1):
        path = out_dir / f"turn_{number:02d}.wav"
        path.write_bytes(_with_leading_silence(_espeak(text, lang), LEADING_SILENCE_MS))
        paths.append(path)
    return paths


def _espeak(text: str, lang: str) -> bytes:
    """Run espeak-ng and return its WAV bytes (text goes via stdin, so '-x' is not an option)."""
    command = ["espeak-ng", "-v", lang, "-s", "150", "--stdout", "--stdin"]
    try:
        done = subprocess.run(command, input=text.encode(), capture_output=True, check=True, timeout=60)
    except FileNotFoundError as exc:
        raise CallerAudioError("espeak-ng is not installed (apt-get install espeak-ng)") from exc
    except subprocess.CalledProcessError as exc:
        raise CallerAudioError(f"espeak-ng failed for {text!r}: {exc.stderr.decode(errors='replace')}") from exc
    except subprocess.TimeoutExpired as exc:
        raise CallerAudioError(f"espeak-ng timed out for {text!r}") from exc
    return done.stdout


def _with_leading_silence(wav_blob: bytes, silence_ms: int) -> bytes:
    """Re-write a PCM WAV with `silence_ms` of zeros in front of its samples.

    espeak-ng --stdout leaves streaming sizes in its header; parse_wav reads
    the data to the end of the blob, and build_wav writes true sizes.
    """
    try:
        audio = parse_wav(wav_blob)
    except RiffError as exc:
        raise CallerAudioError(f"espeak-ng produced no usable WAV ({exc})") from exc
    pad = bytes(audio.frame_bytes * (audio.sample_rate_hz * silence_ms // 1000))
    return build_wav(pad + audio.data, format_tag=audio.format_tag, channels=audio.channels,
                     sample_rate_hz=audio.sample_rate_hz, bits_per_sample=audio.bits_per_sample)
