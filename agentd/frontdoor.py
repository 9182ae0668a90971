"""The front door: every TCP connection to agentd's listener, from accept to a call or a close.

Theory of operation
-------------------
agentd reads each connection's first request itself (agentd.http1), so it
decides, and closes, before any WebSocket library is involved:

1. **Accept.** Our own accept loop: when the process is out of file
   descriptors (EMFILE/ENFILE, or the kernel out of buffers), it sheds the
   oldest pending connection of the address holding the most (or, with none
   pending, backs off) and logs one WARNING per `EMFILE_WARN_INTERVAL_S` with
   a count, instead of trio's traceback ten times a second; the daemon and
   its calls go on, and new connections keep being accepted.
2. **Pending budget.** From accept until Twilio's ``start`` (or until an
   HTTP request is answered) a connection is *pending*: it holds one of
   ``server.max_pending`` places and one of ``server.max_pending_per_ip``
   places of its source address, never one of ``server.max_calls``. No place
   free: 503 at once. One deadline, ``server.start_timeout_ms`` from accept,
   covers the request, the handshake and ``start``. So a flood of silent
   connections from one address -- even with a captured, valid signature --
   fills that address's share for at most that long and never keeps out a
   call from another address.
3. **The request.** An upgrade on ``server.path`` must be a WebSocket upgrade
   (else 426), the daemon must not be draining (503), the signature must
   match the URL including its query (403), and a call slot must be free
   (503). Any other path goes to the route table ``{(method, path): handler}``
   (404/405 when absent). Every refusal is answered and the socket closed at
   once; an admitted upgrade is replayed into trio-websocket, which does the
   handshake from the same bytes.
4. **Start.** `Admission` is what the call code calls once ``start`` has come
   and passed the per-call token: the connection leaves the pending budget
   and takes a call slot (refused 1013 "busy" if the last one went meanwhile).

Every refusal is counted in ``server.refused[reason]`` and logged as one INFO
line (`RefusalLog`), peer-chosen text escaped; past a few lines per interval
the rest are summed into one line per interval, so a flood cannot grow the
log faster than that.
"""

from __future__ import annotations

import errno
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio
import trio_websocket

from agentd import http1, logsafe, media_socket, wsconn
from agentd.errors import CallProtocolError
from agentd.media_socket import MediaSocket
from agentd.security import UpgradeRefused

if TYPE_CHECKING:
    from agentd.server import Server

__all__ = ["Admission", "CallBusy", "FrontDoor", "PendingBudget", "RefusalLog"]

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 8192
MAX_BODY_BYTES = 65536  # a voice webhook POST is ~1 KB of form fields
REFUSAL_LOG_INTERVAL_S = 10.0
REFUSAL_LINES_PER_INTERVAL = 5
EMFILE_WARN_INTERVAL_S = 10.0
_ACCEPT_BACKOFF_S = 0.1
# Out of descriptors or kernel memory: a refusal to accept now, not a broken listener.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_CLOSE_TIMEOUT_S = 1.0


class CallBusy(CallProtocolError):
    """``start`` came, but every call slot was taken meanwhile; the socket closes (1013)."""


class PendingBudget:
    """Places for connections that have not started: `total` in all, `per_source` per address.

    Holders are kept in order per source, so that when the process runs out of
    file descriptors `evictee` can name the one to shed: the oldest of the
    source holding the most -- a flood's, never a lone caller's.
    """

    def __init__(self, *, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self.held = 0
        self._by_source: dict[str, dict[object, None]] = {}

    def take(self, source: str, holder: object) -> bool:
        """Take a place for `holder` from `source`; False (and nothing taken) when none is free."""
        if self.held >= self.total or len(self._by_source.get(source, ())) >= self.per_source:
            return False
        self.held += 1
        self._by_source.setdefault(source, {})[holder] = None
        return True

    def give_back(self, source: str, holder: object) -> None:
        self.held -= 1
        holders = self._by_source[source]
        del holders[holder]
        if not holders:
            del self._by_source[source]

    def evictee(self) -> object | None:
        """The holder to shed first (see the class docstring), or None when nothing is pending."""
        if not self._by_source:
            return None
        return next(iter(max(self._by_source.values(), key=len)))


class RefusalLog:
    """One INFO line per refusal, at most `lines` per interval; the rest summed once per interval.

    Past the budget a refusal is still logged, at DEBUG, so nothing is lost
    to an operator who turns DEBUG on; at INFO the log grows by at most
    `lines` + 1 lines per interval whatever the flood.

    Sans-I/O: `note` and `flush` take the time; `run` is the Trio task that
    flushes every interval.
    """

    def __init__(self, logger: logging.Logger, *, interval_s: float = REFUSAL_LOG_INTERVAL_S,
                 lines: int = REFUSAL_LINES_PER_INTERVAL) -> None:
        self._log = logger
        self.interval_s = interval_s
        self._lines = lines
        self._logged = 0
        self._unlogged: Counter[str] = Counter()

    def note(self, reason: str, peer: str, detail: str) -> None:
        """Log this refusal, or count it for the interval's summary line (and log it at DEBUG)."""
        if self._logged < self._lines:
            self._logged += 1
            level = logging.INFO
        else:
            self._unlogged[reason] += 1
            level = logging.DEBUG  # every refusal stays visible to whoever asks for DEBUG
        if self._log.isEnabledFor(level):
            self._log.log(level, "refusing a call from %s: %s: %s", peer, reason, logsafe.escape(detail))

    def flush(self) -> None:
        """End the interval: one line summing what was not logged, if anything."""
        if self._unlogged:
            summary = ", ".join(f"{reason}={n}" for reason, n in sorted(self._unlogged.items()))
            self._log.info("refused %d more connections in the last %gs (%s)", sum(self._unlogged.values()),
                           self.interval_s, summary)
        self._logged = 0
        self._unlogged.clear()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.interval_s)
            self.flush()


class _OutOfDescriptors:
    """Out of descriptors: one WARNING per interval, with how many accepts failed since the last."""

    def __init__(self) -> None:
        self._next_at = -math.inf
        self._since = 0

    def note(self, exc: OSError) -> None:
        self._since += 1
        now = trio.current_time()
        if now >= self._next_at:
            log.warning("cannot accept connections: %s (%d times since the last warning); shedding pending "
                        "connections of the busiest address, else retrying every %gs -- raise the fd limit "
                        "(LimitNOFILE) or lower server.max_calls",
                        errno.errorcode.get(exc.errno or 0, exc), self._since, _ACCEPT_BACKOFF_S)
            self._next_at = now + EMFILE_WARN_INTERVAL_S
            self._since = 0


class Admission:
    """A pending connection's way to a call slot.

    `start_wait` carries the deadline for ``start`` (``server.start_timeout_ms``
    from accept); the call code waits for ``start`` inside it, and `admit`
    lifts it. `refuse` counts and logs a refusal the call code decided.
    """

    def __init__(self, door: FrontDoor, stream: trio.SocketStream, source: str, peer: str,
                 deadline: float) -> None:
        self._door = door
        self._stream = stream
        self._source = source
        self.peer = peer
        self.start_wait = trio.CancelScope(deadline=deadline)
        self.scope = trio.CancelScope()  # the whole connection: what `evict` cancels
        self.pending = False
        self.active = False

    def take_pending(self) -> bool:
        """Take a place in the pending budget; False when there is none for this source."""
        self.pending = self._door.budget.take(self._source, self)
        return self.pending

    def evict(self) -> None:
        """Shed this pending connection now: its descriptor is closed before this returns."""
        self.refuse("pending", "shed: the process is out of file descriptors")
        self.leave_pending()
        self.scope.cancel()
        self._stream.socket.close()  # trio's close tells any task waiting on it; the fd is free at once

    def admit(self) -> None:
        """``start`` came and passed its checks: leave the pending budget, take a call slot.

        Raises CallBusy when every slot is taken (several pending sockets may
        reach ``start`` for the last one).
        """
        self.leave_pending()
        server = self._door.server
        if server.active_calls >= server.services.config.server.max_calls:
            self.refuse("busy", "start came but server.max_calls calls are active")
            raise CallBusy("busy: server.max_calls calls active")
        server.active_calls += 1
        self.active = True
        self.start_wait.deadline = math.inf

    def refuse(self, reason: str, detail: str) -> None:
        self._door.refuse(reason, self.peer, detail)

    def leave_pending(self) -> None:
        if self.pending:
            self.pending = False
            self._door.budget.give_back(self._source, self)

    def release(self) -> None:
        """The connection is over: give back whatever it held."""
        self.leave_pending()
        if self.active:
            self.active = False
            self._door.server.active_calls -= 1


RunCall = Callable[[MediaSocket, Admission], Awaitable[None]]


class FrontDoor:
    """Accepts connections for `server` and routes each (see the module docstring).

    `run_call(ws, admission)` runs one upgraded socket: it waits for
    ``start`` inside ``admission.start_wait``, checks the token, calls
    ``admission.admit()``, and runs the call.
    """

    def __init__(self, server: Server, run_call: RunCall) -> None:
        self.server = server
        cfg = server.services.config.server
        self._cfg = cfg
        self._run_call = run_call
        self.budget = PendingBudget(total=cfg.max_pending, per_source=cfg.max_pending_per_ip)
        self.refusals = RefusalLog(log)
        self._out_of_fds = _OutOfDescriptors()

    def refuse(self, reason: str, peer: str, detail: str) -> None:
        """Count and log one refusal."""
        self.server.refused[reason] += 1
        self.refusals.note(reason, peer, detail)

    async def serve(self, listeners: list[trio.SocketListener], accepting: trio.CancelScope | None = None, *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept on every listener until cancelled; ``started()`` once accepting.

        Cancelling `accepting` closes the listeners (a draining process sharing
        its port with siblings); the connections already accepted go on.
        """
        async with trio.open_nursery() as connections:
            await connections.start(self.refusals.run)
            connections.start_soon(self._accept_all, listeners, accepting or trio.CancelScope(), connections)
            task_status.started()

    async def _accept_all(self, listeners: list[trio.SocketListener], accepting: trio.CancelScope,
                          connections: trio.Nursery) -> None:
        with accepting:
            async with trio.open_nursery() as accept_loops:
                for listener in listeners:
                    accept_loops.start_soon(self._accept_loop, listener, connections)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _RESOURCE_ERRNOS:
                        raise
                    self._out_of_fds.note(exc)
                    await self._shed_or_wait()
                    continue
                nursery.start_soon(self._connection, stream)

    async def _shed_or_wait(self) -> None:
        """Out of descriptors: free one held by a pending connection, else back off.

        Without shedding, silent connections would hold every descriptor until
        their deadline while real calls queue behind them in the kernel's
        backlog; with it, each new connection costs the flood its oldest one.
        """
        victim = self.budget.evictee()
        if isinstance(victim, Admission):
            victim.evict()
            await trio.lowlevel.checkpoint()
        else:
            await trio.sleep(_ACCEPT_BACKOFF_S)

    async def _connection(self, stream: trio.SocketStream) -> None:
        """One connection, start to close; nothing it does reaches another connection."""
        try:
            host, port = stream.socket.getpeername()[:2]
        except OSError:  # reset before we looked: nothing to answer
            self.refuse("handshake", "?", "connection reset at once")
            await trio.aclose_forcefully(stream)
            return
        peer = f"{host}:{port}"
        admission = Admission(self, stream, host, peer, trio.current_time() + self._cfg.start_timeout_ms / 1000)
        if not admission.take_pending():
            self.refuse("pending", peer, f"{self.budget.held} connections not yet started "
                                         "(server.max_pending, server.max_pending_per_ip)")
            await self._answer(stream, http1.Response(status=503, body=b"busy\n"))
            return
        try:
            with admission.scope:
                await self._serve_request(stream, admission)
        finally:
            admission.release()
            await trio.aclose_forcefully(stream)

    async def _serve_request(self, stream: trio.SocketStream, admission: Admission) -> None:
        peer = admission.peer
        request = None
        with trio.CancelScope(deadline=admission.start_wait.deadline) as reading:
            request = await self._read(stream, peer)
            if request is not None and request.path != self._cfg.path:
                await self._route(stream, request, peer)
                return
        if reading.cancelled_caught:
            self.refuse("start_timeout", peer, "no whole request within server.start_timeout_ms")
        if request is None:
            return
        refusal = self._check_upgrade(request)
        if refusal is not None:
            reason, detail, response = refusal
            self.refuse(reason, peer, detail)
            await self._answer(stream, response)
            return
        await self._upgrade(stream, request, admission)

    async def _read(self, stream: trio.SocketStream, peer: str) -> http1.Request | None:
        """The request, or None after refusing what came instead (answered if there is an answer)."""
        try:
            return await http1.read_request(stream, max_head_bytes=MAX_HEAD_BYTES, max_body_bytes=MAX_BODY_BYTES)
        except http1.RequestError as exc:
            self.refuse("handshake" if exc.status is None else "protocol", peer, str(exc))
            if exc.status is not None:
                await self._answer(stream, http1.Response(status=exc.status, body=b"bad request\n"))
            return None

    @staticmethod
    async def _answer(stream: trio.SocketStream, response: http1.Response) -> None:
        """Send `response` and close, within a short bound: a peer that does not read is not waited for."""
        with trio.move_on_after(_CLOSE_TIMEOUT_S):
            await http1.write_response(stream, response)
        await trio.aclose_forcefully(stream)

    async def _route(self, stream: trio.SocketStream, request: http1.Request, peer: str) -> None:
        """Answer a request for another path from the route table.

        A handler that raises is our bug, not the peer's: it is logged with its
        traceback and answered 500, and only this request is affected.
        """
        try:
            response = await http1.route(self.server.routes, request)
        except Exception:
            log.exception("the handler for %s %s failed", request.method, logsafe.escape(request.path))
            response = http1.Response(status=500, body=b"internal error\n")
        if response.status in (404, 405):
            self.refuse("path", peer, f"{request.method} {request.path}")
        await self._answer(stream, response)

    def _check_upgrade(self, request: http1.Request) -> tuple[str, str, http1.Response] | None:
        """Why this upgrade is refused (reason, log detail, response), or None to let it in."""
        upgrade = (request.header("upgrade") or "").lower()
        if request.method != "GET" or upgrade != "websocket" or request.header("sec-websocket-version") != "13":
            return "protocol", f"{request.method} {request.path} is not a WebSocket upgrade", http1.Response(
                status=426, body=b"websocket upgrade required\n",
                headers=(("upgrade", "websocket"), ("sec-websocket-version", "13")))
        if self.server.draining:
            return "draining", "the daemon is draining", http1.Response(status=503, body=b"draining\n")
        try:
            self.server.gate.verify_upgrade(request.headers, request.query)
        except UpgradeRefused as exc:
            return "signature", str(exc), http1.Response(status=403, body=b"forbidden\n")
        if self.server.active_calls >= self._cfg.max_calls:
            return "busy", f"{self.server.active_calls} calls active (server.max_calls)", http1.Response(
                status=503, body=b"busy\n")
        return None

    async def _upgrade(self, stream: trio.SocketStream, request: http1.Request, admission: Admission) -> None:
        """trio-websocket does the handshake from the replayed request; then the call code runs."""
        handshaken = False
        peer = admission.peer

        async def on_request(ws_request: trio_websocket.WebSocketRequest) -> None:
            nonlocal handshaken
            async with media_socket.accepted(ws_request, max_message_size=2 * self._cfg.max_message_bytes) as ws:
                handshaken = True
                await self._run_call(ws, admission)

        try:
            await wsconn.serve_websocket(
                http1.ReplayStream(stream, request.raw), on_request,
                max_message_bytes=2 * self._cfg.max_message_bytes,
                handshake_timeout_s=max(0.0, admission.start_wait.deadline - trio.current_time()),
                close_timeout_s=_CLOSE_TIMEOUT_S)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, trio_websocket.ConnectionClosed, OSError):
            pass  # the peer went away; if before the handshake, counted below
        except* Exception as group:
            # trio-websocket's reader raising inside a handshake or a close (wsproto's
            # LocalProtocolError when a peer's frame meets our own close): only this socket ends.
            log.warning("a WebSocket connection from %s failed inside trio-websocket: %s", peer,
                        logsafe.escape("; ".join(f"{type(e).__name__}: {e}" for e in group.exceptions)))
        if not handshaken:
            self.refuse("handshake", peer, "the WebSocket handshake did not complete")

