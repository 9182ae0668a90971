"""The WebSocket frames a Twilio media stream is made of, parsed without wsproto's machinery.

Each 20 ms of caller audio reaches agentd as one small, masked, unfragmented
text frame. wsproto parses any frame correctly, but through a generator, a
buffer object and an event per frame: ~10 us of pure Python for a 300-byte
message, 50 times a second per call. ``parse`` reads the common case -- a
whole data, ping or pong frame of at most 65,535 bytes -- in a few
microseconds, and says ``NotSimple`` for everything else, so that wsproto
sees it from that frame on: close frames, fragments, 64-bit lengths,
reserved bits, unmasked client frames, a non-minimal length, text that is
not UTF-8, a message over the cap. The protocol's rules and its close codes
stay wsproto's; this module only recognises what is plainly fine (RFC 6455
section 5.2).
"""

from __future__ import annotations

TEXT, BINARY, PING, PONG = 0x1, 0x2, 0x9, 0xA
_DATA = (TEXT, BINARY)
_CONTROL_MAX = 125  # a control frame's payload limit


class NotSimple(Exception):
    """The frame at this position is not one ``parse`` reads: hand the bytes from here to wsproto."""


def parse(buf: bytes | bytearray, pos: int, max_payload: int) -> tuple[int, str | bytes, int] | None:
    """The simple client frame at ``buf[pos:]`` as (opcode, payload, end), or None if it is incomplete.

    A text payload is returned decoded. Raises ``NotSimple`` for any frame
    this module leaves to wsproto (see the module docstring), before
    consuming anything.
    """
    available = len(buf) - pos
    if available < 2:
        return None
    b0, b1 = buf[pos], buf[pos + 1]
    opcode = b0 & 0x0F
    if b0 & 0xF0 != 0x80 or not b1 & 0x80:  # not FIN, reserved bits set, or not masked
        raise NotSimple
    length = b1 & 0x7F
    head = 6
    if length == 126:
        if available < 4:
            return None
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        head = 8
        if length < 126:  # a length that fitted in 7 bits must be sent in 7 bits
            raise NotSimple
    elif length == 127:
        raise NotSimple
    if opcode in _DATA:
        if length > max_payload:
            raise NotSimple
    elif opcode not in (PING, PONG) or length > _CONTROL_MAX:
        raise NotSimple
    end = pos + head + length
    if len(buf) < end:
        return None
    payload = unmask(buf[end - length:end], buf[end - length - 4:end - length])
    if opcode == TEXT:
        try:
            return opcode, payload.decode("utf-8"), end
        except UnicodeDecodeError:
            raise NotSimple from None
    return opcode, payload, end


def unmask(data: bytes, key: bytes) -> bytes:
    """``data`` XOR the repeated 4-byte ``key``, done as one big-integer XOR (no per-byte Python loop)."""
    n = len(data)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")

