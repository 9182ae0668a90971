"""Synthetic caller audio for tests: voiced tone bursts and line silence (mu-law 8 kHz)."""

import numpy as np

from agentd.codecs import mulaw


def tone(ms: int, dbfs: float = -20.0) -> bytes:
    """A 200 Hz harmonic tone at `dbfs` RMS, as mu-law 8 kHz (voiced for localcloud's energy VAD)."""
    t = np.arange(8 * ms) / 8000
    wave = sum(np.sin(2 * np.pi * 200 * k * t) / k for k in (1, 2, 3))
    wave = wave / np.sqrt(np.mean(wave**2)) * 32768 * 10 ** (dbfs / 20)
    return mulaw.ulaw_encode(wave.astype(np.int16))


def silence(ms: int) -> bytes:
    return mulaw.silence(ms // 20)
