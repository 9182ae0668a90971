"""localcloud's rules LLM making tool calls, read by agentd's production OpenAIChat over a real socket.

The shipped acme business is the model: its "bye" rule ends in end_call, its
"person" rule says "Of course." then calls transfer_call to front_desk.
The tool faults break the calls the way a confused model would.
"""

from __future__ import annotations

import dataclasses

import httpx
import pytest
import trio

from agentd.call_tools import EndCall, Rejected, Transfer, decide, error_result, tools_for
from agentd.config import load_config
from agentd.adapters.llm_openai import ChatSettings, OpenAIChat, build_messages
from agentd.testbed.localcloud import LocalCloud, settings_from_config
from agentd.tool_calls import BadToolCall, ToolCall, assistant_tool_calls_message, tool_result_message
from tests.test_localcloud_chat import data_events, sse_lines

GUARD_S = 10.0


@pytest.fixture(scope="module")
def config():
    return load_config(None, env={}).with_overrides(**{"businesses.acme.rules": [
        {"keywords": ["bye"], "tool": "end_call"},
        {"keywords": ["person"], "reply": "Of course.", "tool": "transfer_call", "arguments": '{"to": "front_desk"}'},
        {"keywords": ["slot"], "reply": "Let me look.", "tool": "next_slot", "arguments": '{"day": "monday"}',
         "after_tool": "The next free slot is {result}."},
    ]})


@pytest.fixture
def cloud(config):
    with LocalCloud(settings_from_config(config)) as lc:
        yield lc


@pytest.fixture
def acme(config):
    return config.business("acme")


async def ask(cloud, acme, history, user_text: str | None, *, tools=True) -> list:
    """Every item of one streamed reply from localcloud, through OpenAIChat."""
    settings = dataclasses.replace(ChatSettings.from_config(load_config(None, env={})), base_url=cloud.http_base_url)
    messages = build_messages(acme.system_prompt, history, user_text)
    with trio.fail_after(GUARD_S):
        async with httpx.AsyncClient() as client:
            chat = OpenAIChat(client, settings, api_key=None)
            async with chat.stream(messages, tools_for(acme) if tools else ()) as items:
                return [item async for item in items]


async def test_end_call_as_the_only_output(cloud, acme):
    [item] = await ask(cloud, acme, [], "ok bye")
    assert isinstance(item, ToolCall) and (item.name, item.arguments) == ("end_call", {})
    assert decide(acme, item) == EndCall()


async def test_transfer_after_text(cloud, acme):
    items = await ask(cloud, acme, [], "can I talk to a person")
    assert "".join(i for i in items if isinstance(i, str)) == "Of course."
    assert isinstance(items[-1], ToolCall) and items[-1].arguments == {"to": "front_desk"}
    assert decide(acme, items[-1]) == Transfer(target="front_desk", number="+15555550100")


def test_the_call_streams_in_several_chunks_then_finishes_with_tool_calls(cloud, acme):
    body = {"model": "m", "stream": True, "tools": tools_for(acme),
            "messages": build_messages(acme.system_prompt, [], "a person please")}
    with httpx.Client(base_url=cloud.http_base_url) as client:
        _, lines = sse_lines(client, body)
    chunks = [e for e in data_events(lines) if isinstance(e, dict)]
    fragments = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if "tool_calls" in c["choices"][0]["delta"]]
    assert len(fragments) >= 3
    assert fragments[0]["id"].startswith("call_") and fragments[0]["function"]["name"] == "transfer_call"
    assert "".join(f["function"]["arguments"] for f in fragments) == '{"to": "front_desk"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_without_tools_the_rule_answers_with_its_text_only(cloud, acme):
    assert "".join(await ask(cloud, acme, [], "a person please", tools=False)) == "Of course."


async def test_bad_json_arguments_arrive_as_a_bad_call(cloud, acme):
    cloud.set_faults(llm_tool_arguments='{"to": "front')
    items = await ask(cloud, acme, [], "a person please")
    assert isinstance(items[-1], BadToolCall) and "not valid JSON" in items[-1].error
    assert isinstance(decide(acme, items[-1]), Rejected)


async def test_an_unknown_tool_arrives_as_a_bad_call(cloud, acme):
    cloud.set_faults(llm_tool_name="order_pizza")
    [item] = await ask(cloud, acme, [], "bye")
    assert isinstance(item, BadToolCall) and "unknown tool 'order_pizza'" in item.error


async def test_an_unknown_transfer_target_is_rejected_for_the_model(cloud, acme):
    cloud.set_faults(llm_tool_arguments='{"to": "billing"}')
    items = await ask(cloud, acme, [], "a person please")
    decision = decide(acme, items[-1])
    assert isinstance(decision, Rejected) and "unknown transfer target 'billing'" in decision.error


async def test_a_tool_result_is_answered_with_text_built_from_it(cloud, acme):
    call = ToolCall(id="call_7", name="next_slot", arguments={"day": "monday"}, arguments_json='{"day": "monday"}')
    history = [("user", "any free slot?"), assistant_tool_calls_message("Let me look.", [call]),
               tool_result_message("call_7", "Monday at nine")]
    assert "".join(await ask(cloud, acme, history, None)) == "The next free slot is Monday at nine."


async def test_an_error_result_is_answered_too_so_the_caller_never_meets_silence(cloud, acme):
    call = ToolCall(id="call_8", name="transfer_call", arguments={}, arguments_json="{}")
    history = [assistant_tool_calls_message("", [call]), tool_result_message("call_8", error_result("no target"))]
    assert "".join(await ask(cloud, acme, history, None)) == '{"error": "no target"}'


def test_a_non_streamed_answer_carries_the_whole_call(cloud, acme):
    body = {"model": "m", "stream": False, "tools": tools_for(acme),
            "messages": build_messages(acme.system_prompt, [], "a person please")}
    with httpx.Client(base_url=cloud.http_base_url) as client:
        choice = client.post("/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Of course."
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "transfer_call", "arguments": '{"to": "front_desk"}'}
