"""A real HTTP server for business-tool tests: h11 over a Trio TCP listener, in the test's own loop.

Each path behaves as named (answers, slow, fails, not JSON, too large,
never); under the autojump MockClock "slow" costs two virtual seconds.
"""

from __future__ import annotations

import json

import h11
import trio

from agentd.adapters.business_tools import MAX_ANSWER_BYTES


class ToolServer:
    """An HTTP/1.1 server whose paths behave as named; records what each request carried."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict, bytes]] = []  # (path, headers, body)
        self.port = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._connection, listeners, task_status=task_status)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        path = request.target.decode()
        self.requests.append((path, {k.decode(): v.decode() for k, v in request.headers}, body))
        status, payload = await self._behave(path, body)
        headers = [("content-type", "application/json"), ("content-length", str(len(payload)))]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
        await stream.aclose()

    async def _behave(self, path: str, body: bytes) -> tuple[int, bytes]:
        if path == "/slow":
            await trio.sleep(2.0)
        if path == "/never":
            await trio.sleep_forever()
        if path == "/fails":
            return 503, b'{"detail": "calendar offline"}'
        if path == "/not-json":
            return 200, b"<html>oops</html>"
        if path == "/huge":
            return 200, b'"' + b"x" * MAX_ANSWER_BYTES + b'"'
        return 200, json.dumps({"slot": "Monday 9:00", "asked": json.loads(body)}).encode()
