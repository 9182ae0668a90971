"""One round of tool calls: carry out what the model asked, and write it into the history.

When a reply ends with tool calls, `run_tool_calls` does everything that is
not a decision about the call's state:

* each call is decided (`call_tools.decide`);
* the business tools among them run concurrently, each within its own
  `timeout_ms` (one slow tool does not hold up another, and no tool outlives
  the caller's cancel scope: barge-in or hang-up cancels them all);
* every call gets a result message, as OpenAI requires before the next
  request: the business tool's answer or error, the rejection's error, or
  `{"ok": true}` for `end_call` / `transfer_call`.

It returns a `ToolRound`: the messages to append to the history (the
assistant turn with its calls, then one `tool` message per call, in call
order), the `ending` the model asked for (the first `EndCall` or `Transfer`,
for the FSM to act on), and whether the model must be asked again (some result
needs an answer and nothing ends the call). What to do with an ending,
whether to play a filler while tools run, and when to ask again are the
FSM's decisions, not this module's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from agentd.adapters.business_tools import BusinessTools
from agentd.call_tools import EndCall, Rejected, RunBusinessTool, Transfer, decide, error_result
from agentd.config import Business
from agentd.tool_calls import BadToolCall, ToolCall, assistant_tool_calls_message, tool_result_message

__all__ = ["ToolRound", "run_tool_calls"]

_DONE_RESULT = json.dumps({"ok": True})


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolRound:
    """What one round of tool calls produced (see the module docstring)."""

    messages: tuple[dict[str, Any], ...]
    ending: EndCall | Transfer | None
    ask_again: bool


async def run_tool_calls(business: Business, text: str, calls: Sequence[ToolCall | BadToolCall],
                         tools: BusinessTools) -> ToolRound:
    """Carry out `calls` (made after the reply text `text`) for a call of `business`."""
    decisions = [decide(business, call) for call in calls]
    results = [_DONE_RESULT if isinstance(d, EndCall | Transfer) else "" for d in decisions]
    async with trio.open_nursery() as nursery:
        for index, decision in enumerate(decisions):
            if isinstance(decision, RunBusinessTool):
                nursery.start_soon(_run_one, tools, decision, results, index)
            elif isinstance(decision, Rejected):
                results[index] = error_result(decision.error)
    ending = next((d for d in decisions if isinstance(d, EndCall | Transfer)), None)
    messages = (assistant_tool_calls_message(text, calls),
                *(tool_result_message(call.id, result) for call, result in zip(calls, results)))
    ask_again = ending is None and any(isinstance(d, RunBusinessTool | Rejected) for d in decisions)
    return ToolRound(messages=messages, ending=ending, ask_again=ask_again)


async def _run_one(tools: BusinessTools, decision: RunBusinessTool, results: list[str], index: int) -> None:
    outcome = await tools.run(decision.tool, decision.arguments)
    results[index] = outcome.content
