"""Twilio Media Streams codec: the wire shapes of docs/wire.md, both directions."""

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentd.codecs.twilio import (
    Connected,
    Dtmf,
    Mark,
    Media,
    OutboundClear,
    OutboundMark,
    OutboundMedia,
    Start,
    Stop,
    TwilioCodecError,
    UnknownEventError,
    parse_inbound,
    parse_outbound,
    render_clear,
    render_connected,
    render_dtmf,
    render_inbound_mark,
    render_inbound_media,
    render_mark,
    render_media,
    render_start,
    render_stop,
)
from agentd.errors import CallProtocolError

SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
CALL = "CA5f2b7e3f0b9f4e0e9d8c7b6a5f4e3d2c"
ACCOUNT = "AC25e16e9a716a4a1786a7c83f58e30482"
AUDIO = bytes(range(256))[:160]
AUDIO_B64 = base64.b64encode(AUDIO).decode()

CONNECTED = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
START = {
    "event": "start",
    "sequenceNumber": "1",
    "streamSid": SID,
    "start": {
        "accountSid": ACCOUNT,
        "streamSid": SID,
        "callSid": CALL,
        "tracks": ["inbound"],
        "customParameters": {"business": "acme", "token": "t0k"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    },
}
MEDIA = {
    "event": "media",
    "sequenceNumber": "3",
    "streamSid": SID,
    "media": {"track": "inbound", "chunk": "1", "timestamp": "160", "payload": AUDIO_B64},
}
DTMF = {"event": "dtmf", "sequenceNumber": "5", "streamSid": SID, "dtmf": {"track": "inbound_track", "digit": "1"}}
MARK = {"event": "mark", "sequenceNumber": "4", "streamSid": SID, "mark": {"name": "r3-s2"}}
STOP = {"event": "stop", "sequenceNumber": "9", "streamSid": SID, "stop": {"accountSid": ACCOUNT, "callSid": CALL}}


def wire(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def altered(message: dict | str, path: str, value=...) -> str:
    """`message` with the dotted `path` set to `value`, or deleted when value is omitted."""
    obj = json.loads(message if isinstance(message, str) else wire(message))
    *parents, leaf = path.split(".")
    target = obj
    for key in parents:
        target = target[key]
    if value is ...:
        del target[leaf]
    else:
        target[leaf] = value
    return wire(obj)


# --- valid inbound messages ---------------------------------------------------


def test_connected():
    assert parse_inbound(wire(CONNECTED)) == Connected(protocol="Call", version="1.0.0")


def test_start():
    event = parse_inbound(wire(START))
    assert event == Start(
        stream_sid=SID,
        call_sid=CALL,
        account_sid=ACCOUNT,
        tracks=("inbound",),
        custom_parameters=(("business", "acme"), ("token", "t0k")),
        encoding="audio/x-mulaw",
        sample_rate_hz=8000,
        channels=1,
    )
    assert event.parameter("business") == "acme"
    assert event.parameter("missing") is None
    assert event.parameter("missing", "default") == "default"


def test_start_without_custom_parameters_has_none():
    event = parse_inbound(altered(START, "start.customParameters"))
    assert event.custom_parameters == ()


def test_media_decodes_payload_and_numeric_strings():
    expected = Media(stream_sid=SID, track="inbound", chunk=1, timestamp_ms=160, payload=AUDIO)
    assert parse_inbound(wire(MEDIA)) == expected


def test_media_accepts_json_integers_too():
    message = altered(altered(altered(MEDIA, "media.chunk", 7), "media.timestamp", 0), "sequenceNumber", 3)
    event = parse_inbound(message)
    assert (event.chunk, event.timestamp_ms) == (7, 0)


@pytest.mark.parametrize("size", [1, 7, 160, 800])
def test_media_accepts_any_payload_length(size):
    payload = base64.b64encode(b"\x7f" * size).decode()
    assert parse_inbound(altered(MEDIA, "media.payload", payload)).payload == b"\x7f" * size


def test_dtmf_mark_stop():
    assert parse_inbound(wire(DTMF)) == Dtmf(stream_sid=SID, digit="1")
    assert parse_inbound(wire(MARK)) == Mark(stream_sid=SID, name="r3-s2")
    assert parse_inbound(wire(STOP)) == Stop(stream_sid=SID, call_sid=CALL)


def test_unknown_extra_keys_are_ignored():
    message = altered(altered(MEDIA, "media.future", {"x": 1}), "newTopLevel", [1, 2])
    assert parse_inbound(message).payload == AUDIO


def test_events_are_frozen():
    event = parse_inbound(wire(MARK))
    with pytest.raises(AttributeError):
        event.name = "other"


# --- malformed inbound messages ----------------------------------------------------

MALFORMED = [
    ("not json", "{", "message"),
    ("json array", "[1, 2]", "message"),
    ("json string", '"media"', "message"),
    ("missing event", altered(MEDIA, "event"), "event"),
    ("event not a string", altered(MEDIA, "event", 5), "event"),
    ("sequenceNumber not an integer", altered(MEDIA, "sequenceNumber", "3a"), "sequenceNumber"),
    ("sequenceNumber negative", altered(MEDIA, "sequenceNumber", -3), "sequenceNumber"),
    ("missing streamSid", altered(MEDIA, "streamSid"), "streamSid"),
    ("empty streamSid", altered(MEDIA, "streamSid", ""), "streamSid"),
    ("media not an object", altered(MEDIA, "media", "x"), "media"),
    ("missing media.track", altered(MEDIA, "media.track"), "media.track"),
    ("missing media.chunk", altered(MEDIA, "media.chunk"), "media.chunk"),
    ("chunk float string", altered(MEDIA, "media.chunk", "1.5"), "media.chunk"),
    ("chunk float", altered(MEDIA, "media.chunk", 1.0), "media.chunk"),
    ("chunk boolean", altered(MEDIA, "media.chunk", True), "media.chunk"),
    ("chunk with sign", altered(MEDIA, "media.chunk", "+1"), "media.chunk"),
    ("chunk with spaces", altered(MEDIA, "media.chunk", " 1"), "media.chunk"),
    ("chunk in Arabic-Indic digits", altered(MEDIA, "media.chunk", "\u0661"), "media.chunk"),
    ("timestamp empty", altered(MEDIA, "media.timestamp", ""), "media.timestamp"),
    ("timestamp absurdly long", altered(MEDIA, "media.timestamp", "9" * 5000), "media.timestamp"),
    ("payload not base64", altered(MEDIA, "media.payload", "@@@@"), "media.payload"),
    ("payload bad padding", altered(MEDIA, "media.payload", "AAA"), "media.payload"),
    ("payload non-ascii", altered(MEDIA, "media.payload", "שלום"), "media.payload"),
    ("payload empty", altered(MEDIA, "media.payload", ""), "media.payload"),
    ("payload not a string", altered(MEDIA, "media.payload", [1]), "media.payload"),
    ("start missing body", altered(START, "start"), "start"),
    ("start missing callSid", altered(START, "start.callSid"), "start.callSid"),
    ("start missing accountSid", altered(START, "start.accountSid"), "start.accountSid"),
    # SIDs are logged on every line of a call: only Twilio's format (CA/MZ + 32 hex) gets that far.
    ("callSid with a newline", altered(START, "start.callSid", "CA1\nERROR forged"), "start.callSid"),
    ("callSid with ANSI escapes", altered(START, "start.callSid", "CA\x1b[2K" + "0" * 28), "start.callSid"),
    ("callSid 60 KB", altered(START, "start.callSid", "CA" + "f" * 60_000), "start.callSid"),
    ("callSid one hex digit short", altered(START, "start.callSid", CALL[:-1]), "start.callSid"),
    ("callSid of a stream", altered(START, "start.callSid", "MZ" + CALL[2:]), "start.callSid"),
    ("streamSid not hex", altered(altered(START, "streamSid", "MZ" + "g" * 32), "start.streamSid",
                                  "MZ" + "g" * 32), "streamSid"),
    ("start streamSid mismatch", altered(START, "start.streamSid", "MZother"), "start.streamSid"),
    ("start tracks not a list", altered(START, "start.tracks", "inbound"), "start.tracks"),
    ("start parameters not an object", altered(START, "start.customParameters", []), "start.customParameters"),
    ("start parameter not a string", altered(START, "start.customParameters.business", 7),
     "start.customParameters.business"),
    ("start no mediaFormat", altered(START, "start.mediaFormat"), "start.mediaFormat"),
    ("start linear PCM", altered(START, "start.mediaFormat.encoding", "audio/l16"), "start.mediaFormat.encoding"),
    ("start 16 kHz", altered(START, "start.mediaFormat.sampleRate", 16000), "start.mediaFormat.sampleRate"),
    ("start stereo", altered(START, "start.mediaFormat.channels", 2), "start.mediaFormat.channels"),
    ("dtmf two digits", altered(DTMF, "dtmf.digit", "12"), "dtmf.digit"),
    ("dtmf missing digit", altered(DTMF, "dtmf.digit"), "dtmf.digit"),
    ("mark missing name", altered(MARK, "mark.name"), "mark.name"),
    ("stop missing callSid", altered(STOP, "stop.callSid"), "stop.callSid"),
    ("stop callSid malformed", altered(STOP, "stop.callSid", "CA\n"), "stop.callSid"),
    ("connected missing version", altered(CONNECTED, "version"), "version"),
]


@pytest.mark.parametrize(("message", "field"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_message_raises_naming_the_field(message, field):
    with pytest.raises(TwilioCodecError) as caught:
        parse_inbound(message)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert isinstance(caught.value, CallProtocolError)


def test_unknown_event_is_a_distinct_protocol_error():
    with pytest.raises(UnknownEventError) as caught:
        parse_inbound(altered(MEDIA, "event", "transcription"))
    assert caught.value.field == "event"
    assert isinstance(caught.value, TwilioCodecError)


@pytest.mark.parametrize("frame", [b"", wire(MEDIA).encode(), bytearray(b"{}")])
def test_binary_frames_are_rejected(frame):
    with pytest.raises(TwilioCodecError, match="binary frame"):
        parse_inbound(frame)


def test_oversized_message_is_rejected_before_parsing():
    message = wire(MEDIA)
    assert parse_inbound(message, max_bytes=len(message)).payload == AUDIO
    with pytest.raises(TwilioCodecError, match="larger than"):
        parse_inbound(message, max_bytes=len(message) - 1)


def test_size_limit_counts_utf8_bytes_not_characters():
    message = altered(START, "start.customParameters.business", "א" * 100)  # 2 bytes per letter
    chars, size = len(message), len(message.encode())
    assert parse_inbound(message, max_bytes=size).parameter("business") == "א" * 100
    with pytest.raises(TwilioCodecError, match="larger than"):
        parse_inbound(message, max_bytes=chars)


def test_deeply_nested_json_is_a_codec_error_not_a_crash():
    with pytest.raises(TwilioCodecError):
        parse_inbound("[" * 50000 + "]" * 50000, max_bytes=200000)


def test_error_messages_do_not_dump_whole_values():
    with pytest.raises(TwilioCodecError) as caught:
        parse_inbound(altered(MEDIA, "media.chunk", "x" * 10000))
    assert len(str(caught.value)) < 200


# --- rendering, both directions ----------------------------------------------------


def test_outbound_renders_are_compact_json():
    assert render_clear(SID) == '{"event":"clear","streamSid":"%s"}' % SID
    assert render_mark(SID, "r1-s0") == '{"event":"mark","streamSid":"%s","mark":{"name":"r1-s0"}}' % SID
    assert json.loads(render_media(SID, b"\xff\x7f")) == {
        "event": "media",
        "streamSid": SID,
        "media": {"payload": base64.b64encode(b"\xff\x7f").decode()},
    }
    assert " " not in render_media(SID, AUDIO)


def test_outbound_round_trip():
    assert parse_outbound(render_media(SID, AUDIO)) == OutboundMedia(payload=AUDIO)
    assert parse_outbound(render_mark(SID, "r3-s2")) == OutboundMark(name="r3-s2")
    assert parse_outbound(render_clear(SID)) == OutboundClear()


def test_parse_outbound_checks_the_stream_sid():
    assert parse_outbound(render_clear(SID), stream_sid=SID) == OutboundClear()
    with pytest.raises(TwilioCodecError) as caught:
        parse_outbound(render_clear("MZwrong"), stream_sid=SID)
    assert caught.value.field == "streamSid"


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (b'{"event":"clear","streamSid":"MZ1"}', "message"),
        ('{"event":"clear"}', "streamSid"),
        ('{"event":"media","streamSid":"MZ1","media":{"payload":""}}', "media.payload"),
        ('{"event":"media","streamSid":"MZ1","media":{"payload":"%%"}}', "media.payload"),
        ('{"event":"mark","streamSid":"MZ1","mark":{}}', "mark.name"),
        ('{"event":"start","streamSid":"MZ1"}', "event"),
        ("nope", "message"),
    ],
)
def test_parse_outbound_rejects_what_twilio_would(message, field):
    with pytest.raises(TwilioCodecError) as caught:
        parse_outbound(message)
    assert caught.value.field == field


def test_inbound_renders_look_like_twilio():
    assert json.loads(render_connected()) == CONNECTED
    start = render_start(stream_sid=SID, call_sid=CALL, account_sid=ACCOUNT,
                         custom_parameters={"business": "acme", "token": "t0k"})
    assert json.loads(start) == START
    media = render_inbound_media(stream_sid=SID, chunk=1, timestamp_ms=160, payload=AUDIO, sequence=3)
    assert json.loads(media) == MEDIA
    assert json.loads(render_inbound_mark(SID, "r3-s2", 4)) == MARK
    assert json.loads(render_dtmf(SID, "1", 5)) == DTMF
    assert json.loads(render_stop(SID, CALL, ACCOUNT, 9)) == STOP


def test_inbound_renders_round_trip_through_the_parser():
    start = render_start(stream_sid=SID, call_sid=CALL, account_sid=ACCOUNT, custom_parameters={"business": "א"})
    assert parse_inbound(start).parameter("business") == "א"
    media = render_inbound_media(stream_sid=SID, chunk=9, timestamp_ms=180, payload=b"\x00", sequence=11)
    assert parse_inbound(media) == Media(stream_sid=SID, track="inbound", chunk=9, timestamp_ms=180, payload=b"\x00")
    assert parse_inbound(render_dtmf(SID, "#", 12)) == Dtmf(stream_sid=SID, digit="#")
    assert parse_inbound(render_stop(SID, CALL, ACCOUNT, 13)) == Stop(stream_sid=SID, call_sid=CALL)


# --- properties ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@given(st.text(max_size=300) | st.binary(max_size=300))
def test_parse_inbound_never_raises_anything_else_on_arbitrary_input(message):
    try:
        parse_inbound(message)
    except TwilioCodecError:
        pass


@given(
    base=st.sampled_from([CONNECTED, START, MEDIA, DTMF, MARK, STOP]),
    path=st.sampled_from(["event", "streamSid", "sequenceNumber", "media", "media.chunk", "media.payload",
                          "start", "start.tracks", "start.customParameters", "start.mediaFormat",
                          "start.mediaFormat.sampleRate", "dtmf", "mark", "stop", "protocol"]),
    value=json_values,
)
def test_parse_inbound_never_raises_anything_else_on_mutated_messages(base, path, value):
    head = path.split(".")[0]
    if "." in path and not isinstance(base.get(head), dict):
        return
    try:
        parse_inbound(altered(base, path, value))
    except TwilioCodecError:
        pass


@given(
    payload=st.binary(min_size=1, max_size=400),
    chunk=st.integers(0, 10**9),
    timestamp_ms=st.integers(0, 10**12),
    sequence=st.integers(1, 10**9),
)
def test_inbound_media_round_trip(payload, chunk, timestamp_ms, sequence):
    message = render_inbound_media(stream_sid=SID, chunk=chunk, timestamp_ms=timestamp_ms, payload=payload,
                                   sequence=sequence)
    event = parse_inbound(message)
    assert event == Media(stream_sid=SID, track="inbound", chunk=chunk, timestamp_ms=timestamp_ms, payload=payload)


@given(payload=st.binary(min_size=1, max_size=400), name=st.text(min_size=1, max_size=30))
def test_outbound_round_trip_property(payload, name):
    assert parse_outbound(render_media(SID, payload), stream_sid=SID) == OutboundMedia(payload=payload)
    assert parse_outbound(render_mark(SID, name), stream_sid=SID) == OutboundMark(name=name)
