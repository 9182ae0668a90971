"""Business tools: POST the model's arguments to the business's endpoint, bring back its answer.

`BusinessTools.run(tool, arguments)` POSTs `arguments` as a JSON object to
`tool.url` with a pooled `httpx.AsyncClient` shared by every call (a tool call
opens no new TLS session when a connection to its host is idle). One call's
tool traffic waits on its own request only, never on another call's, as long
as the pool never runs out: give the tools a client of their own, or a pool
sized for the LLM streams plus the tool requests, because a bounded pool that
slow tools fill up would make every other request wait for a connection. It
never raises for the tool's failures: every outcome is a value.

* `ToolAnswer`: HTTP 2xx with a JSON body; `content` is that JSON, compact,
  ready to be the `tool` message's content.
* `ToolFailure`: the tool did not answer within `tool.timeout_ms` (on Trio's
  clock, connect to last byte), answered non-2xx, answered something that is
  not JSON or is larger than `MAX_ANSWER_BYTES`, or could not be reached.
  `content` is `{"error": "..."}` for the model, which can then tell the
  caller; the caller never meets silence because a tool broke.

Cancellation (the caller hung up, barged in) propagates; the response is
closed on the way out. The error texts name the tool and the failure, never
the arguments (they may carry what the caller said).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from agentd import logsafe
from agentd.call_tools import error_result
from agentd.config import BusinessTool

__all__ = ["MAX_ANSWER_BYTES", "BusinessTools", "ToolAnswer", "ToolFailure", "ToolOutcome"]

MAX_ANSWER_BYTES = 16_384  # an answer is read into the model's context: keep it a lookup, not a dump
_EXCERPT_CHARS = 120


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolAnswer:
    """The tool answered; `content` is its JSON body (compact text)."""

    content: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolFailure:
    """The tool failed; `error` says how (for logs and the model)."""

    error: str

    @property
    def content(self) -> str:
        """The `tool` message content reporting the failure to the model."""
        return error_result(self.error)


ToolOutcome = ToolAnswer | ToolFailure


class BusinessTools:
    """Runs business tools over a shared, pooled HTTP client (owned by the caller)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def run(self, tool: BusinessTool, arguments: Mapping[str, Any]) -> ToolOutcome:
        """POST `arguments` to `tool.url`; the answer or a failure, within `tool.timeout_ms`."""
        with trio.move_on_after(tool.timeout_ms / 1000):
            try:
                return await self._post(tool, arguments)
            except httpx.HTTPError as exc:
                return ToolFailure(error=f"tool {tool.name}: {type(exc).__name__}: {exc}")
        return ToolFailure(error=f"tool {tool.name}: no answer within {tool.timeout_ms} ms")

    async def _post(self, tool: BusinessTool, arguments: Mapping[str, Any]) -> ToolOutcome:
        request = self._client.build_request(
            "POST", tool.url, json=dict(arguments), headers={"Accept": "application/json"})
        response = await self._client.send(request, stream=True)
        try:
            body = await _read_bounded(response)
        finally:
            await response.aclose()
        if body is None:
            return ToolFailure(error=f"tool {tool.name}: answer larger than {MAX_ANSWER_BYTES} bytes")
        if not response.is_success:
            return ToolFailure(error=f"tool {tool.name}: HTTP {response.status_code}: {_excerpt(body)}")
        return _parse_answer(tool, body)


async def _read_bounded(response: httpx.Response) -> bytes | None:
    """The whole body, or None once it passes MAX_ANSWER_BYTES (the rest is not read)."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            return None
    return bytes(body)


def _parse_answer(tool: BusinessTool, body: bytes) -> ToolOutcome:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return ToolFailure(error=f"tool {tool.name}: answer is not JSON: {_excerpt(body)}")
    return ToolAnswer(content=json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _excerpt(body: bytes) -> str:
    return logsafe.excerpt(body, _EXCERPT_CHARS)
