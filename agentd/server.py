"""``agentd serve``: accept Twilio Media Streams and run one ``Call`` per socket.

Startup opens what every call shares -- the gRPC bridge with one channel per
Google endpoint, one pooled httpx client, the telemetry sink -- and
pre-synthesizes each business's greeting and apology, so a call's first frame
leaves from memory. Each connection is one ``Call``; its failure closes that
socket with a logged reason and never reaches another call (the per-call
boundary below is the only broad handler in agentd).

Admission, in order (agentd.security has the theory of the two checks):
the upgrade's path (else 404), its Twilio signature (else 403), free capacity,
``server.max_calls`` (else 503); then, on ``start``, the per-call token (else
the socket closes with 1008). Limits on an admitted socket: ``start`` within
``START_TIMEOUT_S`` (else 1008), each message within
``server.max_message_bytes`` (the codec closes with 1008; the transport refuses
anything over twice that with 1009, without buffering it). Once started, the
``Call`` ends itself -- close 1000, its reason in the close frame -- after
``server.media_timeout_ms`` with no message (the peer is gone) or at
``server.max_call_duration_s``.
"""

from __future__ import annotations

import functools
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import trio
import trio_websocket

from agentd import telemetry
from agentd.audio_cache import AudioCache
from agentd.call import Call, Services
from agentd.codecs import twilio
from agentd.config import Config
from agentd.errors import CallProtocolError
from agentd.grpc_bridge import GrpcBridge
from agentd.llm_openai import ChatSettings, OpenAIChat
from agentd.metronome import Metronome
from agentd.security import Gatekeeper, UpgradeRefused
from agentd.tts_google import GoogleStreamingTts, GoogleTts

log = logging.getLogger(__name__)

_NORMAL_CLOSURE = 1000
_POLICY_VIOLATION = 1008
_INTERNAL_ERROR = 1011
# Twilio sends `connected` and `start` as soon as the socket opens; a socket
# that does not is only holding one of the max_calls slots.
START_TIMEOUT_S = 10.0


@dataclass
class Server:
    """What ``serve`` reports once it is listening."""

    port: int
    services: Services
    gate: Gatekeeper
    active_calls: int = 0


async def serve(config: Config, *, observers: list[Callable[[dict], None]] | None = None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until cancelled; ``task_status.started(Server)`` once listening.

    Raises ConfigError before opening anything when a configured security check
    lacks its secret (fail closed: see agentd.security).
    """
    gate = Gatekeeper.from_config(config)
    bridge = GrpcBridge()
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.serve)
        stt_channel = await bridge.open_channel(config.stt.endpoint, tls=config.stt.tls,
                                                default_host="speech.googleapis.com")
        tts_channel = await bridge.open_channel(config.tts.endpoint, tls=config.tts.tls,
                                                default_host="texttospeech.googleapis.com")
        tts_class = GoogleStreamingTts if config.tts.streaming else GoogleTts
        tts = tts_class(tts_channel, timeout_s=config.tts.timeout_ms / 1000)
        sink = telemetry.JsonlSink(config.server.telemetry_dir)
        await nursery.start(sink.run)
        metronome = Metronome()
        await nursery.start(metronome.run)
        # Keep-alive for as many as may be open: with fewer, httpcore closes idle connections whenever
        # more than that many exist in all, and each turn pays a new TCP connection.
        limits = httpx.Limits(max_connections=config.server.max_calls,
                              max_keepalive_connections=config.server.max_calls)
        async with httpx.AsyncClient(limits=limits, timeout=config.llm.timeout_ms / 1000) as http:
            chat = OpenAIChat(http, ChatSettings.from_config(config), api_key=config.llm_api_key())
            services = Services(config=config, chat=chat, tts=tts, stt_channel=stt_channel,
                                cache=AudioCache(tts), sink=sink, metronome=metronome, observers=observers or [])
            await _warm_cache(services)
            _freeze_startup_objects()
            server = Server(port=0, services=services, gate=gate)
            server.port = await nursery.start(functools.partial(
                _serve_websockets, lambda request: _handle(server, request), config))
            log.info("agentd listening on ws://%s:%d%s", config.server.host, server.port, config.server.path)
            task_status.started(server)
            await trio.sleep_forever()


async def _serve_websockets(handler, config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """trio-websocket's server, with each connection fenced off from the others.

    trio-websocket runs a connection's reader task in a nursery under the
    server's, so a protocol error in one connection (wsproto raising
    LocalProtocolError when a peer's oversized frame meets our own close)
    would end every call. Each connection is therefore handled inside its own
    boundary; this reaches for WebSocketServer's per-connection handler, the
    one place trio-websocket offers no hook (tests/test_hostile_input.py pins it).
    """
    listeners = await trio.open_tcp_listeners(config.server.port, host=config.server.host)
    server = trio_websocket.WebSocketServer(
        handler, listeners, max_message_size=2 * config.server.max_message_bytes)

    async def fenced(stream: trio.abc.Stream) -> None:
        try:
            await server._handle_connection(stream)  # noqa: SLF001 -- see the docstring
        except* Exception as group:
            log.error("a WebSocket connection failed inside trio-websocket; only it is closed",
                      exc_info=group)

    await trio.serve_listeners(fenced, listeners,
                               task_status=_PortReporter(task_status))


class _PortReporter:
    """Turns serve_listeners' started(listeners) into started(port)."""

    def __init__(self, task_status):
        self._task_status = task_status

    def started(self, listeners) -> None:
        self._task_status.started(listeners[0].socket.getsockname()[1])


def _freeze_startup_objects() -> None:
    """Keep what startup built (imports, config, cached audio: ~70,000 objects) out of every later GC.

    A full collection walks every tracked object and stops the Trio loop while
    it does: with the startup objects in it, one took 25-80 ms at 50 calls
    (bench.capacity --gc-log), longer than the TX lead. They live as long as
    the process, so scanning them is pure cost.
    """
    gc.collect()
    gc.freeze()


async def _warm_cache(services: Services) -> None:
    phrases = []
    for business in services.config.businesses.values():
        voice = services.voice(business)
        phrases += [(voice, business.greeting), (voice, business.apology), (voice, business.goodbye)]
        phrases += [(voice, filler) for filler in business.fillers]
    with trio.move_on_after(30):
        cached = await services.cache.warm(phrases)
        log.info("pre-synthesized %d of %d phrases", cached, len(phrases))


async def _handle(server: Server, request: trio_websocket.WebSocketRequest) -> None:
    config = server.services.config
    if request.path.split("?")[0] != config.server.path:
        await request.reject(404, body=b"unknown path\n")
        return
    try:
        server.gate.verify_upgrade(request.headers)
    except UpgradeRefused as exc:
        log.warning("refusing a call from %s: %s", _peer(request), exc)
        await request.reject(403, body=b"forbidden\n")
        return
    if server.active_calls >= config.server.max_calls:
        log.warning("refusing a call: %d calls active (server.max_calls)", server.active_calls)
        await request.reject(503, body=b"busy\n")
        return
    server.active_calls += 1  # before accept() yields, so two upgrades cannot both take the last slot
    try:
        ws = await request.accept()
        await _run_call(ws, server)
    finally:
        server.active_calls -= 1


def _peer(request: trio_websocket.WebSocketRequest) -> str:
    """host:port of the peer (behind a reverse proxy: the proxy's)."""
    remote = request.remote
    return f"{remote.address}:{remote.port}" if isinstance(remote, trio_websocket.Endpoint) else str(remote)


async def wait_start(ws: trio_websocket.WebSocketConnection, *, max_bytes: int) -> twilio.Start:
    """Read until Twilio's ``start`` (after an optional ``connected``); the caller sets the deadline.

    Raises CallProtocolError for anything else first. An event type Twilio added
    after us is skipped, not fatal.
    """
    while True:
        try:
            event = twilio.parse_inbound(await ws.get_message(), max_bytes=max_bytes)
        except twilio.UnknownEventError as exc:
            log.warning("call=? skipping unknown Twilio event before start: %s", exc)
            continue
        if isinstance(event, twilio.Start):
            return event
        if not isinstance(event, twilio.Connected):
            raise CallProtocolError(f"{type(event).__name__.lower()} before start")


async def _run_call(ws: trio_websocket.WebSocketConnection, server: Server) -> None:
    """The per-call boundary: whatever happens, only this socket is affected."""
    call_sid, opened_at = "?", trio.current_time()
    try:
        with trio.move_on_after(START_TIMEOUT_S) as start_wait:
            start = await wait_start(ws, max_bytes=server.services.config.server.max_message_bytes)
        if start_wait.cancelled_caught:
            log.warning("call=? closed: no start message within %gs", START_TIMEOUT_S)
            await _close(ws, _POLICY_VIOLATION, "no start message")
            return
        call_sid = start.call_sid
        server.gate.check_start(start)  # raises CallTokenError, a CallProtocolError: close 1008
        close_reason = await Call(ws, server.services, start, t0=opened_at).run()
    except* trio_websocket.ConnectionClosed:
        log.info("call=%s socket closed", call_sid)
    except* CallProtocolError as group:
        reason = printable("; ".join(str(e) for e in group.exceptions))
        log.warning("call=%s closed: protocol error: %s", call_sid, reason)
        await _close(ws, _POLICY_VIOLATION, reason)
    except* Exception as group:
        log.error("call=%s closed: internal error", call_sid, exc_info=group)
        await _close(ws, _INTERNAL_ERROR, "internal error")
    else:
        # the caller hung up ("bye"), or the call ended itself (its reason; it logged why)
        await _close(ws, _NORMAL_CLOSURE, close_reason)


def printable(text: str) -> str:
    """Peer-chosen text made safe for a log line and a close frame: control
    characters, lone surrogates and the like are escaped, never passed through."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


async def _close(ws: trio_websocket.WebSocketConnection, code: int, reason: str) -> None:
    # A close reason is at most 123 bytes of UTF-8.
    reason = printable(reason).encode("utf-8")[:120].decode("utf-8", "ignore")
    with trio.move_on_after(1) as scope:
        scope.shield = True
        await ws.aclose(code=code, reason=reason)
