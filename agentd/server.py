"""``agentd serve``: accept Twilio Media Streams and run one ``Call`` per socket.

Startup opens what every call shares -- the gRPC bridge with one channel per
Google endpoint, one pooled httpx client, the telemetry sink -- and
pre-synthesizes each business's greeting and apology, so a call's first frame
leaves from memory. Each connection is one ``Call``; its failure closes that
socket with a logged reason and never reaches another call (the per-call
boundary below is the only broad handler in agentd).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import trio
import trio_websocket

from agentd import telemetry
from agentd.audio_cache import AudioCache
from agentd.call import Call, Services
from agentd.config import Config
from agentd.errors import CallProtocolError
from agentd.grpc_bridge import GrpcBridge
from agentd.llm_openai import ChatSettings, OpenAIChat
from agentd.tts_google import GoogleTts

log = logging.getLogger(__name__)

_POLICY_VIOLATION = 1008
_INTERNAL_ERROR = 1011


@dataclass
class Server:
    """What ``serve`` reports once it is listening."""

    port: int
    services: Services
    active_calls: int = 0


def chat_settings(config: Config) -> ChatSettings:
    llm = config.llm
    return ChatSettings(base_url=llm.base_url, model=llm.model, max_tokens_param=llm.max_tokens_param,
                        max_tokens=llm.max_tokens, temperature=llm.temperature,
                        timeout_s=llm.timeout_ms / 1000, first_token_timeout_s=llm.first_token_timeout_ms / 1000)


async def serve(config: Config, *, observers: list[Callable[[dict], None]] | None = None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until cancelled; ``task_status.started(Server)`` once listening."""
    bridge = GrpcBridge()
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.serve)
        stt_channel = await bridge.open_channel(config.stt.endpoint, tls=config.stt.tls,
                                                default_host="speech.googleapis.com")
        tts_channel = await bridge.open_channel(config.tts.endpoint, tls=config.tts.tls,
                                                default_host="texttospeech.googleapis.com")
        tts = GoogleTts(tts_channel, timeout_s=config.tts.timeout_ms / 1000)
        sink = telemetry.JsonlSink(config.server.telemetry_dir)
        await nursery.start(sink.run)
        limits = httpx.Limits(max_connections=config.server.max_calls, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits, timeout=config.llm.timeout_ms / 1000) as http:
            chat = OpenAIChat(http, chat_settings(config), api_key=config.llm_api_key())
            services = Services(config=config, chat=chat, tts=tts, stt_channel=stt_channel,
                                cache=AudioCache(tts), sink=sink, observers=observers or [])
            await _warm_cache(services)
            server = Server(port=0, services=services)
            listener = await nursery.start(
                trio_websocket.serve_websocket, lambda request: _handle(server, request),
                config.server.host, config.server.port, None)
            server.port = listener.port
            log.info("agentd listening on ws://%s:%d%s", config.server.host, server.port, config.server.path)
            task_status.started(server)
            await trio.sleep_forever()


async def _warm_cache(services: Services) -> None:
    phrases = []
    for business in services.config.businesses.values():
        voice = services.voice(business)
        phrases += [(voice, business.greeting), (voice, business.apology)]
        phrases += [(voice, filler) for filler in business.fillers]
    with trio.move_on_after(30):
        cached = await services.cache.warm(phrases)
        log.info("pre-synthesized %d of %d phrases", cached, len(phrases))


async def _handle(server: Server, request: trio_websocket.WebSocketRequest) -> None:
    config = server.services.config
    if request.path.split("?")[0] != config.server.path:
        await request.reject(404, body=b"unknown path\n")
        return
    if server.active_calls >= config.server.max_calls:
        log.warning("refusing a call: %d calls active (server.max_calls)", server.active_calls)
        await request.reject(503, body=b"busy\n")
        return
    ws = await request.accept()
    server.active_calls += 1
    try:
        await _run_call(ws, server.services)
    finally:
        server.active_calls -= 1


async def _run_call(ws: trio_websocket.WebSocketConnection, services: Services) -> None:
    """The per-call boundary: whatever happens, only this socket is affected."""
    call = Call(ws, services)
    try:
        await call.run()
    except* trio_websocket.ConnectionClosed:
        log.info("call=%s socket closed", call.call_sid)
    except* CallProtocolError as group:
        reason = "; ".join(str(e) for e in group.exceptions)
        log.warning("call=%s closed: protocol error: %s", call.call_sid, reason)
        await _close(ws, _POLICY_VIOLATION, reason)
    except* Exception as group:
        log.error("call=%s closed: internal error", call.call_sid, exc_info=group)
        await _close(ws, _INTERNAL_ERROR, "internal error")
    else:
        await _close(ws, 1000, "bye")


async def _close(ws: trio_websocket.WebSocketConnection, code: int, reason: str) -> None:
    with trio.move_on_after(1) as scope:
        scope.shield = True
        await ws.aclose(code=code, reason=reason[:120])
