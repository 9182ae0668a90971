"""OpenAI-compatible SSE: line decoding per the SSE spec, then chat chunk interpretation."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentd.codecs.sse import DONE, ChatDelta, LlmStreamError, SseDecoder, parse_chat_event
from agentd.errors import UpstreamUnavailable


def decode(lines: list[str]) -> list[str]:
    decoder = SseDecoder()
    events = [data for line in lines if (data := decoder.feed_line(line)) is not None]
    if (tail := decoder.flush()) is not None:
        events.append(tail)
    return events


def chunk(content, finish_reason=None) -> str:
    delta = {} if content is ... else {"content": content}
    return json.dumps({"id": "c1", "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})


# --- SseDecoder ---------------------------------------------------------------------


def test_each_blank_line_dispatches_one_event():
    assert decode(["data: one", "", "data: two", ""]) == ["one", "two"]


def test_a_single_space_after_the_colon_is_dropped_and_only_one():
    assert decode(["data:x", "", "data: x", "", "data:  x", ""]) == ["x", "x", " x"]


def test_multi_line_data_is_joined_with_newlines():
    assert decode(["data: {", "data:   \"a\": 1", "data: }", ""]) == ['{\n  "a": 1\n}']


def test_comments_are_keep_alives_not_events():
    assert decode([": keep-alive", "", ": OPENROUTER PROCESSING", "data: x", ""]) == ["x"]


def test_other_fields_are_ignored():
    assert decode(["event: message", "id: 7", "retry: 1000", "data: x", "whatever: y", ""]) == ["x"]


def test_crlf_and_raw_line_terminators_are_stripped():
    assert decode(["data: x\r\n", "\r\n", "data: y\r", "\r", "data: z\n", "\n"]) == ["x", "y", "z"]


def test_blank_lines_without_data_dispatch_nothing():
    assert decode(["", "", ": ping", ""]) == []


def test_a_field_name_alone_means_empty_value():
    assert decode(["data", ""]) == [""]
    assert decode(["data", "data", ""]) == ["\n"]


def test_flush_returns_an_event_cut_off_before_its_blank_line():
    decoder = SseDecoder()
    assert decoder.feed_line("data: [DONE]") is None
    assert decoder.flush() == "[DONE]"
    assert decoder.flush() is None


def test_byte_order_mark_at_stream_start_is_ignored():
    assert decode(["\ufeffdata: x", ""]) == ["x"]


def decode_chunks(chunks: list[str]) -> list[str]:
    decoder = SseDecoder()
    events = [data for piece in chunks for data in decoder.feed(piece)]
    if (tail := decoder.flush()) is not None:
        events.append(tail)
    return events


def test_a_chunk_may_complete_several_events_or_none():
    assert decode_chunks(["data: one\n\ndata: two\n\nda", "ta: thr", "ee\n", "\n"]) == ["one", "two", "three"]


def test_a_crlf_split_between_chunks_is_one_terminator_not_a_blank_line():
    # A lone "\r" would end the line, and the "\n" after it must not dispatch the event early.
    assert decode_chunks(["data: a\r", "\ndata: b\r\n\r\n"]) == ["a\nb"]


def test_a_bare_cr_at_the_end_of_a_chunk_still_ends_its_line():
    assert decode_chunks(["data: a\r", "\rdata: b\r\r"]) == ["a", "b"]


def test_only_sse_terminators_split_lines():
    assert decode_chunks(['data: {"t": "a\u2028b\x85c"}\n\n']) == ['{"t": "a\u2028b\x85c"}']


_SSE_TEXT = st.lists(st.sampled_from(["data: x", "data: ü", ": ping", "data", "", "event: e"]), max_size=12).flatmap(
    lambda lines: st.tuples(st.just(lines), st.lists(st.sampled_from(["\n", "\r\n", "\r"]),
                                                     min_size=len(lines), max_size=len(lines))))


@given(_SSE_TEXT, st.lists(st.integers(min_value=0, max_value=60), max_size=8))
def test_however_the_body_is_cut_into_chunks_the_events_are_those_of_the_whole_body(lines_and_ends, cuts):
    lines, ends = lines_and_ends
    text = "".join(line + end for line, end in zip(lines, ends))
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert decode_chunks(pieces) == decode_chunks([text])


def test_the_whole_body_in_one_chunk_decodes_as_its_lines():
    text = "data: a\r\n\r\n: ping\rdata: b\ndata: c\n\ndata: [DONE]\r\n\r\n"
    assert decode_chunks([text]) == decode(["data: a", "", ": ping", "data: b", "data: c", "", "data: [DONE]", ""])


# --- parse_chat_event -----------------------------------------------------------------


def test_done_sentinel():
    assert parse_chat_event("[DONE]") is DONE
    assert repr(DONE) == "DONE"


def test_content_delta():
    assert parse_chat_event(chunk("שלום")) == ChatDelta("שלום", None)


def test_finish_reason():
    assert parse_chat_event(chunk(None, "stop")) == ChatDelta(text="", finish_reason="stop")


@pytest.mark.parametrize("content", [None, ...], ids=["null", "missing"])
def test_missing_or_null_content_is_empty_text(content):
    assert parse_chat_event(chunk(content)) == ChatDelta("", None)


def test_role_only_first_chunk_is_empty_text():
    data = json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
    assert parse_chat_event(data) == ChatDelta("", None)


@pytest.mark.parametrize(
    "data",
    [
        '{"id":"c1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3}}',
        '{"id":"c1","usage":{"prompt_tokens":9}}',
        '{"choices":[{"index":0,"finish_reason":"stop"}]}',
    ],
    ids=["usage chunk", "no choices key", "no delta"],
)
def test_chunks_without_text_are_tolerated(data):
    assert parse_chat_event(data).text == ""


def test_a_usage_chunk_carries_its_integer_counts():
    data = '{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"details":{"x":1},"flag":true}}'
    assert parse_chat_event(data).usage == {"prompt_tokens": 9, "completion_tokens": 3}
    assert parse_chat_event('{"choices":[],"usage":null}').usage is None


def test_in_band_error_object_raises_with_its_details():
    data = '{"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}'
    with pytest.raises(LlmStreamError) as caught:
        parse_chat_event(data)
    error = caught.value
    assert isinstance(error, UpstreamUnavailable)
    assert (error.message, error.error_type, error.code) == ("Rate limit reached", "requests", "rate_limit_exceeded")
    assert "Rate limit reached" in str(error) and "rate_limit_exceeded" in str(error)


def test_in_band_error_with_numeric_code_and_plain_string():
    with pytest.raises(LlmStreamError) as caught:
        parse_chat_event('{"error": {"message": "overloaded", "code": 529}}')
    assert caught.value.code == "529"
    with pytest.raises(LlmStreamError, match="boom"):
        parse_chat_event('{"error": "boom"}')


@pytest.mark.parametrize(
    "data",
    [
        "",
        "{not json",
        "[1, 2]",
        '"text"',
        '{"choices": "nope"}',
        '{"choices": [3]}',
        '{"choices": [{"delta": "x"}]}',
        '{"choices": [{"delta": {"content": 5}}]}',
    ],
)
def test_data_that_is_not_a_chat_chunk_raises(data):
    with pytest.raises(LlmStreamError):
        parse_chat_event(data)


def test_a_whole_stream_end_to_end():
    body = (
        ": keep-alive\r\n\r\n"
        f"data: {chunk('Hello')}\r\n\r\n"
        f"data: {chunk(', world')}\r\n\r\n"
        f"data: {chunk(None, 'stop')}\r\n\r\n"
        "data: [DONE]\r\n\r\n"
    )
    events = [parse_chat_event(data) for data in decode(body.split("\n"))]
    assert events[-1] is DONE
    assert "".join(e.text for e in events[:-1]) == "Hello, world"
    assert events[-2].finish_reason == "stop"


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n"), max_size=20), max_size=8))
def test_data_lines_round_trip_through_the_decoder(lines):
    expected = "\n".join(lines)
    fed = [f"data: {line}" for line in lines] + [""]
    assert decode(fed) == ([expected] if lines else [])


@given(st.text(max_size=200))
def test_parse_chat_event_raises_only_stream_errors(data):
    try:
        parse_chat_event(data)
    except LlmStreamError:
        pass
