"""Linear PCM helpers: resampling and level, numpy only."""

import numpy as np


def _lowpass_kernel(cutoff: float, taps: int = 63) -> np.ndarray:
    """Windowed-sinc low-pass; `cutoff` is a fraction of the sample rate (0..0.5)."""
    n = np.arange(taps) - (taps - 1) / 2
    kernel = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(taps)
    return kernel / kernel.sum()


def resample(pcm: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    """Resample int16 mono PCM; anti-aliased when downsampling. Returns int16."""
    if from_hz == to_hz or len(pcm) == 0:
        return np.asarray(pcm, dtype=np.int16)
    x = np.asarray(pcm, dtype=np.float64)
    if to_hz < from_hz:
        x = np.convolve(x, _lowpass_kernel(0.45 * to_hz / from_hz), mode="same")
    count = int(round(len(x) * to_hz / from_hz))
    positions = np.arange(count) * (from_hz / to_hz)
    y = np.interp(positions, np.arange(len(x)), x)
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


def rms_dbfs(pcm: np.ndarray) -> float:
    """Root-mean-square level in dBFS (-inf for digital silence)."""
    if len(pcm) == 0:
        return float("-inf")
    rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64))))
    return 20 * np.log10(rms / 32768) if rms > 0 else float("-inf")
