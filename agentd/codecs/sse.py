"""Server-sent events as OpenAI-compatible chat completions stream them.

Two layers, both pure:

* `SseDecoder` turns lines into event data, following the WHATWG
  "event stream interpretation" rules that matter here: `data:` fields
  accumulate (joined by "\\n"), a blank line dispatches, `:` starts a comment
  (servers send these as keep-alives), other fields are ignored.
* `parse_chat_event` turns one event's data into a text delta (plus any
  tool-call fragments, `choices[0].delta.tool_calls`), the `DONE` sentinel,
  or an `LlmStreamError` for the in-band error some servers send after an
  HTTP 200 (`data: {"error": {...}}`).

Tool-call fragments are reported as they come, one per entry of
`delta.tool_calls`: the first fragment of a call carries its `index`, `id`
and function `name`, later ones only the `index` and a piece of the
`arguments` string. Putting the pieces together is `agentd.tool_calls`' job.

A connection that drops before `[DONE]` is the transport's business: the
caller notices that `DONE` never came.
"""

import enum
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from agentd import logsafe
from agentd.errors import UpstreamUnavailable

_BOM = "\ufeff"
_LINE_END = re.compile(r"\r\n|\r|\n")  # SSE's three terminators (not str.splitlines: data may hold U+2028)


class LlmStreamError(UpstreamUnavailable):
    """The chat stream reported an error, or sent data that is not a chunk."""

    def __init__(self, message: str, *, error_type: str | None = None, code: str | None = None) -> None:
        details = ", ".join(f"{k}={v}" for k, v in (("type", error_type), ("code", code)) if v is not None)
        super().__init__(f"LLM stream error ({details}): {message}" if details else f"LLM stream error: {message}")
        self.message = message
        self.error_type = error_type
        self.code = code


class SseDecoder:
    """SSE decoder: feed it lines or raw chunks of the body, get each event's data back.

    Lines may come with or without their terminator ("\\n", "\\r\\n" or "\\r";
    it is stripped). Chunks (`feed`) may end anywhere, even between the "\\r"
    and "\\n" of one terminator. One decoder per response stream.
    """

    def __init__(self) -> None:
        self._data: list[str] = []
        self._first_line = True
        self._partial = ""  # the start of a line whose terminator has not arrived yet

    def feed(self, chunk: str) -> list[str]:
        """Process a chunk of the body; return the data of every event it completes, in order.

        One call per network read instead of one per line: the caller's
        per-read overhead (a deadline, error translation) is paid once.
        """
        lines = _LINE_END.split(self._partial + chunk)
        # The last piece has no terminator yet; a piece ending in "\\r" may still get its "\\n".
        self._partial = lines.pop()
        if self._partial == "" and lines and chunk.endswith("\r"):
            self._partial = lines.pop() + "\r"
        return [data for line in lines if (data := self.feed_line(line)) is not None]

    def feed_line(self, line: str) -> str | None:
        """Process one line; return the event's data when this line completes one."""
        line = line.rstrip("\r\n")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix(_BOM)  # the spec drops one BOM at the start of the stream
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # comment / keep-alive
        field, colon, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        # `event`, `id`, `retry` and unknown fields do not matter for chat completions.
        return None

    def flush(self) -> str | None:
        """At end of stream: the pending event's data, if the last blank line never came."""
        partial, self._partial = self._partial, ""
        if partial and (data := self.feed_line(partial)) is not None:
            return data  # the held-back line was the blank one that ends the event
        return self._dispatch()

    def _dispatch(self) -> str | None:
        if not self._data:
            return None  # blank line with no data: nothing to dispatch
        data = "\n".join(self._data)
        self._data = []
        return data


class _Done(enum.Enum):
    DONE = "[DONE]"

    def __repr__(self) -> str:
        return "DONE"


DONE = _Done.DONE
"""The end-of-stream sentinel (`data: [DONE]`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallFragment:
    """One entry of `delta.tool_calls`: a piece of the tool call number `index`."""

    index: int
    id: str | None = None  # only on a call's first fragment
    name: str | None = None  # likewise
    arguments: str = ""  # the next piece of the JSON arguments text


@dataclass(frozen=True, slots=True)
class ChatDelta:
    """One streamed piece of the reply (positional use is fine: obvious fields)."""

    text: str
    finish_reason: str | None = None
    # Token counts (prompt_tokens, completion_tokens, ...) from a chunk that reports them:
    # the last one, when the request asked for stream_options.include_usage.
    usage: dict[str, int] | None = None
    tool_calls: tuple[ToolCallFragment, ...] = ()


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _raise_in_band(error: Any) -> None:
    # The endpoint's words, which may echo our request: credentials redacted before they travel on.
    if isinstance(error, dict):
        raise LlmStreamError(
            logsafe.redact(str(error.get("message") or "unspecified error")),
            error_type=_optional_str(error.get("type")),
            code=_optional_str(error.get("code")),
        )
    raise LlmStreamError(logsafe.redact(str(error)))


def _first_choice(chunk: dict) -> dict | None:
    choices = chunk.get("choices")
    if choices is None or choices == []:
        return None  # usage-only or role-only chunks carry no choice
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise LlmStreamError(f"choices: expected a list of objects, got {str(choices)[:60]}")
    return choices[0]


def _delta_text(choice: dict) -> str:
    delta = choice.get("delta")
    if delta is None:
        return ""
    if not isinstance(delta, dict):
        raise LlmStreamError(f"choices[0].delta: expected an object, got {str(delta)[:60]}")
    content = delta.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise LlmStreamError(f"choices[0].delta.content: expected a string, got {str(content)[:60]}")
    return content


def _usage(usage: Any) -> dict[str, int] | None:
    """The integer counts of a `usage` object; None when there is none."""
    if not isinstance(usage, dict):
        return None
    return {k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)} or None


def _delta_tool_calls(choice: dict) -> tuple[ToolCallFragment, ...]:
    delta = choice.get("delta")
    calls = delta.get("tool_calls") if isinstance(delta, dict) else None
    if calls is None:
        return ()
    if not isinstance(calls, list):
        raise LlmStreamError(f"choices[0].delta.tool_calls: expected a list, got {str(calls)[:60]}")
    return tuple(_tool_call_fragment(i, call) for i, call in enumerate(calls))


def _tool_call_fragment(position: int, call: Any) -> ToolCallFragment:
    where = f"choices[0].delta.tool_calls[{position}]"
    if not isinstance(call, dict):
        raise LlmStreamError(f"{where}: expected an object, got {str(call)[:60]}")
    index = call.get("index", position)  # a few compatible servers leave it out when there is one call
    function = call.get("function") or {}
    if isinstance(index, bool) or not isinstance(index, int) or index < 0 or not isinstance(function, dict):
        raise LlmStreamError(f"{where}: expected an index and a function object, got {str(call)[:60]}")
    fields = {"id": call.get("id"), "name": function.get("name"), "arguments": function.get("arguments") or ""}
    for name, value in fields.items():
        if value is not None and not isinstance(value, str):
            raise LlmStreamError(f"{where}.{name}: expected a string, got {str(value)[:60]}")
    return ToolCallFragment(index=index, **fields)


def parse_chat_event(data: str) -> ChatDelta | Literal[_Done.DONE]:
    """Interpret one SSE event's data from /chat/completions with stream=true.

    Returns DONE for `[DONE]`; otherwise the first choice's delta text ("" when
    absent or null, and for chunks without choices), its finish_reason and its
    tool-call fragments.
    Raises LlmStreamError for an in-band `error` object and for data that is
    not a JSON object shaped like a chat chunk.
    """
    if data.strip() == "[DONE]":
        return DONE
    try:
        chunk = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise LlmStreamError(f"event data is not JSON: {data[:60]!r}") from exc
    if not isinstance(chunk, dict):
        raise LlmStreamError(f"event data is not a JSON object: {data[:60]!r}")
    if chunk.get("error"):
        _raise_in_band(chunk["error"])
    choice = _first_choice(chunk)
    if choice is None:
        return ChatDelta(text="", finish_reason=None, usage=_usage(chunk.get("usage")))
    return ChatDelta(text=_delta_text(choice), finish_reason=_optional_str(choice.get("finish_reason")),
                     tool_calls=_delta_tool_calls(choice))
