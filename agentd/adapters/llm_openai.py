"""The LLM seam: an OpenAI-compatible /chat/completions, streamed over SSE.

`ChatModel` is the one-method seam the rest of agentd depends on; `OpenAIChat`
implements it with one pooled `httpx.AsyncClient` (shared by every call, so
TLS is paid once, not per turn).

Usage::

    async with chat.stream(messages) as deltas:
        async for text in deltas:      # non-empty text pieces, in order
            ...

With `tools` (OpenAI function definitions, see `agentd.tool_calls`), the same
iterator also yields each completed tool call, after the text before it, as
a `ToolCall` or a `BadToolCall` (unknown name, arguments that are not a JSON
object): items are then `str | ToolCall | BadToolCall`. Calls are complete
when the choice finishes (`finish_reason`) or at `[DONE]`; a stream cut or
failing before then yields no half-assembled call, only the error. Without
tools no call is ever yielded (a stray one from a confused server is
dropped), so a text-only consumer needs no change.

How it fails (always `UpstreamUnavailable`, so the call degrades, never hangs):

* HTTP non-2xx: raised on entering `stream()`, with the status and a short
  excerpt of the body (at most 2 KB is read).
* In-band `data: {"error": ...}` after a 200: `LlmStreamError` (already an
  `UpstreamUnavailable`) from the iterator, after the deltas before it.
* Connection cut before `data: [DONE]`: the deltas received are yielded, then
  the iterator raises "stream cut before [DONE]"; the caller decides what to
  keep of a truncated reply.
* Any `httpx.HTTPError` (connect, TLS, protocol, httpx's own timeouts):
  translated here, once, `from exc`.
* Our two timeouts, on Trio's clock (so `MockClock` drives them in tests):
  - `first_token_timeout_s`: no non-empty text or tool-call fragment within
    this long of the request start. Keep-alive comments and role-only chunks
    do not count.
  - `timeout_s`: the total time this request may spend *waiting on the
    server* (connect, headers, every read). Time the caller spends between
    deltas (speaking a sentence, say) is not counted, so a slow consumer never
    times out a healthy stream, while a server that trickles keep-alives
    forever still does.

Why no cancel scope ever wraps a `yield`: Trio forbids a cancel scope that
spans a generator's yield (the scope would leak into the consumer's code).
The deltas are therefore an explicit iterator class whose `__anext__` puts a
deadline around each single await of the next chunk of the body, and nothing else.
Cancellation from outside (barge-in) is never translated: it propagates, and
the response is closed on the way out.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpx
import trio

from agentd import logsafe
from agentd.codecs.sse import DONE, SseDecoder, parse_chat_event
from agentd.config import Config
from agentd.errors import UpstreamUnavailable
from agentd.metrics import count_tokens, count_upstream_error
from agentd.tool_calls import BadToolCall, ToolCall, ToolCallAssembler, tool_names

__all__ = ["ChatItem", "ChatModel", "ChatSettings", "OpenAIChat", "build_messages"]

_T = TypeVar("_T")

_EXCERPT_BYTES = 2048  # how much of an error body we read, at most
_EXCERPT_CHARS = 300  # how much of it goes into the message
# After [DONE] the body's terminating chunk is normally already buffered;
# reading it lets httpx return the connection to the pool instead of closing
# it. Bounded so a misbehaving server cannot delay the end of the reply.
_DRAIN_AFTER_DONE_S = 0.25
_HISTORY_ROLES = frozenset({"user", "assistant"})
_MESSAGE_ROLES = frozenset({"user", "assistant", "tool"})

ChatItem = str | ToolCall | BadToolCall
"""What a reply stream yields: text deltas, and completed tool calls when tools were offered."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatSettings:
    """What `OpenAIChat` sends and how long it waits (seconds, Trio clock)."""

    base_url: str  # e.g. "https://api.openai.com/v1"; "/chat/completions" is appended
    model: str
    max_tokens_param: str  # some compatible servers only know "max_tokens"
    max_tokens: int
    temperature: float | None  # None: omitted, the server's default applies
    timeout_s: float  # total time spent waiting on the server, per request
    first_token_timeout_s: float  # from request start to the first non-empty text
    stream_usage: bool  # ask for token counts at the end of the stream (stream_options)

    @classmethod
    def from_config(cls, config: Config) -> ChatSettings:
        """The ``[llm]`` section of the loaded config (the only home of its defaults)."""
        llm = config.llm
        return cls(base_url=llm.base_url, model=llm.model, max_tokens_param=llm.max_tokens_param,
                   max_tokens=llm.max_tokens, temperature=llm.temperature,
                   timeout_s=llm.timeout_ms / 1000, first_token_timeout_s=llm.first_token_timeout_ms / 1000,
                   stream_usage=llm.stream_usage)


class ChatModel(Protocol):
    """The one-method seam for the language model."""

    def stream(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = (),
               ) -> AbstractAsyncContextManager[AsyncIterator[ChatItem]]:
        """Start a reply to `messages`; the context yields its text deltas (non-empty, in order)
        and, when `tools` are offered, each completed tool call."""
        ...


def build_messages(system_prompt: str, history: Sequence[tuple[str, str] | Mapping[str, Any]],
                   user_text: str | None) -> list[dict[str, Any]]:
    """The chat `messages` list: system prompt, then history in order, then the new user turn.

    `history` items are `(role, content)` with role "user" or "assistant", or
    whole OpenAI messages (dicts) with role "user", "assistant" (possibly with
    `tool_calls`) or "tool" (with `tool_call_id`), copied as they are. Any
    other role is our own bug and raises ValueError. An empty system prompt is
    left out; `user_text` None adds no user turn (asking again after a tool
    result, which is already the last history item).
    """
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for item in history:
        if isinstance(item, Mapping):
            if item.get("role") not in _MESSAGE_ROLES:
                raise ValueError(f"history message role must be user, assistant or tool, got {item.get('role')!r}")
            messages.append(dict(item))
            continue
        role, content = item
        if role not in _HISTORY_ROLES:
            raise ValueError(f"history role must be 'user' or 'assistant', got {role!r}")
        messages.append({"role": role, "content": content})
    if user_text is not None:
        messages.append({"role": "user", "content": user_text})
    return messages


class OpenAIChat:
    """`ChatModel` over an OpenAI-compatible HTTP API.

    `client` is shared and owned by the caller (one per process, for
    connection pooling); its own httpx timeouts still apply per operation and
    surface as `UpstreamUnavailable` like any other transport error.
    `api_key` None (or "") sends no Authorization header (local servers).
    """

    def __init__(self, client: httpx.AsyncClient, settings: ChatSettings, api_key: str | None) -> None:
        self._client = client
        self._settings = settings
        self._url = settings.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Accept": "text/event-stream"}
        self._secrets = (api_key,) if api_key else ()  # redacted from every error body we report
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def __repr__(self) -> str:
        return f"OpenAIChat(url={self._url!r}, model={self._settings.model!r})"

    @asynccontextmanager
    async def stream(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = (),
                     ) -> AsyncIterator[AsyncIterator[ChatItem]]:
        """POST the request; yield an iterator of text deltas (and tool calls); always close the response.

        Raises UpstreamUnavailable on entry for transport errors, non-2xx
        statuses and timeouts before the headers; the iterator raises it for
        failures mid-stream (see the module docstring).
        """
        timer = _RequestTimer(self._settings)
        body = self._body(messages, tools)
        request = self._client.build_request("POST", self._url, json=body, headers=self._headers)
        with _translate_http_errors("chat request failed"):
            response = await timer.wait(self._client.send(request, stream=True))
        try:
            await _raise_for_status(response, timer, self._secrets)
            async with aclosing(response.aiter_text()) as chunks:
                yield _Deltas(chunks, timer, tool_names(tools) if tools else None)
        finally:
            await response.aclose()

    def _body(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> dict:
        body: dict = {
            "model": self._settings.model,
            "messages": [dict(message) for message in messages],
            "stream": True,
            self._settings.max_tokens_param: self._settings.max_tokens,
        }
        if tools:
            body["tools"] = [dict(tool) for tool in tools]
        if self._settings.temperature is not None:
            body["temperature"] = self._settings.temperature
        if self._settings.stream_usage:
            body["stream_options"] = {"include_usage": True}
        return body


class _RequestTimer:
    """The two deadlines of one request, on Trio's clock (see the module docstring)."""

    def __init__(self, settings: ChatSettings) -> None:
        self._first_token_timeout_s = settings.first_token_timeout_s
        self._first_token_deadline = trio.current_time() + settings.first_token_timeout_s
        self._timeout_s = settings.timeout_s
        self._budget_s = settings.timeout_s
        self.got_first_token = False

    async def wait(self, awaitable: Awaitable[_T]) -> _T:
        """Await one server step; raise UpstreamUnavailable if a deadline passes first."""
        started = trio.current_time()
        deadline, reason = self._deadline(started)
        try:
            with trio.move_on_at(deadline):
                return await awaitable
        finally:
            self._budget_s -= trio.current_time() - started
        count_upstream_error("llm", "timeout")
        raise UpstreamUnavailable(reason)

    def _deadline(self, now: float) -> tuple[float, str]:
        budget_deadline = now + max(self._budget_s, 0.0)
        if not self.got_first_token and self._first_token_deadline <= budget_deadline:
            return self._first_token_deadline, f"LLM: no first token within {self._first_token_timeout_s:g}s"
        return budget_deadline, f"LLM: reply not complete after {self._timeout_s:g}s of waiting"


class _Deltas:
    """The iterator handed to the caller: text deltas and tool calls until [DONE], or an error.

    Not an async generator on purpose: each `__anext__` wraps only its own
    awaits in deadlines, so no cancel scope ever spans a suspension in the
    consumer's code. `known_tools` None: no tools were offered, tool-call
    fragments are dropped.
    """

    def __init__(self, chunks: AsyncIterator[str], timer: _RequestTimer, known_tools: frozenset[str] | None) -> None:
        self._chunks = chunks  # the body as decoded text, in network-sized pieces
        self._timer = timer
        self._decoder = SseDecoder()
        self._events: collections.deque[str] = collections.deque()  # data of events read, not yet parsed
        self._calls = ToolCallAssembler(known_tools) if known_tools is not None else None
        self._ready: collections.deque[ChatItem] = collections.deque()  # completed calls not yet handed out
        self._saw_done = False
        self._finished = False
        # The server's token counts for this request, once its usage chunk has arrived (None before,
        # or when the server sends none).
        self.usage: dict[str, int] | None = None

    def __aiter__(self) -> "_Deltas":
        return self

    async def __anext__(self) -> ChatItem:
        if self._finished:
            raise StopAsyncIteration
        try:
            return await self._next_item()
        except BaseException:
            self._finished = True  # after an error, cancellation or the end: stay ended
            raise

    async def _next_item(self) -> ChatItem:
        while not self._ready:
            if self._saw_done:
                raise StopAsyncIteration
            data = await self._next_event_data()
            try:
                event = parse_chat_event(data)
            except UpstreamUnavailable:  # an in-band error object, or data that is no chat event
                count_upstream_error("llm", "stream_error")
                raise
            if event is DONE:
                await self._drain()
                self._saw_done = True
                self._complete_calls()
                continue
            if event.usage is not None:
                self.usage = event.usage
                count_tokens(event.usage)
            if self._calls is not None and event.tool_calls:
                self._timer.got_first_token = True
                self._calls.feed(event.tool_calls)
            if event.finish_reason is not None:
                self._complete_calls()
            if event.text:
                self._timer.got_first_token = True
                return event.text  # calls completed by this same chunk follow it
        return self._ready.popleft()

    def _complete_calls(self) -> None:
        if self._calls is not None:
            self._ready.extend(self._calls.finish())

    async def _next_event_data(self) -> str:
        """The data of the next complete SSE event; end of body before [DONE] is an error.

        Reads whole chunks, not lines: one deadline per network read, not per line.
        """
        while not self._events:
            with _translate_http_errors("LLM stream failed"):
                chunk = await self._timer.wait(anext(self._chunks, None))
            if chunk is None:
                return self._data_at_end_of_body()
            self._events.extend(self._decoder.feed(chunk))
        return self._events.popleft()

    def _data_at_end_of_body(self) -> str:
        # An event the body ended inside of was cut, unless it is the [DONE]
        # some servers send without the final blank line; the spec drops it.
        pending = self._decoder.flush()
        if pending is not None and pending.strip() == DONE.value:
            return pending
        count_upstream_error("llm", "stream_cut")
        raise UpstreamUnavailable("LLM: stream cut before [DONE]")

    async def _drain(self) -> None:
        """Read the rest of the body after [DONE] (see _DRAIN_AFTER_DONE_S); errors don't matter now."""
        with trio.move_on_after(_DRAIN_AFTER_DONE_S), contextlib.suppress(httpx.HTTPError):
            while await anext(self._chunks, None) is not None:
                pass


async def _raise_for_status(response: httpx.Response, timer: _RequestTimer, secrets: tuple[str, ...]) -> None:
    """Raise UpstreamUnavailable naming the status and the start of the body, if not 2xx.

    The body is the endpoint's text, and some echo the request's headers back:
    it is redacted (credentials and `secrets`) before it enters the message.
    """
    if response.is_success:
        return
    try:
        with _translate_http_errors("reading the error body failed"):
            excerpt = await timer.wait(_read_excerpt(response))
    except UpstreamUnavailable as exc:
        excerpt = f"({exc})"
    count_upstream_error("llm", "http_status")
    raise UpstreamUnavailable(logsafe.redact(f"LLM: HTTP {response.status_code} from {response.request.url}: "
                                             f"{excerpt}", secrets, limit=_EXCERPT_CHARS + 200))


async def _read_excerpt(response: httpx.Response) -> str:
    """At most _EXCERPT_BYTES of the body, decoded leniently and shortened for a log line."""
    body = bytearray()
    async with aclosing(response.aiter_bytes()) as chunks:
        async for chunk in chunks:
            body += chunk
            if len(body) >= _EXCERPT_BYTES:
                break
    return logsafe.excerpt(bytes(body[:_EXCERPT_BYTES]), _EXCERPT_CHARS)


@contextlib.contextmanager
def _translate_http_errors(what: str) -> Iterator[None]:
    """The one place httpx's exceptions become ours."""
    try:
        yield
    except httpx.HTTPError as exc:
        count_upstream_error("llm", "transport")
        raise UpstreamUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
