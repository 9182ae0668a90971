"""Business tools against a real HTTP server on 127.0.0.1, all on Trio's autojump MockClock.

The server (h11 over a Trio TCP listener, in the test's own Trio loop) answers
per path: JSON, slowly, with an error status, with something not JSON, with
too much, or never. Timeouts are virtual time: no test waits in real time.
"""

from __future__ import annotations

import json
from functools import partial

import h11
import httpx
import pytest
import trio

from agentd.business_tools import MAX_ANSWER_BYTES, BusinessTools, ToolAnswer, ToolFailure
from agentd.config import BusinessTool

GUARD_S = 60.0


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


def tool(server: ToolServer, path: str, timeout_ms: int = 3000) -> BusinessTool:
    return BusinessTool(name="next_slot", description="Next free slot.", url=f"http://127.0.0.1:{server.port}{path}",
                        timeout_ms=timeout_ms)


@pytest.fixture
async def server(nursery):
    srv = ToolServer()
    await nursery.start(srv.serve)
    return srv


@pytest.fixture
async def tools():
    async with httpx.AsyncClient() as client:
        yield BusinessTools(client)


async def run(tools: BusinessTools, business_tool: BusinessTool, **arguments):
    with trio.fail_after(GUARD_S):
        return await tools.run(business_tool, arguments)


async def test_a_tool_that_answers_gets_the_arguments_as_json_and_returns_its_answer(autojump_clock, server, tools):
    outcome = await run(tools, tool(server, "/slots"), service="cleaning", days=[1, 2])
    assert outcome == ToolAnswer(content='{"slot":"Monday 9:00","asked":{"service":"cleaning","days":[1,2]}}')
    path, headers, body = server.requests[0]
    assert path == "/slots" and headers["content-type"] == "application/json"
    assert json.loads(body) == {"service": "cleaning", "days": [1, 2]}


async def test_a_slow_tool_within_its_timeout_still_answers(autojump_clock, server, tools):
    started = trio.current_time()
    outcome = await run(tools, tool(server, "/slow", timeout_ms=3000))
    assert isinstance(outcome, ToolAnswer)
    assert trio.current_time() - started == pytest.approx(2.0, abs=0.01)


async def test_a_tool_that_times_out_is_a_failure_at_its_timeout(autojump_clock, server, tools):
    started = trio.current_time()
    outcome = await run(tools, tool(server, "/never", timeout_ms=1500))
    assert outcome == ToolFailure(error="tool next_slot: no answer within 1500 ms")
    assert trio.current_time() - started == pytest.approx(1.5, abs=0.01)
    assert json.loads(outcome.content) == {"error": "tool next_slot: no answer within 1500 ms"}


@pytest.mark.parametrize(("path", "error"), [
    ("/fails", 'tool next_slot: HTTP 503: {"detail": "calendar offline"}'),
    ("/not-json", "tool next_slot: answer is not JSON: <html>oops</html>"),
    ("/huge", f"tool next_slot: answer larger than {MAX_ANSWER_BYTES} bytes"),
])
async def test_a_tool_that_fails_is_a_typed_failure_for_the_model(autojump_clock, server, tools, path, error):
    assert await run(tools, tool(server, path)) == ToolFailure(error=error)


async def test_an_unreachable_tool_is_a_failure_not_an_exception(autojump_clock, tools):
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome = await run(tools, BusinessTool(name="gone", description="d", url=f"http://127.0.0.1:{port}/"))
    assert isinstance(outcome, ToolFailure) and outcome.error.startswith("tool gone: ConnectError")


async def test_one_calls_slow_tool_never_blocks_another_calls_tool(autojump_clock, server, tools):
    finished = {}

    async def timed(name, path):
        outcome = await run(tools, tool(server, path, timeout_ms=10_000))
        finished[name] = (trio.current_time(), outcome)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(timed, "slow", "/slow"))
        nursery.start_soon(partial(timed, "fast", "/slots"))
    assert finished["fast"][0] < 0.1 and finished["slow"][0] >= 2.0
    assert all(isinstance(outcome, ToolAnswer) for _, outcome in finished.values())
