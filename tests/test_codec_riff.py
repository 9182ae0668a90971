"""WAV/RIFF: chunk walking as real writers (Google TTS, ffmpeg, streamers) lay files out."""

import io
import struct
import wave

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentd.codecs.riff import (
    ALAW,
    MULAW,
    PCM,
    RiffError,
    WavAudio,
    build_wav,
    parse_wav,
    strip_wav_header,
)
from agentd.errors import AgentdError

ULAW_AUDIO = bytes(range(200))  # 200 mu-law samples, 25 ms at 8 kHz


def chunk(chunk_id: bytes, body: bytes, *, declared: int | None = None, pad: bool = True) -> bytes:
    size = len(body) if declared is None else declared
    return chunk_id + struct.pack("<I", size) + body + (b"\x00" if pad and len(body) % 2 else b"")


def riff(*chunks: bytes, declared: int | None = None) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body) if declared is None else declared) + body


def fmt_body(tag=MULAW, channels=1, rate=8000, bits=8, extra=b"") -> bytes:
    align = channels * bits // 8
    return struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits) + extra


def test_build_mulaw_has_cbsize_and_fact_like_google():
    blob = build_wav(ULAW_AUDIO, format_tag=MULAW, channels=1, sample_rate_hz=8000, bits_per_sample=8)
    assert len(blob) == 58 + len(ULAW_AUDIO)  # 12 RIFF + 26 fmt(18) + 12 fact + 8 data header
    assert blob[12:20] == b"fmt " + struct.pack("<I", 18)
    assert blob[36:38] == b"\x00\x00"  # cbSize
    assert blob[38:50] == b"fact" + struct.pack("<I", 4) + struct.pack("<I", len(ULAW_AUDIO))
    assert blob[50:58] == b"data" + struct.pack("<I", len(ULAW_AUDIO))
    assert struct.unpack_from("<I", blob, 4)[0] == len(blob) - 8


def test_build_pcm_is_the_classic_44_byte_header_and_stdlib_wave_reads_it():
    samples = struct.pack("<4h", 0, 1000, -1000, 32767)
    blob = build_wav(samples, format_tag=PCM, channels=1, sample_rate_hz=16000, bits_per_sample=16)
    assert len(blob) == 44 + len(samples)
    with wave.open(io.BytesIO(blob)) as reader:
        assert (reader.getnchannels(), reader.getframerate(), reader.getsampwidth()) == (1, 16000, 2)
        assert reader.readframes(4) == samples


def test_parse_reads_what_the_stdlib_wave_writer_wrote():
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(2)
        writer.setsampwidth(2)
        writer.setframerate(8000)
        writer.writeframes(b"\x01\x02\x03\x04" * 10)
    audio = parse_wav(buffer.getvalue())
    assert audio == WavAudio(format_tag=PCM, channels=2, sample_rate_hz=8000, bits_per_sample=16,
                             data=b"\x01\x02\x03\x04" * 10)
    assert audio.duration_s == pytest.approx(10 / 8000)


@pytest.mark.parametrize(("tag", "bits"), [(MULAW, 8), (ALAW, 8), (PCM, 8), (PCM, 16)])
def test_build_parse_round_trip(tag, bits):
    data = bytes(range(256)) * 2
    blob = build_wav(data, format_tag=tag, channels=1, sample_rate_hz=8000, bits_per_sample=bits)
    assert parse_wav(blob) == WavAudio(format_tag=tag, channels=1, sample_rate_hz=8000, bits_per_sample=bits,
                                       data=data)


def test_list_and_fact_chunks_before_data_are_skipped():
    blob = riff(
        chunk(b"fmt ", fmt_body(extra=b"\x00\x00")),
        chunk(b"LIST", b"INFOISFT\x0e\x00\x00\x00Lavf60.16.100\x00"),
        chunk(b"fact", struct.pack("<I", len(ULAW_AUDIO))),
        chunk(b"data", ULAW_AUDIO),
    )
    assert parse_wav(blob).data == ULAW_AUDIO
    assert parse_wav(blob).format_tag == MULAW


def test_odd_sized_chunk_is_followed_by_a_pad_byte():
    blob = riff(chunk(b"fmt ", fmt_body()), chunk(b"junk", b"abc"), chunk(b"data", ULAW_AUDIO))
    assert blob.index(b"data") - blob.index(b"junk") == 8 + 3 + 1
    assert parse_wav(blob).data == ULAW_AUDIO


def test_odd_sized_data_keeps_its_last_byte_and_drops_the_pad():
    blob = riff(chunk(b"fmt ", fmt_body()), chunk(b"data", b"\x01\x02\x03"), chunk(b"LIST", b"INFO"))
    assert parse_wav(blob).data == b"\x01\x02\x03"


def test_chunks_after_data_are_ignored():
    blob = riff(chunk(b"fmt ", fmt_body()), chunk(b"data", ULAW_AUDIO), chunk(b"LIST", b"INFO"), b"trailing garbage")
    assert parse_wav(blob).data == ULAW_AUDIO


def test_streaming_data_size_means_to_end_of_file():
    blob = riff(chunk(b"fmt ", fmt_body()), chunk(b"data", ULAW_AUDIO, declared=0xFFFFFFFF), declared=0xFFFFFFFF)
    assert parse_wav(blob).data == ULAW_AUDIO


def test_data_size_larger_than_the_rest_means_to_end_of_file():
    blob = riff(chunk(b"fmt ", fmt_body()), chunk(b"data", ULAW_AUDIO, declared=10**6))
    assert parse_wav(blob).data == ULAW_AUDIO


def test_empty_data_chunk_is_valid_silence():
    blob = build_wav(b"", format_tag=MULAW, channels=1, sample_rate_hz=8000, bits_per_sample=8)
    assert parse_wav(blob).data == b""


def test_partial_trailing_frame_is_dropped():
    data = chunk(b"data", b"\x01\x02\x03", declared=0xFFFFFFFF, pad=False)  # 1.5 PCM16 samples
    blob = riff(chunk(b"fmt ", fmt_body(tag=PCM, bits=16)), data)
    assert parse_wav(blob).data == b"\x01\x02"


def test_extensible_format_reports_its_sub_format_tag():
    guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    extra = struct.pack("<HHI", 22, 16, 4) + struct.pack("<H", PCM) + guid_tail
    blob = riff(chunk(b"fmt ", fmt_body(tag=0xFFFE, bits=16, extra=extra)), chunk(b"data", b"\x00\x01"))
    assert parse_wav(blob).format_tag == PCM


BAD = [
    ("empty", b"", "truncated RIFF header"),
    ("short", b"RIFF\x00\x00", "truncated RIFF header"),
    ("raw mu-law", b"\xff" * 100, "not a RIFF file"),
    ("not wave", b"RIFF\x04\x00\x00\x00AVI LIST", "not b'WAVE'"),
    ("no chunks", riff(), "no fmt chunk"),
    ("no fmt", riff(chunk(b"data", ULAW_AUDIO)), "no fmt chunk"),
    ("no data", riff(chunk(b"fmt ", fmt_body()), chunk(b"LIST", b"INFO")), "no data chunk"),
    ("fmt too short", riff(chunk(b"fmt ", b"\x07\x00\x01\x00"), chunk(b"data", b"")), "truncated fmt chunk"),
    ("fmt cut off", riff(chunk(b"fmt ", fmt_body(), declared=40)), "truncated fmt chunk"),
    ("zero channels", riff(chunk(b"fmt ", fmt_body(channels=0)), chunk(b"data", b"")), "channels"),
    ("zero rate", riff(chunk(b"fmt ", fmt_body(rate=0)), chunk(b"data", b"")), "sample rate"),
    ("LIST overruns", riff(chunk(b"fmt ", fmt_body()), chunk(b"LIST", b"INFO", declared=99)), "truncated b'LIST'"),
    ("garbage after header", b"RIFF\x00\x00\x00\x00WAVE" + b"\x13\x37" * 20, "truncated"),
    ("short extensible", riff(chunk(b"fmt ", fmt_body(tag=0xFFFE))), "EXTENSIBLE"),
]


@pytest.mark.parametrize(("blob", "problem"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_wav_raises_riff_error_saying_what_is_wrong(blob, problem):
    with pytest.raises(RiffError, match=problem.replace("(", r"\(")) as caught:
        parse_wav(blob)
    assert isinstance(caught.value, AgentdError)


def test_strip_wav_header_passes_headerless_audio_through():
    assert strip_wav_header(ULAW_AUDIO) == ULAW_AUDIO
    assert strip_wav_header(b"") == b""
    wav = build_wav(ULAW_AUDIO, format_tag=MULAW, channels=1, sample_rate_hz=8000, bits_per_sample=8)
    assert strip_wav_header(wav) == ULAW_AUDIO


def test_strip_wav_header_refuses_a_broken_riff():
    with pytest.raises(RiffError):
        strip_wav_header(b"RIFF\x10\x00\x00\x00WAVEfmt ")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"format_tag": MULAW, "bits_per_sample": 16},
        {"format_tag": PCM, "bits_per_sample": 12},
        {"format_tag": 0, "bits_per_sample": 8},
        {"format_tag": PCM, "bits_per_sample": 16, "channels": 0},
    ],
)
def test_build_rejects_impossible_formats(kwargs):
    args = {"channels": 1, "sample_rate_hz": 8000} | kwargs
    with pytest.raises(ValueError):
        build_wav(b"\x00\x00", **args)


def test_build_rejects_partial_frames():
    with pytest.raises(ValueError, match="whole number"):
        build_wav(b"\x00\x00\x00", format_tag=PCM, channels=1, sample_rate_hz=8000, bits_per_sample=16)


@given(st.binary(max_size=300))
def test_parse_never_raises_anything_but_riff_error(blob):
    for candidate in (blob, b"RIFF" + blob, b"RIFF\x00\x00\x00\x00WAVE" + blob):
        try:
            parse_wav(candidate)
        except RiffError:
            pass


@given(st.binary(max_size=200), st.sampled_from([MULAW, ALAW, PCM]), st.integers(1, 48000))
def test_build_parse_round_trip_property(data, tag, rate):
    blob = build_wav(data, format_tag=tag, channels=1, sample_rate_hz=rate, bits_per_sample=8)
    assert parse_wav(blob) == WavAudio(format_tag=tag, channels=1, sample_rate_hz=rate, bits_per_sample=8, data=data)
