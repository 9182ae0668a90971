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

import collections
import dataclasses
import functools
import gc
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import trio
import trio_websocket

from agentd import logs, ops, telemetry
from agentd.audio_cache import AudioCache
from agentd.call import Call, Services
from agentd.codecs import twilio
from agentd.config import Config, config_summary
from agentd.drain import LiveCalls, run_until_drained
from agentd.errors import AgentdError, CallProtocolError, ConfigError
from agentd.grpc_bridge import GrpcBridge
from agentd.listeners import open_shared_tcp_listeners
from agentd.llm_openai import ChatSettings, OpenAIChat
from agentd.metrics import Metrics, upstreams_failing
from agentd.metronome import Metronome
from agentd.notify import Notifier
from agentd.security import Gatekeeper, UpgradeRefused
from agentd.tts_google import GoogleStreamingTts, GoogleTts

log = logging.getLogger(__name__)

_NORMAL_CLOSURE = 1000
_POLICY_VIOLATION = 1008
_INTERNAL_ERROR = 1011
# Twilio sends `connected` and `start` as soon as the socket opens; a socket
# that does not is only holding one of the max_calls slots.
START_TIMEOUT_S = 10.0
RECENT_TURNS = 8


@dataclass
class Server:
    """The running daemon: what ``serve`` reports once it is listening, and what ops reads."""

    port: int
    services: Services
    gate: Gatekeeper
    active_calls: int = 0
    # Refusals by reason ("busy", "draining", ...); /metrics reads them at scrape time.
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    draining: bool = False
    calls: LiveCalls = field(default_factory=LiveCalls)
    # The greetings, apologies and fillers of every business are synthesized (see _keep_warming).
    cache_warm: bool = False
    ops_port: int | None = None
    reload_config: Callable[[], Config] | None = None
    http: httpx.AsyncClient | None = None  # the pooled client every OpenAIChat shares
    started_at: float = field(default_factory=trio.current_time)
    metrics: Metrics = field(init=False)
    # The last turn records, newest last: the status page draws their stage waterfall.
    recent_turns: collections.deque[dict] = field(default_factory=lambda: collections.deque(maxlen=RECENT_TURNS))

    def __post_init__(self) -> None:
        self.metrics = Metrics(self)
        self.services.observers += [self.metrics.observe, self._keep_turn]
        self._reload_lock = trio.Lock()

    def _keep_turn(self, record: dict) -> None:
        if record.get("kind") == "turn":
            self.recent_turns.append(record)

    def not_ready(self) -> list[str]:
        """Why the daemon cannot take a call right now ([] = ready): what /readyz reports."""
        reasons = [] if self.cache_warm else ["greetings not cached yet"]
        reasons += ["draining"] if self.draining else []
        reasons += [f"{service} failing" for service in upstreams_failing(trio.current_time())]
        return reasons

    def status_line(self) -> str:
        """One line for systemd's STATUS=: "12 calls, ready", "draining, 3 calls left"."""
        if self.draining:
            return f"draining, {len(self.calls)} calls left"
        problems = self.not_ready()
        return f"{len(self.calls)} calls, " + ("ready" if not problems else "not ready: " + ", ".join(problems))

    async def reload(self) -> None:
        """Re-read the configuration for new calls (SIGHUP); an invalid file keeps the old one.

        Businesses, prompts and tuning change; the new greetings and fillers are
        synthesized before any call uses them. Calls in progress keep the
        Services they started with. Listeners, endpoints and limits need a restart.
        """
        if self.reload_config is None:
            log.warning("reload: this server has no configuration file to re-read")
            return
        async with self._reload_lock:
            try:
                config = self.reload_config()
            except ConfigError as exc:
                log.error("reload: invalid configuration, keeping the running one:\n%s", exc)
                return
            old = self.services
            for key in _RESTART_KEYS:
                if _dotted(config, key) != _dotted(old.config, key):
                    log.warning("reload: %s changed; it takes effect only after a restart", key)
            chat = OpenAIChat(self.http, ChatSettings.from_config(config), api_key=config.llm_api_key())
            services = dataclasses.replace(old, config=config, chat=chat, cache=AudioCache(old.tts))
            await _warm_cache(services)
            self.services = services
            log.info("reload: new calls use the new configuration:\n%s", config_summary(config))


# What a reload cannot change: they are bound or opened once, at startup.
_RESTART_KEYS = ("server.host", "server.port", "server.reuse_port", "server.path", "server.max_calls",
                 "server.telemetry_dir", "ops.listen", "stt.endpoint", "stt.tls", "tts.endpoint", "tts.tls",
                 "tts.streaming")


def _dotted(config: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


async def serve(config: Config, *, observers: list[Callable[[dict], None]] | None = None,
                notifier: Notifier | None = None, handle_signals: bool = False,
                reload_config: Callable[[], Config] | None = None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon; ``task_status.started(Server)`` once listening.

    Runs until cancelled or, with ``handle_signals`` (the CLI; main thread
    only), until a SIGTERM/SIGINT drain has ended every call (agentd.drain).
    Raises ConfigError before opening anything when a configured check lacks
    its secret or the LLM key's variable is unset (fail closed), ListenError
    when a port cannot be bound.
    """
    gate = Gatekeeper.from_config(config)
    api_key = _require_llm_key(config)
    notifier = notifier or Notifier(None)
    listeners = await _listen(config.server.host, config.server.port, "server.host/server.port",
                              shared=config.server.reuse_port)
    ops_listeners = await _listen(*_host_port(config.ops.listen), "ops.listen") if config.ops.listen else []
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
        nursery.start_soon(telemetry.prune_daily, config.server.telemetry_dir, config.telemetry.keep_days)
        metronome = Metronome()
        await nursery.start(metronome.run)
        # Keep-alive for as many as may be open: with fewer, httpcore closes idle connections whenever
        # more than that many exist in all, and each turn pays a new TCP connection.
        limits = httpx.Limits(max_connections=config.server.max_calls,
                              max_keepalive_connections=config.server.max_calls)
        async with httpx.AsyncClient(limits=limits, timeout=config.llm.timeout_ms / 1000) as http:
            chat = OpenAIChat(http, ChatSettings.from_config(config), api_key=api_key)
            services = Services(config=config, chat=chat, tts=tts, stt_channel=stt_channel,
                                cache=AudioCache(tts), sink=sink, metronome=metronome, observers=list(observers or ()))
            server = Server(port=0, services=services, gate=gate, reload_config=reload_config, http=http)
            server.cache_warm = await _warm_cache(services)
            _freeze_startup_objects()
            accepting = trio.CancelScope()
            server.port = await nursery.start(functools.partial(
                _serve_websockets, lambda request: _handle(server, request), config, listeners, accepting))
            log.info("agentd listening on ws://%s:%d%s", config.server.host, server.port, config.server.path)
            if ops_listeners:
                server.ops_port = await nursery.start(ops.serve_ops, server, ops_listeners)
                log.info("ops listening on http://%s:%d (/healthz /readyz /metrics /)",
                         _host_port(config.ops.listen)[0], server.ops_port)
            nursery.start_soon(_keep_warming, server, notifier)
            await nursery.start(functools.partial(notifier.run, server.status_line))
            task_status.started(server)
            if not handle_signals:
                await trio.sleep_forever()
            async def on_drain() -> None:
                if config.server.reuse_port:  # the kernel gives new connections to listening siblings only
                    accepting.cancel()
                await notifier.send("STOPPING=1", "STATUS=" + server.status_line())

            await run_until_drained(server, config.server.drain_timeout_s, reload=server.reload, on_drain=on_drain)
            nursery.cancel_scope.cancel()


class ListenError(AgentdError):
    """A listening socket could not be opened (port in use, unknown host); the message says which."""


def _host_port(listen: str) -> tuple[str, int]:
    """("127.0.0.1", 9090) from "127.0.0.1:9090" (brackets of an IPv6 host removed)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


async def _listen(host: str, port: int, keys: str, *, shared: bool = False) -> list[trio.SocketListener]:
    """Bind now, so a port in use or a bad host is one clear error before anything else starts.

    ``shared``: with SO_REUSEPORT, so sibling processes may bind the same port (agentd.listeners).
    """
    try:
        if shared:
            return await open_shared_tcp_listeners(port, host=host)
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port} ({keys}): {exc.strerror or exc}") from exc


def _require_llm_key(config: Config) -> str | None:
    """The LLM key; ConfigError when llm.api_key_env names a variable that is unset or empty."""
    key = config.llm_api_key()
    if config.llm.api_key_env and key is None:
        raise ConfigError(f"llm.api_key_env: the variable {config.llm.api_key_env} is unset or empty "
                          "(set it, e.g. in /etc/agentd/agentd.env, or set llm.api_key_env = \"\" for a keyless server)")
    return key


async def _serve_websockets(handler, config: Config, listeners: list[trio.SocketListener],
                            accepting: trio.CancelScope, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """trio-websocket's server, with each connection fenced off from the others.

    trio-websocket runs a connection's reader task in a nursery under the
    server's, so a protocol error in one connection (wsproto raising
    LocalProtocolError when a peer's oversized frame meets our own close)
    would end every call. Each connection is therefore handled inside its own
    boundary; this reaches for WebSocketServer's per-connection handler, the
    one place trio-websocket offers no hook (tests/test_hostile_input.py pins it).

    Cancelling ``accepting`` closes the listeners; the connections already
    accepted go on, and this returns when the last one ends.
    """
    server = trio_websocket.WebSocketServer(
        handler, listeners, max_message_size=2 * config.server.max_message_bytes)

    async def fenced(stream: trio.abc.Stream) -> None:
        try:
            await server._handle_connection(stream)  # noqa: SLF001 -- see the docstring
        except* Exception as group:
            log.error("a WebSocket connection failed inside trio-websocket; only it is closed",
                      exc_info=group)

    async with trio.open_nursery() as connections:
        with accepting:
            await trio.serve_listeners(fenced, listeners, handler_nursery=connections,
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


async def _warm_cache(services: Services) -> bool:
    """Synthesize every business's fixed phrases (at most 30 s); True when all are cached."""
    phrases = []
    for business in services.config.businesses.values():
        voice = services.voice(business)
        texts = [business.greeting, business.apology, business.goodbye, business.reprompt, business.handoff,
                 *business.fillers]
        phrases += [(voice, text) for text in texts if text.strip()]
    cached = 0
    with trio.move_on_after(_WARM_TIMEOUT_S):
        cached = await services.cache.warm(phrases)
    log.log(logging.INFO if cached == len(phrases) else logging.WARNING,
            "pre-synthesized %d of %d phrases", cached, len(phrases))
    return cached == len(phrases)


_WARM_TIMEOUT_S = 30.0
_WARM_RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # then every 30 s


async def _keep_warming(server: Server, notifier: Notifier) -> None:
    """Retry the phrase cache until it is complete (TTS unreachable at startup), then READY=1.

    Calls are taken meanwhile (a missing phrase is synthesized when first needed),
    but /readyz says 503 and the log says why, so no deploy proceeds on a mute daemon.
    """
    for attempt in itertools.count():
        if server.cache_warm:
            break
        pause_s = _WARM_RETRY_S[min(attempt, len(_WARM_RETRY_S) - 1)]
        log.warning("greetings not all cached (TTS unreachable?); not ready; retrying in %gs", pause_s)
        await trio.sleep(pause_s)
        server.cache_warm = await _warm_cache(server.services)
    await notifier.send("READY=1", "STATUS=" + server.status_line())


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
    if server.draining:
        log.info("refusing a call: draining")
        server.refused["draining"] += 1
        await request.reject(503, body=b"draining\n")
        return
    if server.active_calls >= config.server.max_calls:
        log.warning("refusing a call: %d calls active (server.max_calls)", server.active_calls)
        server.refused["busy"] += 1
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
        call = Call(ws, server.services, start, t0=opened_at)
        logs.set_call(call_sid, call.business.name)
        server.calls.add(call)
        try:
            close_reason = await call.run()
        finally:
            server.calls.discard(call)
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
