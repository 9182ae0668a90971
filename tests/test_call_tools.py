"""agentd.call_tools: the tools a business offers, and what each call of the model means."""

import json

import pytest

from agentd.call_tools import (
    EndCall, Rejected, RunBusinessTool, Transfer, decide, dtmf_decision, error_result, tools_for,
)
from agentd.config import load_config
from agentd.tool_calls import BadToolCall, ToolCall

LOOKUP = {"name": "lookup_order", "description": "Find an order.", "url": "https://shop.example/orders",
          "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}}


@pytest.fixture
def acme():
    return load_config(None, env={}).with_overrides(**{"businesses.acme.tools": [LOOKUP]}).business("acme")


def call(name: str, **arguments) -> ToolCall:
    return ToolCall(id="call_1", name=name, arguments=arguments, arguments_json=json.dumps(arguments))


def test_a_business_with_targets_and_tools_offers_all_three_kinds(acme):
    tools = tools_for(acme)
    assert [t["function"]["name"] for t in tools] == ["end_call", "transfer_call", "lookup_order"]
    transfer = tools[1]["function"]["parameters"]
    assert transfer["properties"]["to"]["enum"] == ["front_desk"] and transfer["required"] == ["to"]
    assert tools[2] == {"type": "function", "function": {
        "name": "lookup_order", "description": "Find an order.", "parameters": LOOKUP["parameters"]}}
    json.dumps(tools)  # plain JSON, ready for the request body


def test_a_business_without_targets_is_not_offered_transfer():
    plain = load_config(None, env={}).business("default")
    assert [t["function"]["name"] for t in tools_for(plain)] == ["end_call"]


def test_end_call_and_a_known_transfer_target(acme):
    assert decide(acme, call("end_call")) == EndCall()
    assert decide(acme, call("transfer_call", to="front_desk")) == Transfer(target="front_desk", number="+15555550100")


@pytest.mark.parametrize("arguments", [{"to": "billing"}, {}, {"to": 7}])
def test_an_unknown_transfer_target_is_rejected_naming_the_known_ones(acme, arguments):
    decision = decide(acme, call("transfer_call", **arguments))
    assert isinstance(decision, Rejected) and "unknown transfer target" in decision.error
    assert "front_desk" in decision.error


def test_a_business_tool_call_carries_the_tool_and_its_arguments(acme):
    decision = decide(acme, call("lookup_order", order="A17"))
    assert decision == RunBusinessTool(tool=acme.tools[0], arguments={"order": "A17"})


def test_bad_calls_and_tools_the_business_does_not_have_are_rejected(acme):
    bad = BadToolCall(id="c", name="transfer_call", arguments_json="{", error="arguments are not valid JSON: '{'")
    assert decide(acme, bad) == Rejected(error="arguments are not valid JSON: '{'")
    assert decide(acme, call("order_pizza")) == Rejected(error="unknown tool 'order_pizza'")


def test_mapped_dtmf_digits_decide_and_other_digits_go_to_the_model(acme):
    assert dtmf_decision(acme, "0") == Transfer(target="front_desk", number="+15555550100")
    assert dtmf_decision(acme, "5") is None
    hangup = load_config(None, env={}).with_overrides(**{"businesses.acme.dtmf": {"9": "end_call"}})
    assert dtmf_decision(hangup.business("acme"), "9") == EndCall()


def test_error_results_are_json_the_model_can_read():
    assert json.loads(error_result("tool timed out after 3000 ms")) == {"error": "tool timed out after 3000 ms"}
