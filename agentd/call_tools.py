"""Which tools a business offers the model, and what a call of each one means.

Pure. The agent's own tools are `end_call` (finish speaking, then end the
stream) and `transfer_call(to)` (say the handoff line, end the stream, and
answer Twilio's `<Connect action>` with a `<Dial>`); `transfer_call` is
offered only to a business with `[businesses.NAME.transfer]` targets, its
`to` an enum of their names. Business tools (`[[businesses.NAME.tools]]`)
follow, as declared.

`decide` turns one completed call from the model into a `Decision`:
`EndCall`, `Transfer` (target and number), `RunBusinessTool` (the tool and
its arguments, for `agentd.adapters.business_tools`), or `Rejected` (a bad call, an
unknown tool or transfer target) whose `error` goes back to the model as the
call's result (`error_result`), so the model can try again and the caller
never meets silence. `dtmf_decision` does the same for a keypad digit the
business maps to an action.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agentd.config import Business, BusinessTool
from agentd.tool_calls import BadToolCall, ToolCall, function_tool

__all__ = ["END_CALL", "TRANSFER_CALL", "Decision", "EndCall", "Rejected", "RunBusinessTool", "Transfer",
           "decide", "dtmf_decision", "error_result", "tools_for"]

END_CALL = "end_call"
TRANSFER_CALL = "transfer_call"

_END_CALL_TOOL = function_tool(
    END_CALL, "End the phone call, after your reply (if any) has been said. Use it when the caller says "
    "goodbye or the conversation is over.", {"type": "object", "properties": {}})


@dataclass(frozen=True, slots=True, kw_only=True)
class EndCall:
    """The agent hangs up after what it is saying."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Transfer:
    """Hand the caller to `target`, a configured transfer target, at `number` (E.164)."""

    target: str
    number: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RunBusinessTool:
    """POST `arguments` to the business tool `tool` and give the model its answer."""

    tool: BusinessTool
    arguments: Mapping[str, Any] = field(hash=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected:
    """The call cannot be carried out; `error` (words for the model) becomes its result."""

    error: str


Decision = EndCall | Transfer | RunBusinessTool | Rejected


def tools_for(business: Business) -> list[dict[str, Any]]:
    """The request's `tools` for a call of `business`: end_call, transfer_call (if it has targets), its own."""
    tools = [_END_CALL_TOOL]
    if business.transfer:
        tools.append(_transfer_tool(business))
    tools += [function_tool(t.name, t.description, t.parameters) for t in business.tools]
    return tools


def _transfer_tool(business: Business) -> dict[str, Any]:
    targets = sorted(business.transfer)
    return function_tool(
        TRANSFER_CALL, "Transfer the caller to a person, after saying so. Use it when the caller asks for a "
        f"person or you cannot help. Targets: {', '.join(targets)}.",
        {"type": "object", "properties": {"to": {"type": "string", "enum": targets}}, "required": ["to"]})


def decide(business: Business, call: ToolCall | BadToolCall) -> Decision:
    """What the model's tool call means for this call of `business` (see the module docstring)."""
    if isinstance(call, BadToolCall):
        return Rejected(error=call.error)
    if call.name == END_CALL:
        return EndCall()
    if call.name == TRANSFER_CALL:
        return _transfer(business, call.arguments.get("to"))
    tool = next((t for t in business.tools if t.name == call.name), None)
    if tool is None:  # offered by someone else's request: the adapter let it through, we do not run it
        return Rejected(error=f"unknown tool {call.name!r}")
    return RunBusinessTool(tool=tool, arguments=call.arguments)


def _transfer(business: Business, target: Any) -> Transfer | Rejected:
    if isinstance(target, str) and target in business.transfer:
        return Transfer(target=target, number=business.transfer[target])
    known = ", ".join(sorted(business.transfer)) or "none"
    return Rejected(error=f"unknown transfer target {target!r} (known: {known})")


def dtmf_decision(business: Business, digit: str) -> EndCall | Transfer | None:
    """The action `business` maps the single keypad `digit` to, or None (the digit goes to the model)."""
    action = business.dtmf.get(digit)
    if action is None:
        return None
    if action == END_CALL:
        return EndCall()
    decision = _transfer(business, action.partition(":")[2])
    assert isinstance(decision, Transfer), "config validation guarantees DTMF transfer targets exist"
    return decision


def error_result(error: str) -> str:
    """A `tool` message's content reporting a failure: `{"error": "..."}`."""
    return json.dumps({"error": error}, ensure_ascii=False)
