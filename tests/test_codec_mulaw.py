"""G.711 mu-law against the ITU-T reference algorithm.

The reference below is a straight port of `ulaw_compress` / `ulaw_expand`
from the ITU-T G.191 Software Tool Library (g711.c), the bit-exact
implementation of Recommendation G.711 for 16-bit left-justified input.
Note: it takes the one's complement of negative samples, so for 127 of the
65536 inputs (negative values exactly on a decision boundary, e.g. -100) it
picks the next code up from a plain sign-magnitude encoder. The classic Sun
`g711.c` / `audioop` encoder differs again (-1 -> 0x7E).
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentd.codecs.mulaw import (
    FRAME_BYTES,
    SAMPLE_RATE_HZ,
    SILENCE_BYTE,
    silence,
    split_frames,
    ulaw_decode,
    ulaw_encode,
)

ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int16)


def itu_compress(sample: int) -> int:
    """ITU-T G.191 ulaw_compress for one 16-bit sample."""
    absno = ((~sample) >> 2) + 33 if sample < 0 else (sample >> 2) + 33
    absno = min(absno, 0x1FFF)
    i, segno = absno >> 6, 1
    while i:
        segno, i = segno + 1, i >> 1
    code = ((8 - segno) << 4) | (0x0F - ((absno >> segno) & 0x0F))
    return code | 0x80 if sample >= 0 else code


def itu_expand(code: int) -> int:
    """ITU-T G.191 ulaw_expand for one code byte."""
    sign = -1 if code < 0x80 else 1
    inverted = ~code
    exponent = (inverted >> 4) & 0x07
    step = 4 << (exponent + 1)
    return sign * ((0x80 << exponent) + step * (inverted & 0x0F) + step // 2 - 4 * 33)


def encode_one(sample: int) -> int:
    return ulaw_encode(np.array([sample], dtype=np.int16))[0]


ITU_REFERENCE = np.array([itu_compress(int(s)) for s in ALL_SAMPLES], dtype=np.uint8)


@pytest.mark.parametrize(
    ("sample", "code"),
    [(0, 0xFF), (1, 0xFF), (-1, 0x7F), (100, 0xF2), (1000, 0xCE), (32767, 0x80), (-32768, 0x00), (-1000, 0x4E)],
)
def test_encode_matches_g711_reference_values(sample, code):
    assert itu_compress(sample) == code  # the reference port agrees with hand-worked values
    assert encode_one(sample) == code


def test_encode_negative_decision_boundary_matches_itu():
    assert itu_compress(-100) == 0x73
    assert encode_one(-100) == 0x73


def test_encoder_matches_itu_for_every_non_negative_sample():
    positive = ALL_SAMPLES >= 0
    ours = np.frombuffer(ulaw_encode(ALL_SAMPLES[positive]), dtype=np.uint8)
    assert np.array_equal(ours, ITU_REFERENCE[positive])


def test_encoder_is_bit_exact_with_itu_for_every_sample():
    ours = np.frombuffer(ulaw_encode(ALL_SAMPLES), dtype=np.uint8)
    assert np.array_equal(ours, ITU_REFERENCE)


@pytest.mark.parametrize(("code", "sample"), [(0x80, 32124), (0x00, -32124), (0xFF, 0), (0x7F, 0), (0xF2, 104)])
def test_decode_reference_values(code, sample):
    assert int(ulaw_decode(bytes([code]))[0]) == sample


def test_decoder_is_bit_exact_with_itu_for_every_code():
    ours = ulaw_decode(bytes(range(256))).astype(int)
    assert list(ours) == [itu_expand(code) for code in range(256)]
    assert ulaw_decode(bytes(range(256))).dtype == np.int16


def test_round_trip_error_is_within_half_a_quantization_step():
    samples = ALL_SAMPLES.astype(np.int64)  # int64: abs(-32768) must not overflow
    error = np.abs(ulaw_decode(ulaw_encode(ALL_SAMPLES)).astype(np.int64) - samples)
    # Step size doubles per segment: at most |x|/32 + a few LSB (also covers the clipped top).
    assert np.all(error <= np.abs(samples) / 32 + 8)
    assert error[np.abs(samples) < 100].max() <= 4  # segment 0: step 8


def test_decoded_codes_survive_re_encoding():
    levels = ulaw_decode(bytes(range(256)))
    assert np.array_equal(ulaw_decode(ulaw_encode(levels)), levels)


def test_encoder_is_monotonic():
    decoded = ulaw_decode(ulaw_encode(ALL_SAMPLES)).astype(int)
    assert np.all(np.diff(decoded) >= 0)


@given(st.lists(st.integers(-32768, 32767), max_size=400))
def test_encode_gives_one_byte_per_sample(samples):
    pcm = np.array(samples, dtype=np.int16)
    encoded = ulaw_encode(pcm)
    assert len(encoded) == len(samples)
    assert len(ulaw_decode(encoded)) == len(samples)


def test_silence_is_whole_frames_of_the_zero_code():
    assert SAMPLE_RATE_HZ == 8000 and FRAME_BYTES == 160
    assert silence(3) == bytes([SILENCE_BYTE]) * 480
    assert not ulaw_decode(silence()).any()


def test_split_frames_pads_the_last_frame_with_silence():
    frames = split_frames(b"\x01" * 170)
    assert [len(f) for f in frames] == [160, 160]
    assert frames[1] == b"\x01" * 10 + bytes([SILENCE_BYTE]) * 150
    assert split_frames(b"\x01" * 170, pad=False)[1] == b"\x01" * 10
    assert split_frames(b"") == []
