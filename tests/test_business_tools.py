"""Business tools against a real HTTP server on 127.0.0.1, all on Trio's autojump MockClock.

The server (tests/tool_server.py; fixtures `tool_server` and `business_tools`
in conftest.py) answers per path: JSON, slowly, with an error status, with
something not JSON, with too much, or never. Timeouts are virtual time: no
test waits in real time.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import trio

from agentd.adapters.business_tools import MAX_ANSWER_BYTES, BusinessTools, ToolAnswer, ToolFailure
from agentd.config import BusinessTool
from tests.tool_server import ToolServer

GUARD_S = 60.0


def tool(tool_server: ToolServer, path: str, timeout_ms: int = 3000) -> BusinessTool:
    return BusinessTool(name="next_slot", description="Next free slot.",
                        url=f"http://127.0.0.1:{tool_server.port}{path}",
                        timeout_ms=timeout_ms)


async def run(business_tools: BusinessTools, business_tool: BusinessTool, **arguments):
    with trio.fail_after(GUARD_S):
        return await business_tools.run(business_tool, arguments)


async def test_a_tool_that_answers_gets_the_arguments_as_json_and_returns_its_answer(
        autojump_clock, tool_server, business_tools):
    outcome = await run(business_tools, tool(tool_server, "/slots"), service="cleaning", days=[1, 2])
    assert outcome == ToolAnswer(content='{"slot":"Monday 9:00","asked":{"service":"cleaning","days":[1,2]}}')
    path, headers, body = tool_server.requests[0]
    assert path == "/slots" and headers["content-type"] == "application/json"
    assert json.loads(body) == {"service": "cleaning", "days": [1, 2]}


async def test_a_slow_tool_within_its_timeout_still_answers(autojump_clock, tool_server, business_tools):
    started = trio.current_time()
    outcome = await run(business_tools, tool(tool_server, "/slow", timeout_ms=3000))
    assert isinstance(outcome, ToolAnswer)
    assert trio.current_time() - started == pytest.approx(2.0, abs=0.01)


async def test_a_tool_that_times_out_is_a_failure_at_its_timeout(autojump_clock, tool_server, business_tools):
    started = trio.current_time()
    outcome = await run(business_tools, tool(tool_server, "/never", timeout_ms=1500))
    assert outcome == ToolFailure(error="tool next_slot: no answer within 1500 ms")
    assert trio.current_time() - started == pytest.approx(1.5, abs=0.01)
    assert json.loads(outcome.content) == {"error": "tool next_slot: no answer within 1500 ms"}


@pytest.mark.parametrize(("path", "error"), [
    ("/fails", 'tool next_slot: HTTP 503: {"detail": "calendar offline"}'),
    ("/not-json", "tool next_slot: answer is not JSON: <html>oops</html>"),
    ("/huge", f"tool next_slot: answer larger than {MAX_ANSWER_BYTES} bytes"),
])
async def test_a_tool_that_fails_is_a_typed_failure_for_the_model(
        autojump_clock, tool_server, business_tools, path, error):
    assert await run(business_tools, tool(tool_server, path)) == ToolFailure(error=error)


async def test_an_unreachable_tool_is_a_failure_not_an_exception(autojump_clock, business_tools):
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome = await run(business_tools, BusinessTool(name="gone", description="d", url=f"http://127.0.0.1:{port}/"))
    assert isinstance(outcome, ToolFailure) and outcome.error.startswith("tool gone: ConnectError")


async def test_one_calls_slow_tool_never_blocks_another_calls_tool(autojump_clock, tool_server, business_tools):
    finished = {}

    async def timed(name, path):
        outcome = await run(business_tools, tool(tool_server, path, timeout_ms=10_000))
        finished[name] = (trio.current_time(), outcome)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(timed, "slow", "/slow"))
        nursery.start_soon(partial(timed, "fast", "/slots"))
    assert finished["fast"][0] < 0.1 and finished["slow"][0] >= 2.0
    assert all(isinstance(outcome, ToolAnswer) for _, outcome in finished.values())
