"""``agentd serve``: accept Twilio Media Streams and run one ``Call`` per socket.

Startup opens what every call shares -- the gRPC bridge with one channel per
Google endpoint, one pooled httpx client, the telemetry sink -- and
pre-synthesizes each business's greeting and apology, so a call's first frame
leaves from memory. Each connection is one ``Call``; its failure closes that
socket with a logged reason and never reaches another call (the per-call
boundary below is the only broad handler in agentd).

Admission is agentd.frontdoor's (its docstring has the theory): it reads
each connection's request itself, refuses and closes what may not pass (404,
426, 403, 503), and keeps connections that have not sent ``start`` within
``server.start_timeout_ms`` and a pending budget of their own. Here, an
upgraded socket waits for ``start`` inside that deadline, passes the per-call
token (else the socket closes with 1008), takes a call slot and runs. Limits on
an admitted socket: each message within ``server.max_message_bytes`` (the
codec closes with 1008; the transport refuses anything over twice that with
1009, without buffering it). Once started, the ``Call`` ends itself -- close
1000, its reason in the close frame -- after ``server.media_timeout_ms`` with
no message (the peer is gone) or at ``server.max_call_duration_s``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import httpx
import trio
import trio_websocket

from agentd import http1, logs, logsafe, ops, telemetry
from agentd.audio_cache import AudioCache
from agentd.adapters.business_tools import BusinessTools
from agentd.call import Call, InboundParser, Services
from agentd.codecs import twilio
from agentd.config import Config, config_summary
from agentd.drain import LiveCalls, run_until_drained
from agentd.errors import AgentdError, CallProtocolError, ConfigError
from agentd.frontdoor import Admission, CallBusy, FrontDoor
from agentd.adapters.grpc_bridge import GrpcBridge
from agentd.http1 import Routes
from agentd.listeners import open_shared_tcp_listeners
from agentd.adapters.llm_openai import ChatSettings, OpenAIChat
from agentd.media_socket import MediaSocket
from agentd.metrics import Metrics, upstreams_failing
from agentd.metronome import Metronome
from agentd.notify import Notifier
from agentd.security import CallTokenError, Gatekeeper
from agentd.adapters.tts_google import GoogleStreamingTts, GoogleTts
from agentd.webhook import Webhook

log = logging.getLogger(__name__)

_NORMAL_CLOSURE = 1000
_POLICY_VIOLATION = 1008
_INTERNAL_ERROR = 1011
_TRY_AGAIN_LATER = 1013
RECENT_TURNS = 8


@dataclass
class Server:
    """The running daemon: what ``serve`` reports once it is listening, and what ops reads."""

    port: int
    services: Services
    gate: Gatekeeper
    active_calls: int = 0
    # Refusals by reason ("path", "signature", "busy", "draining", "pending", "handshake",
    # "start_timeout", "token", "protocol"), counted by the front door; /metrics reads them.
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    draining: bool = False  # True: the front door answers new upgrades 503
    # Every path but server.path: {(method, path): async handler(http1.Request) -> http1.Response}.
    routes: dict[tuple[str, str], http1.Handler] = field(default_factory=dict)
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
                 "tts.streaming", "server.start_timeout_ms", "server.max_pending", "server.max_pending_per_ip")


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
        async with httpx.AsyncClient(limits=limits, timeout=config.llm.timeout_ms / 1000) as http, \
                httpx.AsyncClient(limits=limits) as tools_http:  # slow business tools never starve the LLM
            chat = OpenAIChat(http, ChatSettings.from_config(config), api_key=api_key)
            services = Services(config=config, chat=chat, tts=tts, stt_channel=stt_channel,
                                cache=AudioCache(tts), sink=sink, metronome=metronome, observers=list(observers or ()),
                                tools=BusinessTools(tools_http))
            server = Server(port=0, services=services, gate=gate, reload_config=reload_config, http=http)
            server.routes.update(webhook_routes(server))  # the one URL an operator sets on the Twilio number
            server.cache_warm = await _warm_cache(services)
            _freeze_startup_objects()
            accepting = trio.CancelScope()
            door = FrontDoor(server, functools.partial(_run_call, server))
            await nursery.start(door.serve, listeners, accepting)
            server.port = listeners[0].socket.getsockname()[1]
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


def webhook_routes(server: Server, env: Mapping[str, str] | None = None) -> Routes:
    """POST server.voice_path and server.after_path, for the Twilio listener's route table.

    The after-stream answer reads the transfers the daemon's calls recorded
    (``Services.outcomes``), so these routes must be served by the same process
    as the Media Streams. ``env`` None: the secrets come from os.environ.
    """
    return Webhook.from_config(server.services.config, server.services.outcomes, env).routes()


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


async def wait_start(ws: MediaSocket, *, max_bytes: int) -> twilio.Start:
    """Read until Twilio's ``start`` (after an optional ``connected``); the caller sets the deadline.

    Raises CallProtocolError for anything else first; unknown event types are
    skipped (see InboundParser).
    """
    inbound = InboundParser(max_bytes)
    while True:
        event = inbound.parse(await ws.get_message())
        if event is None:
            continue
        if isinstance(event, twilio.Start):
            return event
        if not isinstance(event, twilio.Connected):
            raise CallProtocolError(f"{type(event).__name__.lower()} before start")


def _admit(server: Server, admission: Admission, start: twilio.Start) -> None:
    """The per-call token, then a call slot (see Admission).

    Raises CallTokenError (close 1008), counted and logged here as the "token"
    refusal, or CallBusy (close 1013).
    """
    try:
        server.gate.check_start(start)
    except CallTokenError as exc:
        admission.refuse("token", f"call={start.call_sid}: {exc}")  # the codec has checked the SID's format
        raise
    admission.admit()


async def _run_call(server: Server, ws: MediaSocket, admission: Admission) -> None:
    """The per-call boundary: whatever happens, only this socket is affected.

    Until the call is admitted a failure is a refusal (counted, and summed in
    the log with the front door's others), not a call that went wrong.
    """
    call_sid, opened_at = "?", trio.current_time()
    try:
        with admission.start_wait:
            start = await wait_start(ws, max_bytes=server.services.config.server.max_message_bytes)
        if admission.start_wait.cancelled_caught:
            admission.refuse("start_timeout", "no start message within server.start_timeout_ms")
            await _close(ws, _POLICY_VIOLATION, "no start message")
            return
        _admit(server, admission, start)
        call_sid = start.call_sid
        call = Call(ws, server.services, start, t0=opened_at)
        logs.set_call(call_sid, call.business.name)
        server.calls.add(call)
        try:
            close_reason = await call.run()
        finally:
            server.calls.discard(call)
    except* trio_websocket.ConnectionClosed:
        if admission.active:
            log.info("call=%s socket closed", call_sid)
        else:
            admission.refuse("handshake", "socket closed before start")
    except* CallBusy:
        await _close(ws, _TRY_AGAIN_LATER, "busy")
    except* CallProtocolError as group:
        reason = printable("; ".join(str(e) for e in group.exceptions))
        if admission.active:
            log.warning("call=%s closed: protocol error: %s", call_sid, logsafe.escape(reason))
        elif not isinstance(group.exceptions[0], CallTokenError):  # a token refusal is logged as decided
            admission.refuse("protocol", f"before start: {reason}")
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


async def _close(ws: MediaSocket, code: int, reason: str) -> None:
    # A close reason is at most 123 bytes of UTF-8.
    reason = printable(reason).encode("utf-8")[:120].decode("utf-8", "ignore")
    with trio.move_on_after(1) as scope:
        scope.shield = True
        await ws.aclose(code=code, reason=reason)
