"""agentd.tool_round: a round of the model's tool calls, carried out against a real local HTTP server.

Uses tests/tool_server.py (fixtures `tool_server` and `business_tools` in
conftest.py) in the test's own Trio loop, on the autojump MockClock: "slow" is two virtual
seconds.
"""

from __future__ import annotations

import json

import pytest
import trio

from agentd.call_tools import EndCall, Transfer
from agentd.config import load_config
from agentd.tool_calls import BadToolCall, ToolCall
from agentd.tool_round import run_tool_calls

GUARD_S = 60.0


@pytest.fixture
def acme(tool_server):
    base = f"http://127.0.0.1:{tool_server.port}"
    declared = [{"name": "next_slot", "description": "d", "url": base + "/slots"},
             {"name": "slow_lookup", "description": "d", "url": base + "/slow", "timeout_ms": 5000},
             {"name": "stuck", "description": "d", "url": base + "/never", "timeout_ms": 1000}]
    return load_config(None, env={}).with_overrides(**{"businesses.acme.tools": declared}).business("acme")


def call(call_id: str, name: str, **arguments) -> ToolCall:
    return ToolCall(id=call_id, name=name, arguments=arguments, arguments_json=json.dumps(arguments))


async def run(acme, business_tools, text, calls):
    with trio.fail_after(GUARD_S):
        return await run_tool_calls(acme, text, calls, business_tools)


async def test_a_transfer_ends_the_round_with_the_target_and_a_result_for_the_history(
        autojump_clock, acme, business_tools):
    round_ = await run(acme, business_tools, "Of course.", [call("c1", "transfer_call", to="front_desk")])
    assert round_.ending == Transfer(target="front_desk", number="+15555550100") and not round_.ask_again
    assistant, result = round_.messages
    assert assistant["content"] == "Of course." and assistant["tool_calls"][0]["id"] == "c1"
    assert result == {"role": "tool", "tool_call_id": "c1", "content": '{"ok": true}'}


async def test_business_tools_run_concurrently_and_their_answers_go_back_to_the_model(
        autojump_clock, acme, business_tools):
    started = trio.current_time()
    calls = [call("a", "slow_lookup", day="mon"), call("b", "next_slot", day="tue")]
    round_ = await run(acme, business_tools, "", calls)
    assert trio.current_time() - started == pytest.approx(2.0, abs=0.01)  # the slow one's time, not the sum
    assert round_.ending is None and round_.ask_again
    results = [json.loads(m["content"]) for m in round_.messages[1:]]
    assert [r["asked"] for r in results] == [{"day": "mon"}, {"day": "tue"}]
    assert [m["tool_call_id"] for m in round_.messages[1:]] == ["a", "b"]


async def test_a_tool_that_times_out_is_an_error_result_for_the_model(autojump_clock, acme, business_tools):
    round_ = await run(acme, business_tools, "", [call("a", "stuck")])
    assert json.loads(round_.messages[1]["content"]) == {"error": "tool stuck: no answer within 1000 ms"}
    assert round_.ask_again


async def test_a_bad_call_next_to_end_call_gets_its_error_and_the_call_still_ends(autojump_clock, acme, business_tools):
    bad = BadToolCall(id="x", name="order_pizza", arguments_json="{}", error="unknown tool 'order_pizza'")
    round_ = await run(acme, business_tools, "Bye!", [bad, call("y", "end_call")])
    assert round_.ending == EndCall() and not round_.ask_again
    assert json.loads(round_.messages[1]["content"]) == {"error": "unknown tool 'order_pizza'"}


async def test_an_unknown_transfer_target_asks_the_model_again(autojump_clock, acme, business_tools):
    round_ = await run(acme, business_tools, "", [call("t", "transfer_call", to="billing")])
    assert round_.ending is None and round_.ask_again
    assert "unknown transfer target 'billing'" in json.loads(round_.messages[1]["content"])["error"]


async def test_cancelling_the_round_cancels_its_tools(autojump_clock, acme, business_tools):
    with trio.move_on_after(0.5) as scope:  # the caller barged in
        await run(acme, business_tools, "", [call("a", "slow_lookup")])
    assert scope.cancelled_caught and trio.current_time() == pytest.approx(0.5)
