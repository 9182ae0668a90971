"""The one door between Trio and grpcio: nothing else in agentd knows how grpc runs.

grpcio has no Trio support. Measured on this kind of machine (docs/wire.md),
one asyncio event loop in one worker thread hosting ``grpc.aio`` for every
stream costs about half the CPU of a thread per stream and keeps real time at
150 streams, so that is the bridge: Trio -> asyncio with
``loop.call_soon_threadsafe`` (the calls of each 5 ms window together, one
wake-up of the loop thread), asyncio -> Trio with the Trio token's
``run_sync_soon``. Nothing else in agentd knows grpc runs on asyncio.

Requests cross as already-serialized ``bytes`` and responses come back as
``bytes``: adapters own their message classes, the bridge only moves frames.
``grpc.RpcError`` is translated here, once, into ``RpcFailure``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import trio

from agentd import logsafe

log = logging.getLogger(__name__)

_KEEPALIVE_OPTIONS = [
    # Google answers GOAWAY "too_many_pings" to anything more eager than 30 s.
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.http2.max_pings_without_data", 0),
]
_END = object()
OUTBOX_DELAY_S = 0.005  # Trio -> loop calls wait at most this long, so that one wake-up carries many
RESPONSE_BUFFER = 256  # responses queued toward Trio per stream; STT sends a few per second


class RpcFailure(Exception):
    """A gRPC call ended with a non-OK status (or the bridge could not deliver)."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code = code  # grpc.StatusCode name, e.g. "UNAVAILABLE"
        self.details = details


def _failure(exc: BaseException) -> RpcFailure:
    if isinstance(exc, grpc.aio.AioRpcError):
        # The server's words: credentials redacted, escaped and capped before anything logs them.
        return RpcFailure(exc.code().name, logsafe.redact(exc.details() or ""))
    return RpcFailure("UNKNOWN", f"{type(exc).__name__}: {exc}")


def _identity(data: bytes) -> bytes:
    return data


class Channel:
    """A grpc.aio channel that lives on the bridge's loop; one per endpoint per process."""

    def __init__(self, bridge: GrpcBridge, aio_channel: grpc.aio.Channel, target: str):
        self._bridge = bridge
        self._aio = aio_channel
        self.target = target

    async def unary(self, method: str, request: bytes, *, timeout_s: float, metadata=()) -> bytes:
        """One unary call; raises RpcFailure. Cancelling the Trio caller cancels the RPC."""
        callable_ = self._aio.unary_unary(method, request_serializer=_identity,
                                          response_deserializer=_identity)

        async def call() -> bytes:
            try:
                return await callable_(request, timeout=timeout_s, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                raise _failure(exc) from None

        return await self._bridge.run(call)

    def open_stream(self, method: str, *, timeout_s: float | None = None, metadata=()) -> BidiStream:
        """Start a bidirectional stream. Use it as ``with stream:`` so it is always cancelled."""
        return BidiStream(self._bridge, self._aio, method, timeout_s, metadata)


class BidiStream:
    """A gRPC bidi stream seen from Trio: ``send_nowait`` requests, ``receive`` responses.

    ``send_nowait`` never blocks the Trio thread (it schedules the write on the
    loop); ``receive`` raises ``RpcFailure`` when the stream fails and
    ``trio.EndOfChannel`` when the server half-closes normally.
    """

    def __init__(self, bridge: GrpcBridge, aio: grpc.aio.Channel, method: str,
                 timeout_s: float | None, metadata):
        self._bridge = bridge
        self._send, self._recv = trio.open_memory_channel[Any](RESPONSE_BUFFER)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        callable_ = aio.stream_stream(method, request_serializer=_identity,
                                      response_deserializer=_identity)
        bridge.call_soon(self._start, callable_, timeout_s, metadata)

    def __enter__(self) -> BidiStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.cancel()

    # -- Trio side ---------------------------------------------------------

    def send_nowait(self, request: bytes) -> None:
        if not self._closed:
            self._bridge.call_soon(self._enqueue, request)

    def done_writing(self) -> None:
        if not self._closed:
            self._bridge.call_soon(self._enqueue, _END)

    def cancel(self) -> None:
        if not self._closed:
            self._closed = True
            self._bridge.call_soon(self._cancel)

    async def receive(self) -> bytes:
        item = await self._recv.receive()
        if isinstance(item, RpcFailure):
            self._closed = True
            raise item
        if item is _END:
            self._closed = True
            raise trio.EndOfChannel
        return item

    def _deliver(self, item: Any) -> None:
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self._send.close()  # a reader this far behind is a bug; end the stream loudly
            log.error("gRPC response buffer overflow; stream dropped")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # -- asyncio side (runs on the bridge loop) ----------------------------

    def _start(self, callable_, timeout_s, metadata) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump(callable_, timeout_s, metadata))

    def _enqueue(self, item: Any) -> None:
        if self._queue is not None:
            self._queue.put_nowait(item)

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _pump(self, callable_, timeout_s, metadata) -> None:
        call = callable_(timeout=timeout_s, metadata=metadata)
        writer = asyncio.ensure_future(self._write_all(call))
        try:
            async for response in call:
                self._bridge.to_trio(self._deliver, response)
            self._bridge.to_trio(self._deliver, _END)
        except asyncio.CancelledError:
            call.cancel()
        except Exception as exc:  # grpc errors and transport faults alike end this stream only
            self._bridge.to_trio(self._deliver, _failure(exc))
        finally:
            writer.cancel()

    async def _write_all(self, call) -> None:
        assert self._queue is not None
        try:
            while True:
                item = await self._queue.get()
                if item is _END:
                    await call.done_writing()
                    return
                await call.write(item)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the read side reports the failure


class GrpcBridge:
    """Hosts one asyncio loop for every gRPC channel of the process.

    Start it in the server's nursery with ``await nursery.start(bridge.serve)``;
    when that nursery is cancelled the channels close and the thread ends.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._channels: list[grpc.aio.Channel] = []
        self._outbox: collections.deque[tuple[Callable[..., Any], tuple]] = collections.deque()  # Trio -> loop
        self._outbox_filled = trio.lowlevel.ParkingLot()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._loop = asyncio.new_event_loop()
        ready = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._host_loop, ready)
            await ready.wait()
            nursery.start_soon(self._hand_over_outbox)
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                with trio.move_on_after(1.0) as cleanup:
                    cleanup.shield = True
                    await self.run(self._close_channels)
                self._loop.call_soon_threadsafe(self._loop.stop)

    async def _host_loop(self, ready: trio.Event) -> None:
        loop = self._loop
        assert loop is not None
        token = trio.lowlevel.current_trio_token()
        loop.call_soon(token.run_sync_soon, ready.set)
        try:
            await trio.to_thread.run_sync(loop.run_forever)
        finally:
            loop.close()

    async def _close_channels(self) -> None:
        channels, self._channels = self._channels, []
        for channel in channels:
            await channel.close(grace=None)
        # Streams still open end with their channel, but their tasks need a few more loop
        # turns to finish; a task left pending when the loop closes is destroyed mid-await.
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    # -- crossing the boundary ---------------------------------------------

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule ``fn(*args)`` on the bridge loop, in call order, within ``OUTBOX_DELAY_S``.

        Call from the Trio thread only (the outbox is Trio's until it is handed over).
        """
        assert self._loop is not None, "GrpcBridge.serve has not started"
        self._outbox.append((fn, args))
        if len(self._outbox) == 1:
            self._outbox_filled.unpark_all()

    async def _hand_over_outbox(self) -> None:
        """Every call_soon of an OUTBOX_DELAY_S window crosses to the loop in one wake-up.

        Each call's STT audio leaves at its own moment (calls start at random
        phases), so without a window no two crossings ever share a wake-up of
        the loop thread; with it, 100 calls' ~1,700 crossings a second become
        at most 200 wake-ups.
        """
        assert self._loop is not None
        while True:
            if not self._outbox:  # calls made before this task first ran are already waiting
                await self._outbox_filled.park()
            await trio.sleep(OUTBOX_DELAY_S)
            batch, self._outbox = self._outbox, collections.deque()
            self._loop.call_soon_threadsafe(_run_all, batch)

    def to_trio(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule ``fn(*args)`` on the Trio thread (safe from the bridge loop)."""
        assert self._token is not None
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    async def run(self, coro_fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``coro_fn()`` on the bridge loop and wait for it without blocking Trio."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro_fn(), self._loop)
        done = trio.Event()
        future.add_done_callback(lambda _: self.to_trio(done.set))
        try:
            await done.wait()
        except trio.Cancelled:
            future.cancel()
            raise
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise RpcFailure("CANCELLED", "bridge call cancelled") from None

    async def open_channel(self, target: str, *, tls: bool, default_host: str | None = None) -> Channel:
        """Open a channel to ``host:port``: TLS with Google default credentials, or plaintext."""
        credentials = _google_credentials(default_host or target.split(":")[0]) if tls else None

        async def create() -> grpc.aio.Channel:
            if credentials is None:
                return grpc.aio.insecure_channel(target, options=_KEEPALIVE_OPTIONS)
            return grpc.aio.secure_channel(target, credentials, options=_KEEPALIVE_OPTIONS)

        aio_channel = await self.run(create)
        self._channels.append(aio_channel)
        return Channel(self, aio_channel, target)


def _run_all(batch: collections.deque[tuple[Callable[..., Any], tuple]]) -> None:
    """On the loop: one outbox window's calls, in order."""
    for fn, args in batch:
        fn(*args)


def _google_credentials(default_host: str) -> grpc.ChannelCredentials:
    """TLS + OAuth2 from Application Default Credentials (env / metadata server / gcloud)."""
    import google.auth
    import google.auth.transport.grpc
    import google.auth.transport.requests

    creds, _project = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    plugin = google.auth.transport.grpc.AuthMetadataPlugin(
        creds, google.auth.transport.requests.Request(), default_host=default_host
    )
    return grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(), grpc.metadata_call_credentials(plugin)
    )
