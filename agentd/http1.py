"""One HTTP/1.1 request in, one response out: the HTTP piece every agentd listener uses.

Contract
--------
- `read_request(stream, max_head_bytes=..., max_body_bytes=...)` reads exactly
  one request from a `trio.abc.Stream` and returns a frozen `Request`: method,
  path and query string (split at the first ``?``), headers with lower-cased
  names, the body, and ``raw`` -- every byte read from the stream, including
  any the client sent past the request. It never writes and never closes.
  Bad input raises a `RequestError` subclass, never anything else: 400
  (`MalformedRequest`), 431 (`HeadTooLarge`), 413 (`BodyTooLarge`), or
  `IncompleteRequest` when the peer closed or reset first (nothing to answer).
  The caller sets the time limit (``trio.fail_after``); a slow peer is the
  caller's policy, not this module's.
- `write_response(stream, response)` sends the status line, the headers,
  ``content-length`` and ``connection: close``, then the body, and closes the
  stream -- whatever happened while sending. One request per connection:
  no keep-alive, so a refused or answered client never holds a socket.
- `ReplayStream(stream, raw)` hands a request to a library that wants to parse
  it again (trio-websocket reads the upgrade itself): it returns ``raw`` first,
  then reads from the wrapped stream.
- `route(routes, request)` picks the handler for ``(method, path)`` from a
  route table and returns its `Response`; 404 for an unknown path, 405 when the
  path is known but not with that method.

Framing is h11's, so what counts as malformed is what h11 refuses. Nothing
here logs: the caller decides what a refusal is worth.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

import h11
import trio

from agentd.errors import CallProtocolError

__all__ = ["BodyTooLarge", "Handler", "HeadTooLarge", "IncompleteRequest", "MalformedRequest",
           "ReplayStream", "Request", "RequestError", "Response", "Routes", "read_request", "route",
           "write_response"]

DEFAULT_MAX_HEAD_BYTES = 8192
DEFAULT_MAX_BODY_BYTES = 65536
_READ_BYTES = 4096


class RequestError(CallProtocolError):
    """The peer did not send a usable request; `status` is the answer owed (None: none possible)."""

    status: int | None = 400


class MalformedRequest(RequestError):
    """Not HTTP/1.1 as h11 reads it (bad request line, bad header, bad framing)."""


class HeadTooLarge(RequestError):
    """The request line and headers exceed max_head_bytes."""

    status = 431


class BodyTooLarge(RequestError):
    """The body exceeds max_body_bytes (declared or as sent)."""

    status = 413


class IncompleteRequest(RequestError):
    """The peer closed or reset the connection before a whole request arrived."""

    status = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One request as read; header names lower-case, values as sent (latin-1 decoded)."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = field(repr=False)
    raw: bytes = field(repr=False)

    @property
    def target(self) -> str:
        """The request target as sent: path, and ``?query`` if there was one."""
        return f"{self.path}?{self.query}" if self.query else self.path

    def header_values(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive), in order."""
        name = name.lower()
        return [value for key, value in self.headers if key == name]

    def header(self, name: str) -> str | None:
        """The value of header `name` if sent exactly once, else None."""
        values = self.header_values(name)
        return values[0] if len(values) == 1 else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    """A whole response; `write_response` adds content-length and connection: close."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = (("content-type", "text/plain; charset=utf-8"),)


Handler = Callable[[Request], Awaitable[Response]]
Routes = Mapping[tuple[str, str], Handler]


async def read_request(stream: trio.abc.Stream, *, max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
                       max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Request:
    """Read one request from `stream` (see the module docstring); raises only RequestError."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
    raw = bytearray()
    head: h11.Request | None = None
    body = bytearray()
    eof = False
    while True:
        event = _next_event(conn, eof=eof)
        if event is h11.NEED_DATA:
            data = await _receive(stream)
            raw += data
            eof = not data
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            head = event
            _check_declared_length(event, max_body_bytes)
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body_bytes:
                raise BodyTooLarge(f"body over {max_body_bytes} bytes")
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            return _request(head, bytes(body), bytes(raw))
        else:  # ConnectionClosed (or PAUSED before a whole request): the peer went away
            raise IncompleteRequest("connection closed before a whole request")


def _next_event(conn: h11.Connection, *, eof: bool):
    """h11's next event, its complaints translated; after EOF, any complaint means "incomplete"."""
    try:
        return conn.next_event()
    except h11.RemoteProtocolError as exc:
        if eof:
            raise IncompleteRequest(f"connection closed before a whole request: {exc}") from exc
        if exc.error_status_hint == 431:
            raise HeadTooLarge("request head too large") from exc
        raise MalformedRequest(f"malformed request: {exc}") from exc


async def _receive(stream: trio.abc.Stream) -> bytes:
    """Some bytes, or b"" at EOF; a reset or a closed stream reads as EOF-before-request."""
    try:
        return await stream.receive_some(_READ_BYTES)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise IncompleteRequest(f"connection lost before a whole request: {type(exc).__name__}") from exc


def _check_declared_length(head: h11.Request, max_body_bytes: int) -> None:
    for name, value in head.headers:
        if name == b"content-length" and int(value) > max_body_bytes:  # h11 has checked it is digits
            raise BodyTooLarge(f"content-length over {max_body_bytes} bytes")


def _request(head: h11.Request, body: bytes, raw: bytes) -> Request:
    target = head.target.decode("latin-1")
    path, _, query = target.partition("?")
    headers = tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in head.headers)
    return Request(method=head.method.decode("latin-1"), path=path, query=query, headers=headers,
                   body=body, raw=raw)


def render_response(response: Response) -> bytes:
    """The response's bytes: status line, headers, content-length, connection: close, body."""
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    for name, value in response.headers:
        if any(c in name + value for c in "\r\n\0") or ":" in name:
            raise ValueError(f"header {name!r}: CR, LF or NUL in a header, or ':' in its name")
        lines.append(f"{name}: {value}")
    lines += [f"content-length: {len(response.body)}", "connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + response.body


async def write_response(stream: trio.abc.Stream, response: Response) -> None:
    """Send `response` and close `stream`, even if sending fails or is cancelled.

    A peer that is gone or not reading is not an error here: the response is
    best effort, the close is not.
    """
    try:
        await stream.send_all(render_response(response))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def route(routes: Routes, request: Request) -> Response:
    """The response of the handler for (request.method, request.path); 404 or 405 if none."""
    handler = routes.get((request.method, request.path))
    if handler is not None:
        return await handler(request)
    allowed = sorted(method for method, path in routes if path == request.path)
    if allowed:
        return Response(status=405, body=b"method not allowed\n",
                        headers=(("allow", ", ".join(allowed)), ("content-type", "text/plain; charset=utf-8")))
    return Response(status=404, body=b"not found\n")


class ReplayStream(trio.abc.Stream):
    """`stream`, with `raw` returned first: lets a second parser read a request already read."""

    def __init__(self, stream: trio.abc.Stream, raw: bytes) -> None:
        self.stream = stream
        self._pending = memoryview(raw)

    @property
    def replayed(self) -> bool:
        """Whether every byte of ``raw`` has been read: from now on this is ``stream`` itself."""
        return not self._pending

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._pending:
            size = len(self._pending) if max_bytes is None else max_bytes
            chunk, self._pending = bytes(self._pending[:size]), self._pending[size:]
            await trio.lowlevel.checkpoint()
            return chunk
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()  # type: ignore[attr-defined]  -- SocketStream has it

    async def aclose(self) -> None:
        await self.stream.aclose()
