"""The ops listener: ``/healthz``, ``/readyz``, ``/metrics`` and a live status page at ``/``.

It listens on ``[ops] listen`` (loopback by default), apart from the Twilio
port, so probes and scrapes never compete with callers for admission and the
operator's pages are never on the public interface. Every request is one
``agentd.http1`` exchange: read the request, write the response, close.

* ``GET /healthz`` is 200 whenever the Trio loop can answer at all.
* ``GET /readyz`` is 200 when a call would be served well (listening, every
  greeting cached, not draining, no upstream failing right now), else 503
  with ``{"ready": false, "reasons": [...]}``.
* ``GET /metrics`` is Prometheus' text format (agentd.metrics).
* ``GET /`` is plain HTML + inline SVG (agentd.status_page), refreshed by the
  browser every few seconds: no script, no build step.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import trio

from agentd import http1, status_page
from agentd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from agentd.server import Server

__all__ = ["routes", "serve_ops"]

log = logging.getLogger(__name__)

# An ops request is a GET with no body; anything bigger is not one of ours.
_MAX_HEAD_BYTES = 8192
_REQUEST_TIMEOUT_S = 5.0


def _json(status: int, value: object) -> http1.Response:
    return http1.Response(status=status, body=json.dumps(value).encode() + b"\n",
                          headers=(("content-type", "application/json"),))


def routes(server: Server) -> http1.Routes:
    """The ops route table for ``server``; every handler only reads the server's state."""
    async def healthz(_request: http1.Request) -> http1.Response:
        return _json(200, {"ok": True})

    async def readyz(_request: http1.Request) -> http1.Response:
        reasons = server.not_ready()
        return _json(503 if reasons else 200, {"ready": not reasons, "reasons": reasons})

    async def metrics(_request: http1.Request) -> http1.Response:
        return http1.Response(status=200, body=server.metrics.render(),
                              headers=(("content-type", METRICS_CONTENT_TYPE),))

    async def page(_request: http1.Request) -> http1.Response:
        body = status_page.render(server, trio.current_time()).encode()
        return http1.Response(status=200, body=body, headers=(("content-type", "text/html; charset=utf-8"),
                                                              ("cache-control", "no-store")))

    return {("GET", "/healthz"): healthz, ("GET", "/readyz"): readyz, ("GET", "/metrics"): metrics,
            ("GET", "/"): page}


async def serve_ops(server: Server, listeners: list[trio.SocketListener], *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer ops requests on ``listeners`` until cancelled; ``started(port)``."""
    table = routes(server)

    async def handle(stream: trio.abc.Stream) -> None:
        with trio.move_on_after(_REQUEST_TIMEOUT_S) as scope:
            try:
                request = await http1.read_request(stream, max_head_bytes=_MAX_HEAD_BYTES, max_body_bytes=0)
            except http1.RequestError as exc:
                log.info("ops: bad request: %s", exc)
                if exc.status is not None:
                    await http1.write_response(stream, http1.Response(status=exc.status, body=b"bad request\n"))
                return
            await http1.write_response(stream, await http1.route(table, request))
        if scope.cancelled_caught:
            await trio.aclose_forcefully(stream)

    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)
