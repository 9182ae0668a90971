"""Tool calls in OpenAI's chat format: definitions, streamed assembly, history messages.

Pure and synchronous. Three jobs, all about the wire shapes:

* `function_tool` builds one entry of the request's `tools` list
  (`{"type": "function", "function": {name, description, parameters}}`).
* `ToolCallAssembler` puts a streamed call back together. The model streams
  each call as fragments of `choices[0].delta.tool_calls`: the first one of a
  call carries its `index`, `id` and function `name`, the later ones only the
  `index` and the next piece of the `arguments` text; several calls are told
  apart by `index`. A call is complete when the choice finishes
  (`finish_reason`, normally "tool_calls") or the stream ends.
* A completed call is a `ToolCall` (a known name, arguments that parse as a
  JSON object) or a `BadToolCall` (an unknown name, arguments that are not a
  JSON object, no name at all). A bad call is a fact about the model's output,
  not a crash: the caller answers it with an error result
  (`tool_result_message`) and the model tries again.

History: the assistant turn that called tools is `assistant_tool_calls_message`
(its text, possibly empty, and every call as sent, bad ones included, because
each `tool` result must answer an id the model produced); each result is a
`tool` message carrying the call's `tool_call_id`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentd.codecs.sse import ToolCallFragment

__all__ = ["BadToolCall", "ToolCall", "ToolCallAssembler", "assistant_tool_calls_message", "function_tool",
           "tool_names", "tool_result_message"]

_EXCERPT_CHARS = 80  # how much of bad arguments goes into an error text


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCall:
    """A complete, well-formed call of a tool the request offered."""

    id: str
    name: str
    arguments: Mapping[str, Any] = field(hash=False)  # the parsed JSON object
    arguments_json: str  # the text exactly as the model sent it (for the history)

    def wire(self) -> dict[str, Any]:
        """This call as an entry of an assistant message's `tool_calls`."""
        return _wire(self.id, self.name, self.arguments_json)


@dataclass(frozen=True, slots=True, kw_only=True)
class BadToolCall:
    """A call the model got wrong; `error` says how, in words meant for the model."""

    id: str
    name: str  # "" when the model sent none
    arguments_json: str
    error: str

    def wire(self) -> dict[str, Any]:
        """This call as an entry of an assistant message's `tool_calls`."""
        return _wire(self.id, self.name, self.arguments_json)


def _wire(call_id: str, name: str, arguments_json: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments_json}}


def function_tool(name: str, description: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """One entry of the request's `tools`: a function with a JSON-schema `parameters` object."""
    return {"type": "function",
            "function": {"name": name, "description": description, "parameters": _plain(parameters)}}


def tool_names(tools: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The function names a `tools` list offers."""
    return frozenset(str(tool["function"]["name"]) for tool in tools)


def assistant_tool_calls_message(text: str, calls: Sequence[ToolCall | BadToolCall]) -> dict[str, Any]:
    """The assistant turn that made `calls`; `content` is None when it said nothing (as OpenAI sends it)."""
    return {"role": "assistant", "content": text or None, "tool_calls": [call.wire() for call in calls]}


def tool_result_message(call_id: str, content: str) -> dict[str, Any]:
    """The `tool` message answering the call `call_id` (content is text, often JSON)."""
    return {"role": "tool", "tool_call_id": call_id, "content": content}


class _Pending:
    """One call being assembled."""

    def __init__(self, index: int) -> None:
        self.id = ""
        self.name = ""
        self.arguments: list[str] = []
        self.index = index

    def add(self, fragment: ToolCallFragment) -> None:
        # Some servers repeat the id and name on every fragment: the first wins.
        self.id = self.id or (fragment.id or "")
        self.name = self.name or (fragment.name or "")
        self.arguments.append(fragment.arguments)


class ToolCallAssembler:
    """Collects tool-call fragments of one streamed reply; `finish` returns the calls in index order.

    `known` is the set of names the request offered; any other name is a
    `BadToolCall`. A call without an id gets `call_<index>` so that its
    result can still answer it.
    """

    def __init__(self, known: frozenset[str]) -> None:
        self._known = known
        self._pending: dict[int, _Pending] = {}

    def feed(self, fragments: Iterable[ToolCallFragment]) -> None:
        """Add one chunk's fragments."""
        for fragment in fragments:
            self._pending.setdefault(fragment.index, _Pending(fragment.index)).add(fragment)

    def finish(self) -> list[ToolCall | BadToolCall]:
        """The calls assembled so far, in index order; the assembler is empty afterwards."""
        calls = [self._complete(self._pending[index]) for index in sorted(self._pending)]
        self._pending.clear()
        return calls

    def _complete(self, pending: _Pending) -> ToolCall | BadToolCall:
        call_id = pending.id or f"call_{pending.index}"
        text = "".join(pending.arguments)
        bad = {"id": call_id, "name": pending.name, "arguments_json": text}
        if not pending.name:
            return BadToolCall(**bad, error="the tool call named no function")
        if pending.name not in self._known:
            offered = ", ".join(sorted(self._known)) or "none"
            return BadToolCall(**bad, error=f"unknown tool {pending.name!r} (offered: {offered})")
        try:
            arguments = json.loads(text or "{}")  # an empty string is how some models say "no arguments"
        except (ValueError, RecursionError):
            return BadToolCall(**bad, error=f"arguments are not valid JSON: {text[:_EXCERPT_CHARS]!r}")
        if not isinstance(arguments, dict):
            return BadToolCall(**bad, error=f"arguments must be a JSON object, got {text[:_EXCERPT_CHARS]!r}")
        return ToolCall(id=call_id, name=pending.name, arguments=arguments, arguments_json=text)


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a (possibly read-only) nested mapping from the config."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value
