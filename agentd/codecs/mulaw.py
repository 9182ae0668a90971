"""G.711 mu-law <-> 16-bit linear PCM, vectorised with numpy.

Both directions go through 256/65536-entry lookup tables built once at
import, so a 20 ms frame costs one fancy-index, not a Python loop.
"""

import numpy as np

FRAME_BYTES = 160  # 20 ms of mu-law at 8 kHz
SAMPLE_RATE_HZ = 8000
SILENCE_BYTE = 0xFF  # mu-law code for linear 0

_BIAS = 0x84
_CLIP = 32635


def _build_decode_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


def _encode_scalar(sample: int) -> int:
    sign = 0x80 if sample < 0 else 0
    magnitude = min(~sample if sample < 0 else sample, _CLIP) + _BIAS  # G.191: one's complement
    exponent = max(magnitude.bit_length() - 8, 0)
    exponent = min(exponent, 7)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def _build_encode_table() -> np.ndarray:
    samples = range(-32768, 32768)
    return np.fromiter((_encode_scalar(s) for s in samples), dtype=np.uint8, count=65536)


_DECODE = _build_decode_table()
_ENCODE = _build_encode_table()


def ulaw_decode(data: bytes) -> np.ndarray:
    """Decode mu-law bytes to int16 linear PCM (one sample per byte)."""
    return _DECODE[np.frombuffer(data, dtype=np.uint8)]


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """Encode int16 linear PCM to mu-law bytes (one byte per sample)."""
    index = np.asarray(pcm, dtype=np.int16).astype(np.int32) + 32768
    return _ENCODE[index].tobytes()


def silence(frames: int = 1) -> bytes:
    """`frames` 20 ms frames of mu-law silence."""
    return bytes([SILENCE_BYTE]) * (FRAME_BYTES * frames)


def split_frames(data: bytes, pad: bool = True) -> list[bytes]:
    """Cut mu-law audio into 160-byte frames; the last is padded with silence."""
    frames = [data[i : i + FRAME_BYTES] for i in range(0, len(data), FRAME_BYTES)]
    if pad and frames and len(frames[-1]) < FRAME_BYTES:
        frames[-1] = frames[-1] + bytes([SILENCE_BYTE]) * (FRAME_BYTES - len(frames[-1]))
    return frames
