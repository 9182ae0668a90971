"""WAV/RIFF: find the audio inside a container, and build one.

Google TTS returns MULAW/LINEAR16 audio wrapped in a RIFF header whose size
depends on the writer (a mu-law `fmt ` chunk carries `cbSize` and is followed
by a `fact` chunk), so the header is parsed chunk by chunk, never cut at a
fixed 44 bytes. Twilio plays header bytes as noise (error 31924), which is
why `strip_wav_header` exists.

Chunk walking follows the RIFF rules: each chunk is id(4) + little-endian
size(4) + body, padded to an even length; unknown chunks (LIST, fact, JUNK,
...) are skipped. A `data` size of 0xFFFFFFFF, or one larger than what is
left, means "to the end of the file", as streaming writers leave it.
"""

import struct
from dataclasses import dataclass

from agentd.errors import AgentdError

PCM = 1
ALAW = 6
MULAW = 7
EXTENSIBLE = 0xFFFE  # WAVE_FORMAT_EXTENSIBLE: the real tag is in the sub-format GUID

_STREAMING_SIZE = 0xFFFFFFFF
_FMT = struct.Struct("<HHIIHH")  # tag, channels, rate, byte rate, block align, bits
_COMPANDED = (ALAW, MULAW)


class RiffError(AgentdError):
    """A WAV/RIFF blob is malformed; the message says what is wrong and where."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WavAudio:
    format_tag: int
    channels: int
    sample_rate_hz: int
    bits_per_sample: int
    data: bytes  # whole frames only: a trailing partial frame is dropped

    @property
    def frame_bytes(self) -> int:
        """Bytes per sample frame (all channels)."""
        return self.channels * ((self.bits_per_sample + 7) // 8)

    @property
    def duration_s(self) -> float:
        return len(self.data) / self.frame_bytes / self.sample_rate_hz


@dataclass(frozen=True, slots=True, kw_only=True)
class _Format:
    format_tag: int
    channels: int
    sample_rate_hz: int
    bits_per_sample: int


def _check_header(blob: bytes) -> None:
    if len(blob) < 12:
        raise RiffError(f"truncated RIFF header: {len(blob)} bytes, need 12")
    if blob[:4] != b"RIFF":
        raise RiffError(f"not a RIFF file: starts with {bytes(blob[:4])!r}")
    if blob[8:12] != b"WAVE":
        raise RiffError(f"RIFF form type is {bytes(blob[8:12])!r}, not b'WAVE'")


def _parse_fmt(body: bytes) -> _Format:
    if len(body) < _FMT.size:
        raise RiffError(f"truncated fmt chunk: {len(body)} bytes, need at least {_FMT.size}")
    tag, channels, rate, _byte_rate, _block_align, bits = _FMT.unpack_from(body)
    if tag == EXTENSIBLE:
        # cbSize(2) validBits(2) channelMask(4), then a GUID whose first two bytes are the tag.
        if len(body) < 40:
            raise RiffError(f"truncated WAVE_FORMAT_EXTENSIBLE fmt chunk: {len(body)} bytes, need 40")
        (tag,) = struct.unpack_from("<H", body, 24)
    if channels < 1:
        raise RiffError("fmt channels is 0")
    if rate < 1:
        raise RiffError("fmt sample rate is 0")
    if bits < 1:
        raise RiffError("fmt bits per sample is 0")
    return _Format(format_tag=tag, channels=channels, sample_rate_hz=rate, bits_per_sample=bits)


def _find_chunks(blob: bytes) -> tuple[_Format | None, bytes | None]:
    """Walk the chunks after the RIFF header; stop once fmt and data are known."""
    fmt: _Format | None = None
    data: bytes | None = None
    offset = 12
    while offset + 8 <= len(blob) and (fmt is None or data is None):
        chunk_id = bytes(blob[offset : offset + 4])
        (size,) = struct.unpack_from("<I", blob, offset + 4)
        body = offset + 8
        remaining = len(blob) - body
        if chunk_id == b"data":
            if size == _STREAMING_SIZE or size > remaining:
                return fmt, bytes(blob[body:])  # streaming writer: data runs to the end
            data = bytes(blob[body : body + size])
        elif size > remaining:
            if chunk_id == b"fmt ":
                raise RiffError(f"truncated fmt chunk: declares {size} bytes, {remaining} present")
            raise RiffError(
                f"truncated {chunk_id!r} chunk at offset {offset}: declares {size} bytes, {remaining} present"
            )
        elif chunk_id == b"fmt " and fmt is None:
            fmt = _parse_fmt(blob[body : body + size])
        offset = body + size + (size & 1)  # odd-sized chunks carry a pad byte
    return fmt, data


def parse_wav(blob: bytes) -> WavAudio:
    """Parse a RIFF/WAVE blob into its format and raw sample data.

    Accepts any chunk order a real writer produces (fmt before data, LIST or
    fact anywhere, odd-size chunks with pad bytes, streaming data sizes) and
    WAVE_FORMAT_EXTENSIBLE (reported with its sub-format's tag). Raises
    RiffError naming the problem: not RIFF, not WAVE, truncated header or fmt,
    no fmt chunk, no data chunk, a chunk that runs past the end.
    """
    _check_header(blob)
    fmt, data = _find_chunks(blob)
    if fmt is None:
        raise RiffError("no fmt chunk before the audio")
    if data is None:
        raise RiffError("no data chunk")
    frame = fmt.channels * ((fmt.bits_per_sample + 7) // 8)
    data = data[: len(data) - len(data) % frame]
    return WavAudio(
        format_tag=fmt.format_tag,
        channels=fmt.channels,
        sample_rate_hz=fmt.sample_rate_hz,
        bits_per_sample=fmt.bits_per_sample,
        data=data,
    )


def _chunk(chunk_id: bytes, body: bytes) -> bytes:
    pad = b"\x00" if len(body) % 2 else b""
    return chunk_id + struct.pack("<I", len(body)) + body + pad


def _check_build_args(data: bytes, format_tag: int, channels: int, sample_rate_hz: int, bits: int) -> int:
    if not 0 < format_tag < 0xFFFF or format_tag == EXTENSIBLE:
        raise ValueError(f"format_tag: unsupported {format_tag}")
    if channels < 1 or sample_rate_hz < 1:
        raise ValueError(f"channels/sample_rate_hz must be positive, got {channels}/{sample_rate_hz}")
    if bits < 8 or bits % 8:
        raise ValueError(f"bits_per_sample: expected a multiple of 8, got {bits}")
    if format_tag in _COMPANDED and bits != 8:
        raise ValueError(f"bits_per_sample: mu-law/A-law is 8 bits, got {bits}")
    block_align = channels * bits // 8
    if len(data) % block_align:
        raise ValueError(f"data: {len(data)} bytes is not a whole number of {block_align}-byte frames")
    return block_align


def build_wav(data: bytes, *, format_tag: int, channels: int, sample_rate_hz: int, bits_per_sample: int) -> bytes:
    """Wrap raw samples in a RIFF/WAVE container.

    PCM gets the classic 16-byte fmt chunk (44-byte header). Other formats
    (mu-law, A-law) get an 18-byte fmt with cbSize=0 and a `fact` chunk
    holding the frame count, like Google's and most real writers (58-byte
    header). Raises ValueError for arguments that cannot describe `data`.
    """
    block_align = _check_build_args(data, format_tag, channels, sample_rate_hz, bits_per_sample)
    fmt = _FMT.pack(format_tag, channels, sample_rate_hz, sample_rate_hz * block_align, block_align, bits_per_sample)
    chunks = []
    if format_tag == PCM:
        chunks.append(_chunk(b"fmt ", fmt))
    else:
        chunks.append(_chunk(b"fmt ", fmt + struct.pack("<H", 0)))
        chunks.append(_chunk(b"fact", struct.pack("<I", len(data) // block_align)))
    chunks.append(_chunk(b"data", bytes(data)))
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def strip_wav_header(blob: bytes) -> bytes:
    """The sample data of a WAV blob; a blob not starting with b"RIFF" is returned unchanged.

    Lets callers accept TTS audio whether or not the service wrapped it in a
    container (headerless PCM/mu-law passes through). Raises RiffError when
    the blob claims to be RIFF but is malformed.
    """
    if blob[:4] != b"RIFF":
        return blob
    return parse_wav(blob).data
