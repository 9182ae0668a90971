"""OpenAIChat against httpx.MockTransport: what it sends, what it yields, how it fails.

The mock server streams its body in small pieces (split mid-line) from an
async byte stream, so the SSE framing is exercised as on a real socket.
Timeouts run on Trio's MockClock (`autojump_clock`): no real time passes.
"""

import dataclasses
import json
import types

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from agentd import metrics

from agentd.codecs.sse import LlmStreamError
from agentd.errors import UpstreamUnavailable
from agentd.adapters.llm_openai import ChatModel, ChatSettings, OpenAIChat, build_messages
from shipped import SHIPPED

GUARD_S = 60.0  # far beyond any timeout under test
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def chunk(text: str | None = None, *, role: str | None = None, finish: str | None = None) -> bytes:
    """One `data:` event carrying a chat.completion.chunk."""
    delta = {k: v for k, v in (("role", role), ("content", text)) if v is not None}
    body = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


class Body(httpx.AsyncByteStream):
    """A response body served in `piece`-byte slices, with a checkpoint between slices.

    `then` runs after the last byte (e.g. trio.sleep_forever to stall); the
    flags let tests see whether the client read to the end and closed.
    """

    def __init__(self, data: bytes, *, piece: int = 7, then=None) -> None:
        self.data, self.piece, self.then = data, piece, then
        self.pieces_read = 0
        self.exhausted = False
        self.closed = False

    async def __aiter__(self):
        for start in range(0, len(self.data), self.piece):
            await trio.lowlevel.checkpoint()
            self.pieces_read += 1
            yield self.data[start : start + self.piece]
        if self.then is not None:
            await self.then()
        self.exhausted = True

    async def aclose(self) -> None:
        self.closed = True


class Server:
    """A MockTransport handler that records requests and answers with one canned response."""

    def __init__(self, body: Body | None = None, *, status: int = 200, before=None, error=None) -> None:
        self.body = body if body is not None else Body(chunk("ok") + DONE)
        self.status, self.before, self.error = status, before, error
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.before is not None:
            await self.before()
        if self.error is not None:
            raise self.error
        return httpx.Response(self.status, headers={"content-type": "text/event-stream"}, stream=self.body)

    def sent_json(self) -> dict:
        return json.loads(self.requests[-1].content)


def make_chat(server: Server, api_key: str | None = "sk-test", **overrides) -> OpenAIChat:
    settings = dataclasses.replace(ChatSettings.from_config(SHIPPED),
                                   **{"base_url": "http://llm.test/v1/", "model": "gpt-test", **overrides})
    client = httpx.AsyncClient(transport=httpx.MockTransport(server))
    return OpenAIChat(client, settings, api_key)


async def collect(chat: ChatModel, sink: list[str] | None = None) -> list[str]:
    """Every delta of one reply; also appended to `sink` as they come, for tests that expect an error.

    Guarded on Trio's clock, so a broken timeout fails the test instead of hanging it.
    """
    got = [] if sink is None else sink
    with trio.fail_after(GUARD_S):
        async with chat.stream(MESSAGES) as deltas:
            async for text in deltas:
                got.append(text)
    return got


# --- the request ---------------------------------------------------------------------------


async def test_posts_a_streamed_chat_request_with_the_default_token_limit_name():
    server = Server()
    await collect(make_chat(server))
    request = server.requests[0]
    assert request.method == "POST"
    assert str(request.url) == "http://llm.test/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["accept"] == "text/event-stream"
    assert request.headers["content-type"] == "application/json"
    assert server.sent_json() == {"model": "gpt-test", "messages": MESSAGES, "stream": True,
                                  "max_completion_tokens": 150, "stream_options": {"include_usage": True}}


async def test_token_usage_reported_at_the_end_of_the_stream_is_kept_and_counted():
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}\n\n'
    before = tokens_counted()
    async with make_chat(Server(Body(chunk("Hi") + usage + DONE))).stream(MESSAGES) as deltas:
        assert [text async for text in deltas] == ["Hi"]
    assert deltas.usage == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    after = tokens_counted()
    assert (after["prompt"] - before["prompt"], after["completion"] - before["completion"]) == (9, 3)


def tokens_counted() -> dict[str, float]:
    """agentd_llm_tokens_total by kind, as /metrics shows it."""
    idle = types.SimpleNamespace(active_calls=0, draining=False, refused={})
    family = next(f for f in text_string_to_metric_families(metrics.Metrics(idle).render().decode())
                  if f.name == "agentd_llm_tokens")
    return {s.labels["kind"]: s.value for s in family.samples if s.name == "agentd_llm_tokens_total"}


async def test_usage_can_be_left_out_for_servers_that_refuse_stream_options():
    server = Server()
    await collect(make_chat(server, stream_usage=False))
    assert "stream_options" not in server.sent_json()


async def test_token_limit_name_and_temperature_are_configurable_and_no_key_means_no_auth():
    server = Server()
    await collect(make_chat(server, api_key=None, max_tokens_param="max_tokens", max_tokens=42, temperature=0.3))
    body = server.sent_json()
    assert body["max_tokens"] == 42
    assert "max_completion_tokens" not in body
    assert body["temperature"] == 0.3
    assert "authorization" not in server.requests[0].headers


# --- the happy stream -------------------------------------------------------------------------


@pytest.mark.parametrize("piece", [1, 5, 7, 64, 100_000])
async def test_yields_the_text_deltas_in_order_however_the_body_is_split(piece):
    stream = (KEEPALIVE + chunk(role="assistant") + chunk("Hello") + KEEPALIVE + chunk(", world")
              + chunk("") + chunk("!", finish="stop") + DONE)
    assert await collect(make_chat(Server(Body(stream, piece=piece)))) == ["Hello", ", world", "!"]


async def test_handles_crlf_line_ends_and_multi_line_data():
    stream = (b'data: {"choices": [{"delta":\r\ndata: {"content": "Shalom"}}]}\r\n\r\n'
              b"data: [DONE]\r\n\r\n")
    assert await collect(make_chat(Server(Body(stream)))) == ["Shalom"]


async def test_ends_at_done_without_waiting_for_anything_after_it(autojump_clock):
    # A server that keeps the body open after [DONE]: the reply still ends, promptly.
    body = Body(chunk("a") + DONE, then=trio.sleep_forever)
    start = trio.current_time()
    assert await collect(make_chat(Server(body))) == ["a"]
    assert trio.current_time() - start < 1.0
    assert body.closed


async def test_reads_the_body_to_its_end_after_done_so_the_connection_can_be_reused():
    body = Body(chunk("a") + DONE + b"\n" * 40, piece=8)
    await collect(make_chat(Server(body)))
    assert body.exhausted and body.closed


# --- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 429, 401])
async def test_http_error_status_raises_upstream_unavailable_naming_status_and_body(status):
    server = Server(Body(b'{"error": {"message": "slow down"}}', piece=1000), status=status)
    with pytest.raises(UpstreamUnavailable, match=rf"HTTP {status}.*slow down"):
        await collect(make_chat(server))
    assert server.body.closed


async def test_only_the_start_of_a_huge_error_body_is_read():
    body = Body(b"x" * 100_000, piece=1024)
    with pytest.raises(UpstreamUnavailable, match="HTTP 503") as info:
        await collect(make_chat(Server(body, status=503)))
    assert body.pieces_read <= 3
    assert len(str(info.value)) < 500


async def test_in_band_error_after_some_text_raises_after_that_text():
    stream = chunk("Let me") + b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'
    got: list[str] = []
    with pytest.raises(LlmStreamError, match="overloaded") as info:
        await collect(make_chat(Server(Body(stream))), got)
    assert got == ["Let me"]
    assert isinstance(info.value, UpstreamUnavailable)


async def test_stream_cut_before_done_yields_what_came_then_raises():
    body = Body(chunk("Half") + chunk(" a rep") + b'data: {"choi')
    got: list[str] = []
    with pytest.raises(UpstreamUnavailable, match=r"stream cut before \[DONE\]"):
        await collect(make_chat(Server(body)), got)
    assert got == ["Half", " a rep"]
    assert body.closed


async def test_done_without_its_final_blank_line_still_ends_the_reply():
    assert await collect(make_chat(Server(Body(chunk("ok") + b"data: [DONE]")))) == ["ok"]


async def test_a_complete_event_then_end_of_body_without_done_is_still_a_cut():
    got: list[str] = []
    with pytest.raises(UpstreamUnavailable, match="stream cut"):
        await collect(make_chat(Server(Body(chunk("a") + chunk("b")[:-2]))), got)
    assert got == ["a"]


async def test_transport_error_mid_stream_is_translated():
    async def reset():
        raise httpx.ReadError("connection reset")

    got: list[str] = []
    with pytest.raises(UpstreamUnavailable, match="connection reset") as info:
        await collect(make_chat(Server(Body(chunk("Hel"), then=reset))), got)
    assert got == ["Hel"]
    assert isinstance(info.value.__cause__, httpx.ReadError)


async def test_connect_error_is_translated_with_its_cause():
    server = Server(error=httpx.ConnectError("connection refused"))
    with pytest.raises(UpstreamUnavailable, match="connection refused") as info:
        await collect(make_chat(server))
    assert isinstance(info.value.__cause__, httpx.ConnectError)


async def test_iterator_stays_ended_after_an_error():
    chat = make_chat(Server(Body(chunk("x"))))
    async with chat.stream(MESSAGES) as deltas:
        assert await anext(deltas) == "x"
        with pytest.raises(UpstreamUnavailable):
            await anext(deltas)
        with pytest.raises(StopAsyncIteration):
            await anext(deltas)


# --- timeouts (Trio's MockClock) -------------------------------------------------------------------


async def test_no_first_token_in_time_raises_at_the_first_token_deadline(autojump_clock):
    body = Body(KEEPALIVE + chunk(role="assistant"), then=trio.sleep_forever)
    start = trio.current_time()
    with pytest.raises(UpstreamUnavailable, match="no first token within 4s"):
        await collect(make_chat(Server(body)))
    assert trio.current_time() - start == pytest.approx(4.0)
    assert body.closed


async def test_keepalives_do_not_extend_the_first_token_deadline(autojump_clock):
    class KeepAliveBody(Body):
        async def __aiter__(self):
            while True:
                await trio.sleep(1.0)
                yield KEEPALIVE

    start = trio.current_time()
    with pytest.raises(UpstreamUnavailable, match="no first token"):
        await collect(make_chat(Server(KeepAliveBody(b""))))
    assert trio.current_time() - start == pytest.approx(4.0)


async def test_headers_that_never_come_time_out_on_entry(autojump_clock):
    start = trio.current_time()
    with pytest.raises(UpstreamUnavailable, match="no first token within 2.5s"):
        await collect(make_chat(Server(before=trio.sleep_forever), first_token_timeout_s=2.5))
    assert trio.current_time() - start == pytest.approx(2.5)


async def test_a_stall_after_the_first_token_times_out_on_the_request_budget(autojump_clock):
    async def slow_then_stall():
        await trio.sleep(3.0)
        await trio.sleep_forever()

    got: list[str] = []
    start = trio.current_time()
    with pytest.raises(UpstreamUnavailable, match="after 10s of waiting"):
        await collect(make_chat(Server(Body(chunk("Hi"), then=slow_then_stall))), got)
    assert got == ["Hi"]
    assert trio.current_time() - start == pytest.approx(10.0)


async def test_waits_add_up_so_a_server_trickling_keepalives_still_times_out(autojump_clock):
    class TrickleBody(Body):
        async def __aiter__(self):
            yield chunk("Hi")
            while True:
                await trio.sleep(3.0)
                yield KEEPALIVE

    got: list[str] = []
    start = trio.current_time()
    with pytest.raises(UpstreamUnavailable, match="after 10s of waiting"):
        await collect(make_chat(Server(TrickleBody(b""))), got)
    assert got == ["Hi"]
    assert trio.current_time() - start == pytest.approx(10.0)


async def test_time_the_caller_spends_between_deltas_does_not_count(autojump_clock):
    chat = make_chat(Server(Body(chunk("One.") + chunk(" Two.") + chunk(" Three.") + DONE)), timeout_s=1.0)
    got = []
    with trio.fail_after(GUARD_S):
        async with chat.stream(MESSAGES) as deltas:
            async for text in deltas:
                got.append(text)
                await trio.sleep(5.0)  # speaking the sentence takes far longer than timeout_s
    assert got == ["One.", " Two.", " Three."]


async def test_cancelling_the_consumer_propagates_and_closes_the_response(autojump_clock):
    body = Body(chunk("Hello"), then=trio.sleep_forever)
    chat = make_chat(Server(body))
    with trio.move_on_after(1.0) as scope:  # a barge-in, 1 s into the reply
        await collect(chat)
    assert scope.cancelled_caught
    assert body.closed


# --- messages ----------------------------------------------------------------------------------------------


def test_build_messages_puts_system_then_history_then_the_new_turn():
    history = [("user", "What time do you open?"), ("assistant", "At nine.")]
    assert build_messages("You are Dana.", history, "And close?") == [
        {"role": "system", "content": "You are Dana."},
        {"role": "user", "content": "What time do you open?"},
        {"role": "assistant", "content": "At nine."},
        {"role": "user", "content": "And close?"},
    ]


def test_build_messages_leaves_out_an_empty_system_prompt():
    assert build_messages("", [], "Hi") == [{"role": "user", "content": "Hi"}]


def test_build_messages_rejects_a_role_that_is_not_user_or_assistant():
    with pytest.raises(ValueError, match="'system'"):
        build_messages("sys", [("system", "sneaky")], "Hi")
