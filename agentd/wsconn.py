"""trio-websocket's handshake for one admitted upgrade.

The front door has read and judged the upgrade request (agentd.http1); this
module hands the same bytes to trio-websocket (`http1.ReplayStream`), which
parses them and answers the 101. The handler then takes the connection over
(agentd.media_socket's ``accepted``): from the 101 on, every frame is read
and written by the call's ``MediaSocket``, which keeps Twilio's transport
rules (a text frame that is not UTF-8 closes with 1007, sent; the message cap
counts UTF-8 bytes). trio-websocket's own reader never sees a frame.

Running a connection we built needs two private methods (`_reader_task`,
`_get_request`): the library has no public hook for a server that already
holds the stream. tests/test_front_door.py and tests/test_media_socket.py pin
the behaviour, so an upgrade of trio-websocket that moves them fails there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
import trio_websocket
from wsproto import WSConnection
from wsproto.connection import ConnectionType

from agentd import media_socket

__all__ = ["serve_websocket"]


async def serve_websocket(stream: trio.abc.Stream,
                          handler: Callable[[trio_websocket.WebSocketRequest], Awaitable[None]], *,
                          max_message_bytes: int, handshake_timeout_s: float, close_timeout_s: float) -> None:
    """Run one server WebSocket on `stream` (which replays the upgrade): handshake, then `handler(request)`.

    As trio-websocket's own server does per connection: a reader task and the
    handler in one nursery; no upgrade request within `handshake_timeout_s`
    closes the stream; after the handler, the connection is closed, waiting at
    most `close_timeout_s` for the peer's close.
    """
    stream = media_socket.handover_stream(stream)  # the handler may take the connection over (accepted)
    async with trio.open_nursery() as nursery:
        connection = trio_websocket.WebSocketConnection(stream, WSConnection(ConnectionType.SERVER),
                                                        max_message_size=max_message_bytes)
        nursery.start_soon(connection._reader_task)  # noqa: SLF001 -- see the module docstring
        with trio.move_on_after(handshake_timeout_s) as handshake:
            request = await connection._get_request()  # noqa: SLF001
        if handshake.cancelled_caught:
            nursery.cancel_scope.cancel()
            await trio.aclose_forcefully(stream)
            return
        try:
            await handler(request)
        finally:
            with trio.move_on_after(close_timeout_s):
                await connection.aclose()
