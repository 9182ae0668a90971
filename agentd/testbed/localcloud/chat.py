"""The `rules` LLM engine and OpenAI's JSON shapes, pure and synchronous.

The reply is chosen from the businesses in the settings: the business whose
`system_prompt` equals the request's system message (the first message, role
system; surrounding whitespace ignored) answers with the first of its rules
any of whose keywords occurs as a whole word (case-insensitive) in the LAST
user message, else with its `fallback_reply`. No business matched ->
`NO_BUSINESS_REPLY`. A reply streams as tokens = words with their trailing
whitespace, so the tokens concatenate back to the reply exactly.

Tool calls (`rules_answer`): when the request offers `tools`, a matching rule
with a `tool` ends its answer (its `reply` text first, if any) with a call of
that tool, its `arguments` text sent verbatim, whatever it holds (the tests
use that for bad JSON and unknown targets). A request whose last message is a
`tool` result is answered with text built from that result: the `after_tool`
of the rule that made the call (`{result}` standing for the result's text),
else the result itself. Without `tools` a tool rule answers with its text
only, as a real model can call only the tools it was offered.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentd.testbed.localcloud.settings import BusinessLike

NO_BUSINESS_REPLY = "I'm sorry, I didn't catch that."
_TOKEN = re.compile(r"\S+\s*")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatRequestError:
    """An error to answer with: HTTP status and OpenAI's error body."""

    status: int
    body: dict[str, Any]


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


SERVER_ERROR = error_body(
    "The server had an error while processing your request. Sorry about that!", kind="server_error"
)
_STATUS_ERRORS = {
    401: error_body("Incorrect API key provided.", code="invalid_api_key"),
    429: error_body("Rate limit reached for requests", kind="requests", code="rate_limit_exceeded"),
    503: error_body("The engine is currently overloaded, please try again later", kind="server_error"),
}


def status_error(status: int) -> ChatRequestError:
    """The error OpenAI answers with `status` (a fault injected by the tests)."""
    return ChatRequestError(status=status, body=_STATUS_ERRORS.get(status, SERVER_ERROR))


def validate_chat_request(body: Any) -> ChatRequestError | None:
    """Why OpenAI would refuse this chat/completions body with 400, or None."""
    if not isinstance(body, dict):
        return ChatRequestError(status=400, body=error_body("We could not parse the JSON body of your request."))
    for name in ("model", "messages"):
        if name not in body:
            message = f"Missing required parameter: '{name}'."
            return ChatRequestError(status=400, body=error_body(message, param=name, code="missing_required_parameter"))
    messages = body["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        message = "Invalid type for 'messages': expected an array of objects with a 'role'."
        return ChatRequestError(status=400, body=error_body(message, param="messages", code="invalid_type"))
    if not messages:
        message = (
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead."
        )
        return ChatRequestError(status=400, body=error_body(message, param="messages", code="empty_array"))
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class RulesAnswer:
    """What the `rules` engine answers: text, then optionally one tool call."""

    text: str
    tool: str = ""  # "" = no tool call
    arguments: str = "{}"  # the call's arguments text, verbatim


def rules_answer(messages: list[dict[str, Any]], businesses: Mapping[str, BusinessLike], *,
                 offers_tools: bool) -> RulesAnswer:
    """The `rules` engine's answer to a (valid) message list, tool calls included (see the module doc)."""
    business = _business_for(messages, businesses)
    if business is None:
        return RulesAnswer(text=NO_BUSINESS_REPLY)
    if messages[-1].get("role") == "tool":
        return RulesAnswer(text=_after_tool(messages, business))
    last_user = next((text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    rule = next((r for r in business.rules if any(has_word(last_user, k) for k in r.keywords)), None)
    if rule is None:
        return RulesAnswer(text=business.fallback_reply)
    if rule.tool and offers_tools:
        return RulesAnswer(text=rule.reply, tool=rule.tool, arguments=rule.arguments)
    return RulesAnswer(text=rule.reply or business.fallback_reply)


def _after_tool(messages: list[dict[str, Any]], business: BusinessLike) -> str:
    """Text built from the last tool result, by the rule whose tool made the call."""
    result = messages[-1]
    content = text_of(result.get("content"))
    name = _called_tool_name(messages, result.get("tool_call_id"))
    rule = next((r for r in business.rules if r.tool and r.tool == name), None)
    return (rule.after_tool if rule is not None else "{result}").replace("{result}", content)


def _called_tool_name(messages: list[dict[str, Any]], call_id: Any) -> str:
    for message in reversed(messages):
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict) and call.get("id") == call_id:
                return str((call.get("function") or {}).get("name", ""))
    return ""


def has_word(text: str, keyword: str) -> bool:
    """`keyword` (one or more words) occurs in `text` between word boundaries, any case."""
    keyword = keyword.strip()
    if not keyword:
        return False
    pattern = r"(?<!\w)" + re.escape(keyword) + r"(?!\w)"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


def text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def tokens(reply: str) -> list[str]:
    """Words with their trailing whitespace; "".join(tokens(r)) == r.lstrip()."""
    return _TOKEN.findall(reply)


def token_limit(body: dict[str, Any]) -> int | None:
    """The request's max_completion_tokens or max_tokens (tokens = words here)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return None


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def new_tool_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_call_chunks(call_id: str, name: str, arguments: str, piece_chars: int) -> list[dict[str, Any]]:
    """The `delta.tool_calls` entries OpenAI streams for one call: id and name first, then the
    arguments text in pieces of `piece_chars`."""
    head = {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
    pieces = [arguments[i:i + piece_chars] for i in range(0, len(arguments), piece_chars)]
    return [head, *({"index": 0, "function": {"arguments": piece}} for piece in pieces)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Completion:
    """Identity shared by every chunk of one answer."""

    id: str
    model: str
    created: int

    @classmethod
    def start(cls, model: str) -> Completion:
        return cls(id=new_completion_id(), model=model, created=int(time.time()))

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        """One `chat.completion.chunk` with a single choice."""
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "localcloud",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        """The final chunk sent when stream_options.include_usage is set."""
        return {**self.chunk({}), "choices": [], "usage": usage}

    def whole(self, content: str, finish_reason: str, usage: dict[str, int],
              tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A non-streaming `chat.completion`."""
        message = {"role": "assistant", "content": content or None if tool_calls else content, "refusal": None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "localcloud",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage,
        }


def usage_of(messages: list[dict[str, Any]], completion_tokens: int) -> dict[str, int]:
    """Token counts, with words standing in for tokens."""
    prompt = sum(len(tokens(text_of(m.get("content")))) for m in messages)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def _business_for(messages: list[dict[str, Any]], businesses: Mapping[str, BusinessLike]) -> BusinessLike | None:
    first = messages[0] if messages else {}
    if first.get("role") != "system":
        return None
    system = text_of(first.get("content")).strip()
    return next((b for b in businesses.values() if b.system_prompt.strip() == system), None)
