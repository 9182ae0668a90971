"""A call's WebSocket once the handshake is done: one reader, one writer, no task in between.

The front door judges the upgrade request and trio-websocket answers it with
the 101 (agentd.wsconn). For the data phase trio-websocket would run a
reader task per connection that parses frames and hands each message to ``get_message``
through a memory channel: two task switches and a channel per 20 ms media
message. At 100 calls that hop was a third of agentd's CPU (bench/RESULTS.md),
so after the handshake a call reads and writes frames itself, in the task
that calls ``get_message``: ``MediaSocket`` reads the TCP socket directly,
parses the simple frames a media stream is made of with
agentd.codecs.ws_frames, and from the first frame that is not simple (a
close, a fragment, anything odd) lets a ``wsproto`` frame-level connection
parse every byte. Frames it sends are wsproto's.

The handover. Each admitted stream reaches trio-websocket wrapped in a
``HandoverStream`` (``handover_stream``, called by agentd.wsconn).
``accepted(request)`` first parks trio-websocket's reader
(its pending read is cancelled before any byte arrives: a client sends no
frame before the 101), then lets trio-websocket send the 101, then gives the
stream to a ``MediaSocket``. When the call ends the socket closes the
connection itself and lets the parked reader see end-of-stream, so
trio-websocket's own bookkeeping ends as for a dropped peer.

The surface is the slice of ``trio_websocket.WebSocketConnection`` a call
uses (``get_message``, ``send_message``, ``aclose``), with its exceptions
(``ConnectionClosed`` carrying a ``CloseReason``), and Twilio's transport
rules, which are kept here and nowhere else: a message over ``max_message_size`` UTF-8 bytes closes with
1009, a text frame that is not UTF-8 with 1007 (the code is sent, not just
the TCP connection closed), a peer's ping is answered, a peer's close is
echoed.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import AsyncIterator

import trio
import trio_websocket
from trio_websocket import CloseReason, ConnectionClosed
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason as CloseCode

from agentd import http1
from agentd.codecs import ws_frames

_RECEIVE_BYTES = 65536  # one read takes whatever piled up (several messages when the loop was busy)
_ABNORMAL = CloseCode.ABNORMAL_CLOSURE.value  # 1006: the TCP connection ended without a close frame
_TOO_BIG = CloseCode.MESSAGE_TOO_BIG.value  # 1009

# The connection being served by the current task: trio-websocket calls the
# handler in the task that handles the connection, so the handler finds its
# stream here without reaching into trio-websocket.
_current: contextvars.ContextVar[HandoverStream] = contextvars.ContextVar("agentd_handover_stream")


class HandoverStream(trio.abc.HalfCloseableStream):
    """The TCP stream as trio-websocket sees it: its own until ``park_reader()``."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self._parked = False
        self._reading: trio.CancelScope | None = None
        self._released = trio.Event()
        self.leftover = b""  # bytes read for trio-websocket after it was parked (never, from a sane client)

    def park_reader(self) -> None:
        """From now on trio-websocket reads nothing: its pending read is called off."""
        self._parked = True
        if self._reading is not None:
            self._reading.cancel()

    def release(self) -> None:
        """Let the parked reader see end-of-stream, so trio-websocket's connection ends."""
        self._released.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._parked:
            data = b""
            with trio.CancelScope() as self._reading:
                data = await self.stream.receive_some(max_bytes)
            self._reading = None
            if not self._parked:
                return data
            self.leftover += data
        await self._released.wait()
        return b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._released.is_set():
            raise trio.ClosedResourceError("the call owns this connection now")
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        self.release()
        await self.stream.aclose()


def handover_stream(stream: trio.abc.Stream) -> HandoverStream:
    """Wrap a connection's stream before trio-websocket gets it; call in the task that runs the handler."""
    handover = HandoverStream(stream)
    _current.set(handover)
    return handover


@contextlib.asynccontextmanager
async def accepted(request: trio_websocket.WebSocketRequest, *,
                   max_message_size: int) -> AsyncIterator[MediaSocket]:
    """Accept the upgrade (trio-websocket answers 101) and yield the call's ``MediaSocket``.

    On exit the TCP connection is closed (without a close frame if the call
    did not ``aclose`` it) and trio-websocket's reader is let go.
    """
    handover = _current.get()
    handover.park_reader()
    try:
        await request.accept()
        socket = MediaSocket(handover.stream, max_message_size=max_message_size, leftover=handover.leftover)
        try:
            yield socket
        finally:
            with trio.CancelScope(shield=True):
                await socket.abort()
    finally:
        handover.release()


class MediaSocket:
    """A server-side WebSocket in the OPEN state: ``get_message`` in one task, ``send_message`` in another."""

    def __init__(self, stream: trio.abc.Stream, *, max_message_size: int, leftover: bytes = b""):
        self._stream = stream
        self._socket = _tcp_socket(stream)  # read and written directly when there is one (see _read)
        self._max_message_size = max_message_size
        self._proto = Connection(ConnectionType.SERVER)
        # Frames are parsed by ws_frames while they are simple; from the first one that is not,
        # every byte goes to wsproto for the rest of the connection.
        self._simple = True
        self._buffer: bytes | bytearray = leftover
        self._pos = 0
        self._parts: list[str | bytes] = []
        self._size = 0
        self._close_reason: CloseReason | None = None
        self._send_lock = trio.Lock()  # the reader's pongs and close echo meet the TX pacer's frames

    @property
    def closed(self) -> CloseReason | None:
        return self._close_reason

    async def get_message(self) -> str | bytes:
        """The next whole message; raises ConnectionClosed once the connection is closed."""
        while True:
            if self._simple:
                message = await self._next_simple()
                if message is not None:
                    return message
            if not self._simple:
                for event in self._proto.events():
                    message = await self._on_event(event)
                    if message is not None:
                        return message
            if self._close_reason is not None:
                raise ConnectionClosed(self._close_reason)
            await self._receive()

    async def send_message(self, message: str | bytes) -> None:
        """Send one message; raises ConnectionClosed if the connection is closed or closing."""
        if self._close_reason is not None:
            raise ConnectionClosed(self._close_reason)
        event = TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        await self._send(event)

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Send a close frame, wait for the peer's (the caller sets the deadline), close TCP."""
        self._hand_to_wsproto()  # the close handshake is wsproto's
        try:
            if self._close_reason is None and self._proto.state is ConnectionState.OPEN:
                self._close_reason = CloseReason(1000, None)
                await self._send(CloseConnection(code=code, reason=reason))
                while self._proto.state is not ConnectionState.CLOSED:
                    for _event in self._proto.events():
                        pass  # messages after our close are dropped; the peer's close ends the loop
                    if self._proto.state is not ConnectionState.CLOSED:
                        await self._receive()
        except ConnectionClosed:
            pass
        finally:
            await self.abort()

    async def abort(self) -> None:
        """Close the TCP connection now (idempotent)."""
        if self._close_reason is None:
            self._close_reason = CloseReason(_ABNORMAL, None)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._stream.aclose()

    # -- internals -----------------------------------------------------------

    async def _receive(self) -> None:
        try:
            data = await self._read()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:  # the peer vanished without a close frame
            await self.abort()
            raise ConnectionClosed(self._close_reason)
        if not self._simple:
            self._proto.receive_data(data)
        elif self._pos >= len(self._buffer):
            self._buffer, self._pos = data, 0  # the usual case: every byte before was parsed
        else:
            # The rest of a frame: append to a bytearray (amortized constant time), so a peer that
            # sends a big frame a byte at a time costs linear, not quadratic, copying.
            rest = self._buffer[self._pos:]
            self._buffer = rest if isinstance(rest, bytearray) else bytearray(rest)
            self._buffer += data
            self._pos = 0

    async def _next_simple(self) -> str | bytes | None:
        """The next message of simple frames (pings answered on the way), or None: more bytes are
        needed, or a frame that is not simple handed everything from it on to wsproto."""
        while True:
            try:
                frame = ws_frames.parse(self._buffer, self._pos, self._max_message_size)
            except ws_frames.NotSimple:
                self._hand_to_wsproto()
                return None
            if frame is None:
                return None
            opcode, payload, self._pos = frame
            if opcode == ws_frames.PING:
                await self._send(Pong(payload=payload))
            elif opcode != ws_frames.PONG:
                return payload

    def _hand_to_wsproto(self) -> None:
        """From now on wsproto parses every byte, starting with those not parsed yet."""
        if self._simple:
            self._simple = False
            self._proto.receive_data(self._buffer[self._pos:])
            self._buffer, self._pos = b"", 0

    async def _read(self) -> bytes:
        """Whatever the peer sent since the last read (b"" at end of stream).

        On a TCP socket this is one readiness wait and one ``os.read``:
        Trio's ``SocketStream.receive_some`` first tries a read that fails
        (the 20 ms message is never there yet) and yields once more after
        the one that succeeds -- two system calls and two scheduler passes
        per message, a fifth of a message's cost at 100 calls
        (bench/RESULTS.md). The wait is a checkpoint, so a flooding peer
        cannot starve the other calls.
        """
        sock = self._socket
        if sock is None:
            return await self._stream.receive_some(_RECEIVE_BYTES)
        while True:
            await trio.lowlevel.wait_readable(sock)
            fd = sock.fileno()
            if fd < 0:  # our own writer closed it while we were being woken
                raise trio.ClosedResourceError
            try:
                return os.read(fd, _RECEIVE_BYTES)
            except BlockingIOError:
                continue
            except OSError as exc:  # reset by the peer
                raise trio.BrokenResourceError from exc

    async def _write(self, data: bytes) -> None:
        """Send ``data``: into the socket's buffer at once when it has room, else through Trio.

        Trio's ``send_all`` yields after every successful send; a 20 ms frame
        always fits the kernel's buffer, so the write is done here and the
        pacer yields only on its metronome. Cancellation is still honoured.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        sock = self._socket
        fd = sock.fileno() if sock is not None else -1
        if fd >= 0:
            try:
                sent = os.write(fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise trio.BrokenResourceError from exc
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        await self._stream.send_all(data)

    async def _on_event(self, event: object) -> str | bytes | None:
        """Carry out one wsproto event; a finished message is returned, everything else is handled here."""
        if isinstance(event, Message):
            return await self._on_data(event)
        if isinstance(event, Ping):
            await self._send(event.response())
        elif isinstance(event, CloseConnection):
            await self._on_close(event)
        return None  # a pong: we send no pings

    async def _on_data(self, event: Message) -> str | bytes | None:
        # The cap is in bytes: a text fragment counts its UTF-8 size, not its characters.
        size = len(event.data.encode("utf-8", "surrogatepass")) if isinstance(event, TextMessage) else len(event.data)
        self._size += size
        self._parts.append(event.data)
        if self._size > self._max_message_size:
            # Refused without buffering the rest, as trio-websocket's transport does.
            err = f"Exceeded maximum message size: {self._max_message_size} bytes"
            self._parts, self._size = [], 0
            self._close_reason = CloseReason(_TOO_BIG, err)
            await self._send(CloseConnection(code=_TOO_BIG, reason=err))
            await self.abort()
            raise ConnectionClosed(self._close_reason)
        if not event.message_finished:
            return None
        parts, self._parts, self._size = self._parts, [], 0
        if len(parts) == 1:
            return parts[0]
        return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)

    async def _on_close(self, event: CloseConnection) -> None:
        """The peer closed, or sent what wsproto cannot parse (e.g. a text frame that is not
        UTF-8: 1007): echo the peer's close, or send that code, then close TCP."""
        reason = CloseReason(event.code, event.reason or None)
        if self._proto.state is ConnectionState.REMOTE_CLOSING:
            self._close_reason = reason
            with contextlib.suppress(ConnectionClosed):
                await self._send(event.response())
        elif self._proto.state is ConnectionState.OPEN:  # a parse failure: the peer sent no close
            self._close_reason = reason
            with contextlib.suppress(ConnectionClosed):
                await self._send(CloseConnection(code=event.code, reason=event.reason))
        self._close_reason = reason
        await self.abort()
        raise ConnectionClosed(reason)

    async def _send(self, event: object) -> None:
        data = self._proto.send(event)
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            await self._write(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self.abort()
            raise ConnectionClosed(self._close_reason) from None
        finally:
            self._send_lock.release()


def _tcp_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The TCP socket right under ``stream``, if nothing else sits in between."""
    while isinstance(stream, http1.ReplayStream) and stream.replayed:
        stream = stream.stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None
