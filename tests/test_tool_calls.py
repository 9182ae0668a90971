"""Tool calling: the SSE fragments, their assembly, the history messages, and OpenAIChat streaming them.

The adapter tests use the same split-body MockTransport server as
tests/test_llm_openai.py; localcloud's tool calls over a real socket are in
tests/test_localcloud_tools.py.
"""

import json

import pytest
import trio

from agentd.codecs.sse import ChatDelta, LlmStreamError, ToolCallFragment, parse_chat_event
from agentd.adapters.llm_openai import build_messages
from agentd.tool_calls import (
    BadToolCall, ToolCall, ToolCallAssembler, assistant_tool_calls_message, function_tool, tool_names,
    tool_result_message,
)
from tests.test_llm_openai import DONE, GUARD_S, MESSAGES, Body, Server, chunk, make_chat

END_CALL = function_tool("end_call", "End the call.", {"type": "object", "properties": {}})
TRANSFER = function_tool("transfer_call", "Hand the caller to a person.",
                         {"type": "object", "properties": {"to": {"type": "string", "enum": ["front_desk"]}},
                          "required": ["to"]})
TOOLS = [END_CALL, TRANSFER]


def call_chunk(index: int, *, call_id: str | None = None, name: str | None = None, arguments: str = "",
               finish: str | None = None) -> bytes:
    """One `data:` event carrying one tool-call fragment, shaped as OpenAI streams it."""
    function = {k: v for k, v in (("name", name), ("arguments", arguments)) if v is not None}
    entry = {"index": index, "function": function}
    if call_id is not None:
        entry |= {"id": call_id, "type": "function"}
    body = {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"tool_calls": [entry]}, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def streamed_call(index: int, call_id: str, name: str, arguments: str, piece: int = 3) -> bytes:
    """A whole call: id and name first, then the arguments in `piece`-character fragments."""
    parts = [arguments[i:i + piece] for i in range(0, len(arguments), piece)]
    return call_chunk(index, call_id=call_id, name=name) + b"".join(call_chunk(index, arguments=p) for p in parts)


async def collect_items(chat, tools=TOOLS) -> list:
    with trio.fail_after(GUARD_S):
        async with chat.stream(MESSAGES, tools) as items:
            return [item async for item in items]


# --- the codec: fragments ---------------------------------------------------------------------

def test_a_chunk_with_tool_call_fragments_reports_each_one():
    data = call_chunk(0, call_id="call_1", name="end_call", arguments="{")[6:].decode()
    assert parse_chat_event(data) == ChatDelta(
        "", None, tool_calls=(ToolCallFragment(index=0, id="call_1", name="end_call", arguments="{"),))


@pytest.mark.parametrize("tool_calls", ['"x"', '[1]', '[{"index": "0"}]', '[{"index": 0, "id": 5}]',
                                        '[{"index": 0, "function": {"arguments": 7}}]'])
def test_malformed_tool_call_fragments_are_a_stream_error(tool_calls):
    data = '{"choices": [{"delta": {"tool_calls": %s}}]}' % tool_calls
    with pytest.raises(LlmStreamError, match="tool_calls"):
        parse_chat_event(data)


# --- assembly ---------------------------------------------------------------------------------

def feed_all(assembler: ToolCallAssembler, *fragments: ToolCallFragment) -> list:
    assembler.feed(fragments)
    return assembler.finish()


def test_arguments_split_across_fragments_are_joined_and_parsed():
    calls = feed_all(ToolCallAssembler(tool_names(TOOLS)),
                     ToolCallFragment(index=0, id="call_9", name="transfer_call"),
                     ToolCallFragment(index=0, arguments='{"t'), ToolCallFragment(index=0, arguments='o": "fr'),
                     ToolCallFragment(index=0, arguments='ont_desk"}'))
    assert calls == [ToolCall(id="call_9", name="transfer_call", arguments={"to": "front_desk"},
                              arguments_json='{"to": "front_desk"}')]


def test_several_calls_interleaved_by_index_come_out_in_index_order():
    calls = feed_all(ToolCallAssembler(tool_names(TOOLS)),
                     ToolCallFragment(index=1, id="b", name="end_call"),
                     ToolCallFragment(index=0, id="a", name="transfer_call"),
                     ToolCallFragment(index=0, arguments='{"to":"front_desk"}'),
                     ToolCallFragment(index=1, arguments="{}"))
    assert [(c.id, c.name) for c in calls] == [("a", "transfer_call"), ("b", "end_call")]


def test_empty_arguments_mean_no_arguments():
    [call] = feed_all(ToolCallAssembler(tool_names(TOOLS)), ToolCallFragment(index=0, id="c", name="end_call"))
    assert call.arguments == {}


@pytest.mark.parametrize(("name", "arguments", "error"), [
    ("transfer_call", '{"to": ', "not valid JSON"),
    ("transfer_call", '["front_desk"]', "must be a JSON object"),
    ("order_pizza", "{}", "unknown tool 'order_pizza' (offered: end_call, transfer_call)"),
    ("", "{}", "named no function"),
])
def test_bad_calls_are_typed_results_that_keep_what_the_model_sent(name, arguments, error):
    [call] = feed_all(ToolCallAssembler(tool_names(TOOLS)), ToolCallFragment(index=0, id="c1", name=name or None),
                      ToolCallFragment(index=0, arguments=arguments))
    assert isinstance(call, BadToolCall)
    assert (call.id, call.name, call.arguments_json) == ("c1", name, arguments)
    assert error in call.error


def test_a_call_without_an_id_gets_one_from_its_index_and_finish_empties_the_assembler():
    assembler = ToolCallAssembler(tool_names(TOOLS))
    assert [c.id for c in feed_all(assembler, ToolCallFragment(index=2, name="end_call"))] == ["call_2"]
    assert assembler.finish() == []


# --- history messages -------------------------------------------------------------------------

def test_tool_calls_and_results_are_openai_messages_that_history_carries():
    call = ToolCall(id="call_1", name="transfer_call", arguments={"to": "front_desk"},
                    arguments_json='{"to":"front_desk"}')
    bad = BadToolCall(id="call_2", name="nope", arguments_json="{}", error="unknown tool")
    assistant = assistant_tool_calls_message("", [call, bad])
    assert assistant == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "transfer_call", "arguments": '{"to":"front_desk"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "nope", "arguments": "{}"}}]}
    result = tool_result_message("call_1", '{"ok": true}')
    assert result == {"role": "tool", "tool_call_id": "call_1", "content": '{"ok": true}'}
    messages = build_messages("Be brief.", [("user", "Hi"), assistant, result], None)
    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}
    assert messages == [system, user, assistant, result]


def test_history_refuses_a_message_with_an_unexpected_role():
    with pytest.raises(ValueError, match="system"):
        build_messages("", [{"role": "system", "content": "x"}], "Hi")


# --- the adapter ------------------------------------------------------------------------------

async def test_the_request_carries_the_tools_only_when_given():
    server = Server()
    await collect_items(make_chat(server))
    assert server.sent_json()["tools"] == TOOLS
    await collect_items(make_chat(server), tools=())
    assert "tools" not in server.sent_json()


@pytest.mark.parametrize("piece", [1, 7, 100_000])
async def test_text_then_a_call_split_across_chunks(piece):
    stream = (chunk(role="assistant") + chunk("Connecting") + chunk(" you.")
              + streamed_call(0, "call_1", "transfer_call", '{"to": "front_desk"}')
              + chunk(finish="tool_calls") + DONE)
    items = await collect_items(make_chat(Server(Body(stream, piece=piece))))
    assert items == ["Connecting", " you.", ToolCall(id="call_1", name="transfer_call", arguments={"to": "front_desk"},
                                                      arguments_json='{"to": "front_desk"}')]


async def test_a_call_as_the_only_output_and_calls_completed_at_done_without_a_finish_reason():
    stream = streamed_call(0, "a", "end_call", "{}") + streamed_call(1, "b", "order_pizza", '{"size": "L"}') + DONE
    items = await collect_items(make_chat(Server(Body(stream))))
    assert [type(item) for item in items] == [ToolCall, BadToolCall]
    assert "unknown tool 'order_pizza'" in items[1].error


async def test_a_call_with_bad_json_arguments_is_yielded_as_a_bad_call_not_raised():
    stream = streamed_call(0, "a", "transfer_call", '{"to": "front') + chunk(finish="tool_calls") + DONE
    [item] = await collect_items(make_chat(Server(Body(stream))))
    assert isinstance(item, BadToolCall) and "not valid JSON" in item.error


async def test_without_tools_a_stray_call_is_dropped_so_text_consumers_see_only_text():
    stream = chunk("Bye.") + streamed_call(0, "a", "end_call", "{}") + chunk(finish="tool_calls") + DONE
    assert await collect_items(make_chat(Server(Body(stream))), tools=()) == ["Bye."]


async def test_a_tool_call_fragment_counts_as_the_first_token(autojump_clock):
    async def late_text():
        await trio.sleep(10)

    body = Body(call_chunk(0, call_id="a", name="end_call"), then=late_text)  # then silence, then the body ends
    chat = make_chat(Server(body), first_token_timeout_s=1.0, timeout_s=30.0)
    with trio.fail_after(GUARD_S):
        async with chat.stream(MESSAGES, TOOLS) as items:
            with pytest.raises(Exception, match="cut before") as info:
                [item async for item in items]
    assert "first token" not in str(info.value)
