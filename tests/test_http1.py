"""agentd.http1: one request read with limits, one response written and the stream closed.

Tier (b): bytes in over a Trio memory stream pair, a Request (or a typed
error) out; responses checked as bytes on the wire, then the stream closed.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from agentd.http1 import (
    BodyTooLarge,
    HeadTooLarge,
    IncompleteRequest,
    MalformedRequest,
    ReplayStream,
    Request,
    RequestError,
    Response,
    read_request,
    render_response,
    route,
    write_response,
)

UPGRADE = (b"GET /media?x=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
           b"X-Twilio-Signature: abc=\r\n\r\n")


async def read_from(data: bytes, *, eof: bool = True, **limits) -> Request:
    """read_request over a memory stream that carries `data` (then EOF, if `eof`)."""
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(data)
    if eof:
        await client.send_eof()
    with trio.fail_after(5):
        return await read_request(server, **limits)


async def test_an_upgrade_is_read_with_its_query_lower_cased_headers_and_raw_bytes():
    request = await read_from(UPGRADE + b"\x81\x05early", eof=False)
    assert (request.method, request.path, request.query) == ("GET", "/media", "x=1")
    assert request.target == "/media?x=1"
    assert request.header("x-twilio-signature") == "abc="
    assert request.header("UPGRADE") == "websocket"
    assert request.body == b""
    # Every byte read is kept, including a frame the client sent early: the replay needs them.
    assert request.raw == UPGRADE + b"\x81\x05early"


async def test_a_post_body_is_read_whole():
    request = await read_from(b"POST /twilio/voice HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n"
                              b"Content-Type: application/x-www-form-urlencoded\r\n\r\nCallSid=CA1")
    assert (request.method, request.path, request.query, request.body) == ("POST", "/twilio/voice", "",
                                                                           b"CallSid=CA1")


async def test_a_repeated_header_is_not_one_value():
    request = await read_from(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert request.header_values("x-a") == ["1", "2"]
    assert request.header("x-a") is None


@pytest.mark.parametrize("data", [b"NOT HTTP\r\n\r\n", b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
                                  b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
                                  b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n"])
async def test_malformed_requests_are_a_400(data):
    with pytest.raises(MalformedRequest) as caught:
        await read_from(data)
    assert caught.value.status == 400


async def test_a_head_over_the_limit_is_a_431_without_reading_on():
    with pytest.raises(HeadTooLarge) as caught:
        await read_from(b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"a" * 10_000, eof=False,
                        max_head_bytes=1024)
    assert caught.value.status == 431


async def test_a_declared_body_over_the_limit_is_a_413_before_it_is_read():
    with pytest.raises(BodyTooLarge) as caught:
        await read_from(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n", eof=False,
                        max_body_bytes=1000)
    assert caught.value.status == 413


async def test_a_chunked_body_over_the_limit_is_a_413():
    chunk = b"400\r\n" + b"a" * 1024 + b"\r\n"
    with pytest.raises(BodyTooLarge):
        await read_from(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3,
                        eof=False, max_body_bytes=2048)


@pytest.mark.parametrize("data", [b"", b"GET / HTTP/1.1\r\nHost: a\r\n", b"POST / HTTP/1.1\r\nHost: a\r\n"
                                  b"Content-Length: 5\r\n\r\nab"])
async def test_a_peer_that_leaves_early_is_an_incomplete_request_with_nothing_to_answer(data):
    with pytest.raises(IncompleteRequest) as caught:
        await read_from(data)
    assert caught.value.status is None


async def test_a_reset_reads_as_an_incomplete_request():
    stream = trio.testing.MemoryReceiveStream()

    async def reset(max_bytes=None):
        raise trio.BrokenResourceError("connection reset")

    stream.receive_some = reset
    with pytest.raises(IncompleteRequest):
        await read_request(trio.StapledStream(trio.testing.MemorySendStream(), stream))


def test_every_request_error_is_a_protocol_error_with_its_status():
    assert all(issubclass(cls, RequestError) for cls in (MalformedRequest, HeadTooLarge, BodyTooLarge,
                                                         IncompleteRequest))
    assert [cls.status for cls in (MalformedRequest, HeadTooLarge, BodyTooLarge)] == [400, 431, 413]


def test_a_response_says_its_length_and_connection_close():
    wire = render_response(Response(status=403, body=b"forbidden\n"))
    assert wire == (b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"content-length: 10\r\nconnection: close\r\n\r\nforbidden\n")


def test_a_header_that_would_split_the_response_is_refused():
    with pytest.raises(ValueError):
        render_response(Response(status=200, headers=(("x-a", "1\r\nset-cookie: a=b"),)))


async def test_write_response_sends_then_closes_the_stream():
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        await write_response(server, Response(status=404, body=b"not found\n"))
        received = b""
        while chunk := await client.receive_some():
            received += chunk
    assert received.startswith(b"HTTP/1.1 404 Not Found\r\n") and received.endswith(b"\r\n\r\nnot found\n")
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")


async def test_write_response_to_a_peer_that_is_gone_still_closes():
    client, server = trio.testing.memory_stream_pair()
    await client.aclose()
    with trio.fail_after(5):
        await write_response(server, Response(status=503, body=b"busy\n"))
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")


async def test_replay_stream_returns_the_raw_bytes_first_then_the_stream():
    client, server = trio.testing.memory_stream_pair()
    replay = ReplayStream(server, b"abcdef")
    await client.send_all(b"ghi")
    with trio.fail_after(5):
        assert await replay.receive_some(4) == b"abcd"
        assert await replay.receive_some() == b"ef"
        assert await replay.receive_some() == b"ghi"
        await replay.send_all(b"out")
        assert await client.receive_some() == b"out"


async def test_route_dispatches_on_method_and_path():
    async def voice(request: Request) -> Response:
        return Response(status=200, body=request.body)

    routes = {("POST", "/twilio/voice"): voice}
    post = await read_from(b"POST /twilio/voice?a=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
    get = await read_from(b"GET /twilio/voice HTTP/1.1\r\nHost: a\r\n\r\n")
    other = await read_from(b"POST /elsewhere HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert await route(routes, post) == Response(status=200, body=b"hi")
    refused = await route(routes, get)
    assert (refused.status, dict(refused.headers)["allow"]) == (405, "POST")
    assert (await route(routes, other)).status == 404
