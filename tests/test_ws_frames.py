"""The simple-frame parser (``agentd.codecs.ws_frames``) against frames wsproto's client writes.

Specified: a whole masked data, ping or pong frame is read (text decoded,
7- and 16-bit lengths); an incomplete frame is "not yet", at every cut; two
frames in one buffer are read one after the other; and every frame the
parser does not vouch for is ``NotSimple`` -- left to wsproto, which knows
the protocol's rules and close codes -- before anything is consumed.
"""

from __future__ import annotations

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from agentd.codecs import ws_frames
from agentd.codecs.ws_frames import NotSimple

CAP = 70_000
MASK = b"\x37\xfa\x21\x3d"


def client_frame(event) -> bytes:
    """The bytes a WebSocket client (wsproto's) sends for ``event``: masked, as RFC 6455 requires."""
    return Connection(ConnectionType.CLIENT).send(event)


def raw_frame(first_byte: int, payload: bytes, *, masked: bool = True, length_bytes: int = 0) -> bytes:
    """A frame built by hand, for the shapes a well-behaved client never sends."""
    n = len(payload)
    if length_bytes == 2:
        head = bytes((first_byte, 126 | (0x80 if masked else 0))) + n.to_bytes(2, "big")
    elif length_bytes == 8:
        head = bytes((first_byte, 127 | (0x80 if masked else 0))) + n.to_bytes(8, "big")
    else:
        head = bytes((first_byte, n | (0x80 if masked else 0)))
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("event, opcode, payload", [
    (TextMessage(data='{"event":"media","media":{"payload":"AAEC"}}'), ws_frames.TEXT,
     '{"event":"media","media":{"payload":"AAEC"}}'),
    (TextMessage(data="שלום " * 60), ws_frames.TEXT, "שלום " * 60),  # 16-bit length, multi-byte UTF-8
    (BytesMessage(data=bytes(range(256)) * 10), ws_frames.BINARY, bytes(range(256)) * 10),
    (TextMessage(data=""), ws_frames.TEXT, ""),
    (Ping(payload=b"are you there"), ws_frames.PING, b"are you there"),
    (Pong(payload=b"yes"), ws_frames.PONG, b"yes"),
])
def test_a_whole_simple_frame_is_read_and_unmasked(event, opcode, payload):
    data = client_frame(event)
    assert ws_frames.parse(data, 0, CAP) == (opcode, payload, len(data))


def test_an_incomplete_frame_is_not_yet_read_at_any_cut():
    data = client_frame(TextMessage(data="x" * 300))
    for cut in range(len(data)):
        assert ws_frames.parse(data[:cut], 0, CAP) is None


def test_frames_back_to_back_are_read_in_turn_from_their_positions():
    data = client_frame(TextMessage(data="one")) + client_frame(BytesMessage(data=b"two")) + b"\x81"
    opcode, first, end = ws_frames.parse(data, 0, CAP)
    assert (opcode, first) == (ws_frames.TEXT, "one")
    opcode, second, end = ws_frames.parse(data, end, CAP)
    assert (opcode, second) == (ws_frames.BINARY, b"two")
    assert ws_frames.parse(data, end, CAP) is None  # the start of a third


@pytest.mark.parametrize("data", [
    pytest.param(client_frame(CloseConnection(code=1000, reason="bye")), id="close"),
    pytest.param(raw_frame(0x01, b"first half"), id="fragment, FIN clear"),
    pytest.param(raw_frame(0x80, b"continuation"), id="continuation"),
    pytest.param(raw_frame(0xC1, b"compressed"), id="RSV1 set"),
    pytest.param(raw_frame(0x81, b"not masked", masked=False), id="unmasked client frame"),
    pytest.param(raw_frame(0x81, b"short", length_bytes=2), id="16-bit length for 5 bytes"),
    pytest.param(raw_frame(0x82, b"x" * 200, length_bytes=8), id="64-bit length"),
    pytest.param(raw_frame(0x89, b"p" * 126, length_bytes=2), id="ping over 125 bytes"),
    pytest.param(raw_frame(0x83, b"reserved"), id="reserved data opcode"),
    pytest.param(raw_frame(0x81, b"\xff\xfe not UTF-8"), id="text that is not UTF-8"),
])
def test_anything_else_is_left_to_wsproto(data):
    with pytest.raises(NotSimple):
        ws_frames.parse(data, 0, CAP)


@pytest.mark.parametrize("event", [TextMessage(data="y" * 1001), BytesMessage(data=b"y" * 1001)])
def test_a_message_over_the_cap_is_left_to_wsproto_which_closes_with_1009(event):
    with pytest.raises(NotSimple):
        ws_frames.parse(client_frame(event), 0, 1000)
    assert ws_frames.parse(client_frame(TextMessage(data="y" * 1000)), 0, 1000) is not None


def test_a_frame_is_judged_from_its_header_before_it_is_complete():
    # A 64-bit length is refused from its first two bytes: nothing waits for the payload.
    with pytest.raises(NotSimple):
        ws_frames.parse(raw_frame(0x82, b"x" * 200, length_bytes=8)[:2], 0, CAP)


def test_unmask_is_its_own_inverse_for_every_length_modulo_four():
    for n in range(9):
        data = bytes(range(100, 100 + n))
        assert ws_frames.unmask(ws_frames.unmask(data, MASK), MASK) == data
        assert ws_frames.unmask(data, MASK) == bytes(b ^ MASK[i % 4] for i, b in enumerate(data))
