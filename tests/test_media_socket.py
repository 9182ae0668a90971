"""agentd's WebSocket after the handshake (``agentd.media_socket``), against a real trio-websocket client.

The server side is built as ``agentd serve`` builds it: trio-websocket's
server does the handshake on a wrapped stream (``agentd.wsconn``) and the
handler takes the connection over with ``accepted``. The peer is an ordinary
trio-websocket client over 127.0.0.1, so every frame crosses a real socket.
What is specified: messages arrive whole and in order, both ways, whether
their frames are simple (read by agentd.codecs.ws_frames) or not (wsproto's,
from that frame on); a ping is answered; either side's close is a proper close handshake with its code and
reason; a message over the size cap closes with 1009; a peer that drops TCP
ends ``get_message`` with 1006; and once the handler is done, nothing of the
connection is left running (trio-websocket's parked reader included).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing
import trio_websocket
from test_leaks import count_tasks

from agentd import media_socket, wsconn
from agentd.media_socket import MediaSocket

GUARD_S = 10  # on Trio's clock: guards against hangs, not performance
CAP = 1000  # the server's max_message_size in these tests


async def serve(nursery: trio.Nursery, talk: Callable[[MediaSocket], Awaitable[None]]) -> tuple[int, list]:
    """A server whose handler runs ``talk(socket)``; returns its port and what each handler ended with."""
    outcomes: list = []

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        async with media_socket.accepted(request, max_message_size=CAP) as socket:
            try:
                await talk(socket)
                outcomes.append("returned")
            except trio_websocket.ConnectionClosed as closed:
                outcomes.append(closed.reason)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(functools.partial(trio.serve_listeners, lambda stream: wsconn.serve_websocket(
        stream, handler, max_message_bytes=CAP, handshake_timeout_s=GUARD_S, close_timeout_s=1), listeners))
    return listeners[0].socket.getsockname()[1], outcomes


@contextlib.asynccontextmanager
async def served(talk: Callable[[MediaSocket], Awaitable[None]]) -> AsyncIterator[tuple[int, list]]:
    """``serve`` under the test's guard; stopped when the block ends."""
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            yield await serve(nursery, talk)
            nursery.cancel_scope.cancel()


async def read_forever(socket: MediaSocket) -> None:
    while True:
        await socket.get_message()


async def wait_for(outcomes: list) -> None:
    """Until the handler has ended (polled under the test's guard)."""
    while not outcomes:
        await trio.sleep(0.01)


def reader(count: int, received: list) -> Callable[[MediaSocket], Awaitable[None]]:
    """A handler that reads ``count`` messages into ``received``, then returns."""
    async def read(socket: MediaSocket) -> None:
        for _ in range(count):
            received.append(await socket.get_message())
    return read


@contextlib.asynccontextmanager
async def raw_peer(port: int) -> AsyncIterator[trio.SocketStream]:
    """A client past the handshake that writes frames by hand (closed without a close frame)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await _handshake(stream)
        yield stream
    finally:
        await stream.aclose()


def dial(port: int):
    return trio_websocket.open_websocket("127.0.0.1", port, "/media", use_ssl=False, disconnect_timeout=2)


async def test_messages_cross_whole_and_in_order_both_ways():
    async def echo(socket: MediaSocket) -> None:
        while True:
            await socket.send_message(await socket.get_message())

    async with served(echo) as (port, _), dial(port) as ws:
        for message in ["first", "x" * 900, b"\x00\xff binary", "last"]:
            await ws.send_message(message)
            assert await ws.get_message() == message


async def test_a_fragmented_message_is_delivered_joined():
    received: list = []
    async with served(reader(1, received)) as (port, outcomes), raw_peer(port) as peer:
        # One text message in three frames (FIN clear, clear, set), masked as a client must.
        await peer.send_all(_frame(0x1, b"con", fin=False) + _frame(0x0, b"nec", fin=False)
                            + _frame(0x0, b"ted", fin=True))
        await wait_for(outcomes)
    assert received == ["connected"]


async def test_a_ping_is_answered_with_a_pong():
    async with served(read_forever) as (port, _), dial(port) as ws:
        await ws.ping(b"are you there")  # returns once the matching pong came back


async def test_a_ping_between_messages_is_answered_and_the_messages_go_on():
    received: list = []
    async with served(reader(3, received)) as (port, outcomes), raw_peer(port) as peer:
        await peer.send_all(_frame(0x1, b"one", fin=True) + _frame(0x9, b"hi", fin=True) + _frame(0x1, b"two", fin=True))
        assert await peer.receive_some(4096) == b"\x8a\x02hi"  # the pong, unmasked from a server
        await peer.send_all(_frame(0x2, b"three", fin=True))
        await wait_for(outcomes)
    assert received == ["one", "two", b"three"]


async def test_a_frame_that_arrives_a_few_bytes_at_a_time_is_delivered_whole():
    received: list = []
    frames = _frame(0x1, b"x" * 100, fin=True) + _frame(0x1, b"y" * 100, fin=True)
    async with served(reader(2, received)) as (port, outcomes), raw_peer(port) as peer:
        for i in range(0, len(frames), 7):
            await peer.send_all(frames[i:i + 7])
            await trio.testing.wait_all_tasks_blocked()  # the server has read what came so far
        await wait_for(outcomes)
    assert received == ["x" * 100, "y" * 100]


async def test_after_a_fragmented_message_every_later_message_still_arrives():
    # The fragment hands the connection to wsproto for good; nothing may be lost at the switch.
    received: list = []
    async with served(reader(3, received)) as (port, outcomes), raw_peer(port) as peer:
        await peer.send_all(_frame(0x1, b"simple", fin=True) + _frame(0x1, b"frag", fin=False)
                            + _frame(0x0, b"mented", fin=True) + _frame(0x1, b"after", fin=True))
        await wait_for(outcomes)
    assert received == ["simple", "fragmented", "after"]


async def test_the_peers_close_is_echoed_and_ends_get_message_with_its_code_and_reason():
    async with served(read_forever) as (port, outcomes):
        async with dial(port) as ws:
            await ws.aclose(code=4001, reason="caller hung up")
        await wait_for(outcomes)
    assert ws.closed.code == 4001  # the client's close handshake completed: the server echoed it
    assert (outcomes[0].code, outcomes[0].reason) == (4001, "caller hung up")


async def test_the_servers_close_carries_its_code_and_reason_to_the_peer():
    async def hang_up(socket: MediaSocket) -> None:
        assert await socket.get_message() == "stop"
        await socket.aclose(code=1000, reason="bye")
        with pytest.raises(trio_websocket.ConnectionClosed):
            await socket.send_message("too late")

    async with served(hang_up) as (port, outcomes), dial(port) as ws:
        await ws.send_message("stop")
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
    assert (closed.value.reason.code, closed.value.reason.reason) == (1000, "bye")
    assert outcomes == ["returned"]


async def test_a_message_over_the_cap_closes_with_1009():
    async with served(read_forever) as (port, outcomes):
        async with dial(port) as ws:
            await ws.send_message("x" * (CAP + 1))
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
        await wait_for(outcomes)
    assert closed.value.reason.code == 1009
    assert outcomes[0].code == 1009


async def test_a_peer_that_drops_tcp_ends_get_message_with_1006_and_leaves_no_task_behind():
    async with served(read_forever) as (port, outcomes):
        tasks_before = count_tasks()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await _handshake(stream)
        await stream.send_all(_frame(0x1, b"hello", fin=True))
        await stream.aclose()  # no close frame
        await wait_for(outcomes)
        # trio-websocket's connection (its parked reader included) ends with the handler.
        while count_tasks() > tasks_before:
            await trio.sleep(0.01)
    assert outcomes[0].code == 1006


async def _handshake(stream: trio.SocketStream) -> None:
    await stream.send_all(b"GET /media HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n")
    response = b""
    while b"\r\n\r\n" not in response:
        response += await stream.receive_some(4096)
    assert response.startswith(b"HTTP/1.1 101")


def _frame(opcode: int, payload: bytes, *, fin: bool) -> bytes:
    """One masked client frame (payload < 126 bytes)."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + mask + masked
