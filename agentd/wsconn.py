"""trio-websocket for one admitted upgrade, with Twilio's transport rules kept exactly.

The front door has read and judged the upgrade request (agentd.http1); this
module hands the same bytes to trio-websocket (`http1.ReplayStream`), which
does the handshake and then runs the connection, and fixes two things it gets
wrong for a server facing hostile peers:

- **Invalid UTF-8 closes with 1007.** wsproto reports a text frame that is not
  UTF-8 as a close event with code 1007, but trio-websocket then closes the
  TCP connection without sending any close frame (it answers only a close the
  peer sent). Here that code is sent first.
- **The message cap is in bytes.** trio-websocket adds up ``len(data)`` of
  each message fragment, which for text counts characters: a message of
  three-byte characters could be three times the cap. Here a text fragment
  counts its UTF-8 size.

Both are overrides of `WebSocketConnection` internals, and running a
connection we built needs two more (`_reader_task`, `_get_request`): the
library has no public hook for either. tests/test_front_door.py pins each
behaviour, so an upgrade of trio-websocket that moves them fails there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
import trio_websocket
from wsproto import ConnectionState, WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import BytesMessage, CloseConnection, TextMessage

from agentd import media_socket

__all__ = ["serve_websocket"]


class _TwilioWebSocket(trio_websocket.WebSocketConnection):
    """A server WebSocketConnection that closes 1007 on bad UTF-8 and caps messages in bytes."""

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        # A close wsproto made up from a parse failure arrives while the connection is still
        # OPEN (a close the peer sent would have moved it to REMOTE_CLOSING): send its code.
        if self._wsproto.state is ConnectionState.OPEN:
            await self._send(CloseConnection(code=event.code, reason=event.reason))
        await super()._handle_close_connection_event(event)

    async def _handle_message_event(self, event: BytesMessage | TextMessage) -> None:
        if isinstance(event, TextMessage):
            # The parent adds len(event.data): add the rest of the UTF-8 size first.
            self._message_size += len(event.data.encode("utf-8", "surrogatepass")) - len(event.data)
        await super()._handle_message_event(event)


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
        connection = _TwilioWebSocket(stream, WSConnection(ConnectionType.SERVER),
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
