"""An OpenAI-compatible HTTP/1.1 server on asyncio streams, framed by h11.

Routes: `POST /v1/chat/completions` (stream=true: server-sent events; else
one `chat.completion`), `GET /v1/models`, and localcloud's own
`GET /localcloud/stats` (the request and token counters of `CloudState`, so
a benchmark in another process can measure what its LLM calls cost). Connections are kept alive between
requests, as httpx's pool expects. Each connection is one asyncio task that
reads a request, answers it, and starts h11's next cycle.

The stream is shaped like OpenAI's: `: ping` comment first, a role chunk,
one chunk per token (word), a chunk with `finish_reason`, an optional usage
chunk, then `data: [DONE]`. Injected faults break exactly one thing each:
`llm_http_status` (error status + OpenAI error body), `llm_inband_error`
(`data: {"error": ...}` after the first token, then the message ends with no
[DONE]), `llm_cut_after_tokens` (TCP close mid-body: an incomplete chunked
message), `llm_stall_first_token` (headers and ping, then silence until the
client hangs up).

A tool call (see `chat.rules_answer`) follows the answer's words as OpenAI
streams one: a chunk with the call's id and name, then its arguments in
pieces of `TOOL_ARGUMENT_PIECE_CHARS` over several chunks, then
`finish_reason: "tool_calls"`. The faults `llm_tool_name` and
`llm_tool_arguments` replace the name or the arguments of every call.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

import h11

from agentd.testbed.localcloud.chat import (
    SERVER_ERROR,
    ChatRequestError,
    Completion,
    error_body,
    new_tool_call_id,
    rules_answer,
    status_error,
    tool_call_chunks,
    token_limit,
    tokens,
    usage_of,
    validate_chat_request,
)
from agentd.testbed.localcloud.settings import CloudState, LocalCloudSettings

READ_BYTES = 65536
TOOL_ARGUMENT_PIECE_CHARS = 6  # small, so even short arguments take several chunks
_JSON = [("content-type", "application/json")]
_SSE = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]


class _Http:
    """One server-side HTTP/1.1 connection: h11 state plus the asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conn = h11.Connection(h11.SERVER)
        self._reader = reader
        self._writer = writer

    async def next_request(self) -> tuple[h11.Request, bytes] | None:
        """The next complete request and its body; None once the peer closed."""
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self._reader.read(READ_BYTES))
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                return request, bytes(body)

    async def send(self, event: Any) -> None:
        self._writer.write(self.conn.send(event) or b"")
        await self._writer.drain()

    async def send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        headers = [*_JSON, ("content-length", str(len(data)))]
        await self.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
        await self.send(h11.Data(data=data))
        await self.send(h11.EndOfMessage())

    async def send_event(self, payload: Any) -> None:
        """One SSE `data:` event carrying `payload` as JSON."""
        await self.send(h11.Data(data=b"data: " + json.dumps(payload).encode() + b"\n\n"))

    async def wait_peer_closed(self) -> None:
        """Wait until the client closes its side (a stalled answer ends then)."""
        while await self._reader.read(READ_BYTES):
            pass

    def can_continue(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    def close(self) -> None:
        self._writer.close()


class OpenAiHttpServer:
    """Serves the chat API; `start` binds, `close` ends every connection."""

    def __init__(self, state: CloudState) -> None:
        self._state = state
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    async def start(self, host: str, port: int) -> int:
        """Start listening; returns the bound port (useful when `port` is 0)."""
        self._server = await asyncio.start_server(self._connection, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        http = _Http(reader, writer)
        try:
            await self._serve(http)
        except (ConnectionError, h11.RemoteProtocolError):
            pass  # the client hung up or spoke broken HTTP: this connection ends, the server serves on
        finally:
            self._connections.discard(task)
            http.close()

    async def _serve(self, http: _Http) -> None:
        while (received := await http.next_request()) is not None:
            request, body = received
            keep_alive = await self._route(http, request, body)
            if not keep_alive or not http.can_continue():
                return
            http.conn.start_next_cycle()

    async def _route(self, http: _Http, request: h11.Request, body: bytes) -> bool:
        """Answer one request; False if the connection must close afterwards."""
        path = request.target.split(b"?")[0].decode("ascii", "replace").rstrip("/")
        method = request.method.decode("ascii", "replace")
        if path == "/v1/chat/completions" and method == "POST":
            return await self._chat(http, body)
        if path == "/v1/models" and method == "GET":
            await http.send_json(200, self._models())
            return True
        if path == "/localcloud/stats" and method == "GET":
            await http.send_json(200, self._state.stats())
            return True
        await http.send_json(404, error_body(f"Invalid URL ({method} {path})"))
        return True

    def _models(self) -> dict[str, Any]:
        model = {"id": self._state.settings.llm_model, "object": "model", "created": 0, "owned_by": "localcloud"}
        return {"object": "list", "data": [model]}

    async def _chat(self, http: _Http, raw: bytes) -> bool:
        body = _parse_json(raw)
        self._state.record_chat(body)
        settings = self._state.settings
        refusal = _refusal(body, settings)
        if refusal is not None:
            await http.send_json(refusal.status, refusal.body)
            return True
        self._state.count("chat_prompt_tokens", usage_of(body["messages"], 0)["prompt_tokens"])
        reply = rules_answer(body["messages"], settings.businesses, offers_tools=bool(body.get("tools")))
        words = tokens(reply.text)
        limit = token_limit(body)
        finish = "length" if limit is not None and len(words) > limit else "stop"
        words = words[:limit] if limit is not None else words
        tool_call = _tool_call(reply.tool, reply.arguments, settings) if finish == "stop" and reply.tool else None
        answer = _Answer(Completion.start(str(body["model"])), words, "tool_calls" if tool_call else finish,
                         body, settings, self._state, tool_call)
        self._state.count("active_chats")
        try:
            if body.get("stream"):
                return await answer.stream(http)
            return await answer.whole(http)
        finally:
            self._state.count("active_chats", -1)


class _Answer:
    """One chat answer being delivered, whole or as a stream, with its faults."""

    def __init__(self, completion: Completion, words: list[str], finish: str, body: dict[str, Any],
                 settings: LocalCloudSettings, state: CloudState, tool_call: list[dict[str, Any]] | None) -> None:
        self._state = state
        self._completion = completion
        self._words = words
        self._tool_call = tool_call  # the call's delta.tool_calls entries, in streaming order
        self._finish = finish
        self._body = body
        self._settings = settings
        self._faults = settings.faults

    async def whole(self, http: _Http) -> bool:
        """stream=false; in-band error -> 500 here, cut -> close without an answer."""
        if self._faults.llm_stall_first_token:
            await http.wait_peer_closed()
            return False
        if self._faults.llm_cut_after_tokens >= 0:
            return False
        if self._faults.llm_inband_error:
            await http.send_json(500, SERVER_ERROR)
            return True
        await asyncio.sleep(self._first_token_delay_s() + self._token_gap_s() * max(0, len(self._words) - 1))
        usage = usage_of(self._body["messages"], len(self._words))
        calls = [_whole_call(self._tool_call)] if self._tool_call else None
        await http.send_json(200, self._completion.whole("".join(self._words), self._finish, usage, calls))
        self._state.count("chat_tokens_sent", len(self._words))
        return True

    async def stream(self, http: _Http) -> bool:
        """stream=true: SSE chunks as OpenAI sends them; False if the connection was cut."""
        await http.send(h11.Response(status_code=200, headers=_SSE, reason=_reason(200)))
        await http.send(h11.Data(data=b": ping\n\n"))
        if self._faults.llm_stall_first_token:
            await http.wait_peer_closed()
            return False
        await asyncio.sleep(self._first_token_delay_s())
        await http.send_event(self._completion.chunk({"role": "assistant", "content": ""}))
        cut_after = self._faults.llm_cut_after_tokens
        for index, word in enumerate(self._words):
            if index == cut_after:
                return False
            if index:
                await asyncio.sleep(self._token_gap_s())
            await http.send_event(self._completion.chunk({"content": word}))
            self._state.count("chat_tokens_sent")
            if self._faults.llm_inband_error:
                return await self._inband_error(http)
        if cut_after >= 0:  # the reply had no more than `cut_after` tokens: cut before the end
            return False
        if self._faults.llm_inband_error:  # an empty reply: the error is all there is
            return await self._inband_error(http)
        for entry in self._tool_call or ():
            await asyncio.sleep(self._token_gap_s())
            await http.send_event(self._completion.chunk({"tool_calls": [entry]}))
        await self._finish_stream(http)
        return True

    async def _finish_stream(self, http: _Http) -> None:
        await http.send_event(self._completion.chunk({}, self._finish))
        options = self._body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            await http.send_event(self._completion.usage_chunk(usage_of(self._body["messages"], len(self._words))))
        await http.send(h11.Data(data=b"data: [DONE]\n\n"))
        await http.send(h11.EndOfMessage())

    async def _inband_error(self, http: _Http) -> bool:
        await http.send_event(SERVER_ERROR)
        await http.send(h11.EndOfMessage())
        return True

    def _first_token_delay_s(self) -> float:
        return self._settings.llm_ttft_ms / 1000

    def _token_gap_s(self) -> float:
        rate = self._settings.llm_tokens_per_s
        return 1 / rate if rate > 0 else 0.0


def _tool_call(name: str, arguments: str, settings: LocalCloudSettings) -> list[dict[str, Any]]:
    """The streamed entries of the rules' tool call, after the name and arguments faults."""
    faults = settings.faults
    return tool_call_chunks(new_tool_call_id(), faults.llm_tool_name or name,
                            faults.llm_tool_arguments or arguments, TOOL_ARGUMENT_PIECE_CHARS)


def _whole_call(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The streamed entries of one call put together, as a non-streaming message carries it."""
    head = entries[0]
    arguments = "".join(entry["function"]["arguments"] for entry in entries)
    return {"id": head["id"], "type": "function", "function": {"name": head["function"]["name"],
                                                               "arguments": arguments}}


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _refusal(body: Any, settings: LocalCloudSettings) -> ChatRequestError | None:
    """The error this request gets: an injected status first, then OpenAI's validation."""
    if settings.faults.llm_http_status:
        return status_error(settings.faults.llm_http_status)
    return validate_chat_request(body)
