"""localcloud's OpenAI-compatible chat API over real HTTP on 127.0.0.1, with plain httpx."""

from __future__ import annotations

import json
import socket

import h11
import httpx
import pytest

from agentd.config import Business, Rule, load_config
from agentd.testbed.localcloud import LocalCloud, LocalCloudSettings, settings_from_config
from agentd.testbed.localcloud.chat import NO_BUSINESS_REPLY

PLUMBER = Business(
    name="plumber",
    language="en-US",
    voice="en-US-Standard-C",
    greeting="Hi.",
    system_prompt="You are a plumber's phone assistant.",
    rules=(
        Rule(keywords=("open", "hours"), reply="We open at eight tomorrow."),
        Rule(keywords=("price", "open late"), reply="A visit costs eighty dollars."),
    ),
    fallback_reply="Sorry, could you say that again?",
)


@pytest.fixture
def cloud():
    with LocalCloud(LocalCloudSettings(businesses={"plumber": PLUMBER})) as lc:
        yield lc


@pytest.fixture
def client(cloud):
    with httpx.Client(base_url=cloud.http_base_url, timeout=10) as c:
        yield c


def chat_body(user_text: str, *, system: str = PLUMBER.system_prompt, stream: bool = True, **extra) -> dict:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user_text}]
    return {"model": "gpt-4o-mini", "messages": messages, "stream": stream, **extra}


def sse_lines(client: httpx.Client, body: dict) -> tuple[httpx.Response, list[str]]:
    """POST a streaming chat request; returns the response and its non-empty body lines."""
    with client.stream("POST", "/chat/completions", json=body) as response:
        return response, [line for line in response.iter_lines() if line]


def data_events(lines: list[str]) -> list[dict | str]:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]


def streamed_text(events) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if isinstance(e, dict) and e["choices"])


def reply_to(client: httpx.Client, user_text: str, **body) -> str:
    response = client.post("/chat/completions", json=chat_body(user_text, stream=False, **body))
    return response.json()["choices"][0]["message"]["content"]


# --- streaming shape ---------------------------------------------------------------------------------


def test_stream_is_openai_shaped_sse(client):
    response, lines = sse_lines(client, chat_body("Are you open tomorrow?"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[0] == ": ping"
    events = data_events(lines)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["model"] == "gpt-4o-mini" and isinstance(c["created"], int) for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert streamed_text(chunks) == "We open at eight tomorrow."


def test_stream_sends_one_word_per_chunk(client):
    _, lines = sse_lines(client, chat_body("open?"))
    contents = [e["choices"][0]["delta"].get("content") for e in data_events(lines)[1:-2]]
    assert contents == ["We ", "open ", "at ", "eight ", "tomorrow."]


def test_usage_chunk_when_asked(client):
    _, lines = sse_lines(client, chat_body("open?", stream_options={"include_usage": True}))
    usage_chunk = data_events(lines)[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5


def test_non_streaming_completion(client):
    response = client.post("/chat/completions", json=chat_body("what are your hours", stream=False))
    completion = response.json()
    assert response.status_code == 200 and completion["object"] == "chat.completion"
    message = completion["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "We open at eight tomorrow.", "refusal": None}
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"]["completion_tokens"] == 5


def test_max_tokens_truncates_with_finish_reason_length(client):
    for limit_name in ("max_tokens", "max_completion_tokens"):
        response = client.post("/chat/completions", json=chat_body("open", stream=False, **{limit_name: 2}))
        choice = response.json()["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == ("We open ", "length")


def test_latency_settings_do_not_change_the_answer(cloud, client):
    cloud.configure(llm_ttft_ms=20, llm_tokens_per_s=500)
    _, lines = sse_lines(client, chat_body("open"))
    assert streamed_text(data_events(lines)) == "We open at eight tomorrow."


# --- the rules engine ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user_text", "reply"),
    [
        ("ARE YOU OPEN", "We open at eight tomorrow."),  # any case
        ("what's the price", "A visit costs eighty dollars."),
        ("are you open late", "We open at eight tomorrow."),  # first rule in order wins
        ("who is the opener", "Sorry, could you say that again?"),  # whole words only
        ("hello", "Sorry, could you say that again?"),  # fallback
    ],
)
def test_rules_pick_the_first_matching_rule(client, user_text, reply):
    assert reply_to(client, user_text) == reply


def test_only_the_last_user_message_counts(client):
    body = chat_body("thanks", stream=False)
    body["messages"][1:1] = [{"role": "user", "content": "price?"}, {"role": "assistant", "content": "80."}]
    response = client.post("/chat/completions", json=body)
    assert response.json()["choices"][0]["message"]["content"] == "Sorry, could you say that again?"


def test_unknown_system_prompt_gets_the_default_apology(client):
    assert reply_to(client, "open?", system="You are someone else.") == NO_BUSINESS_REPLY


def test_businesses_from_the_agentd_config_answer_in_hebrew():
    config = load_config(None)
    default = config.business(None)
    with LocalCloud(settings_from_config(config)) as lc, httpx.Client(base_url=lc.http_base_url) as c:
        answer = reply_to(c, "מה השעות שלכם?", system=default.system_prompt)
    assert answer == default.rules[0].reply


def test_content_parts_are_read_as_text(client):
    body = chat_body("", stream=False)
    body["messages"][1]["content"] = [{"type": "text", "text": "your hours?"}]
    assert client.post("/chat/completions", json=body).json()["choices"][0]["message"]["content"].startswith("We open")


def test_the_last_request_body_is_recorded(cloud, client):
    body = chat_body("open?")
    sse_lines(client, body)
    sse_lines(client, body)
    stats = cloud.stats()
    assert stats["chat_calls"] == 2 and stats["last_chat_request"] == body


def test_stats_count_prompt_and_sent_tokens_and_are_served_over_http(cloud, client):
    body = chat_body("open?")
    _, lines = sse_lines(client, body)
    sent = len(streamed_text(data_events(lines)).split())
    prompt = sum(len(m["content"].split()) for m in body["messages"])
    stats = httpx.get(cloud.http_base_url.removesuffix("/v1") + "/localcloud/stats").json()
    assert (stats["chat_calls"], stats["chat_prompt_tokens"], stats["chat_tokens_sent"]) == (1, prompt, sent)


def test_a_client_that_hangs_up_early_stops_the_sent_token_count(cloud, client):
    cloud.configure(llm_tokens_per_s=5.0)  # 200 ms between tokens: the hang-up comes long before the last
    with client.stream("POST", "/chat/completions", json=chat_body("open?")) as response:
        assert any('"content": "We' in line for line in response.iter_lines())  # the first word, then hang up
    cloud.stop()  # waits for every connection to end: the count is settled now
    assert 1 <= cloud.stats()["chat_tokens_sent"] < len(PLUMBER.rules[0].reply.split())


# --- validation, routes, connections -----------------------------------------------------------------


def test_missing_messages_is_a_400_like_openai(client):
    response = client.post("/chat/completions", json={"model": "gpt-4o-mini"})
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": "Missing required parameter: 'messages'.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "missing_required_parameter",
        }
    }


def test_bad_json_is_a_400(client):
    response = client.post("/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_models_lists_one_model(client):
    models = client.get("/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"


def test_unknown_path_is_a_404_with_an_openai_error(client):
    response = client.get("/embeddings")
    assert response.status_code == 404 and "error" in response.json()


def test_connection_is_kept_alive_between_requests(cloud):
    host, port = httpx.URL(cloud.http_base_url).host, httpx.URL(cloud.http_base_url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        http = h11.Connection(h11.CLIENT)
        for _ in range(2):
            answer = _exchange(sock, http, json.dumps(chat_body("open", stream=False)).encode())
            assert json.loads(answer)["choices"][0]["message"]["content"] == "We open at eight tomorrow."
            http.start_next_cycle()


def _exchange(sock: socket.socket, http: h11.Connection, body: bytes) -> bytes:
    """One request/response on an open socket, framed by h11 as a client."""
    headers = [("host", "localcloud"), ("content-type", "application/json"), ("content-length", str(len(body)))]
    sock.sendall(http.send(h11.Request(method="POST", target="/v1/chat/completions", headers=headers)))
    sock.sendall(http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage()))
    received = b""
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            http.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Data):
            received += event.data
        elif isinstance(event, h11.EndOfMessage):
            return received


# --- faults ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind"), [(429, "requests"), (500, "server_error")])
def test_http_status_fault(cloud, client, status, kind):
    cloud.set_faults(llm_http_status=status)
    response, lines = sse_lines(client, chat_body("open"))
    assert response.status_code == status
    assert json.loads("".join(lines))["error"]["type"] == kind


def test_inband_error_fault_sends_an_error_event_after_the_first_token(cloud, client):
    cloud.set_faults(llm_inband_error=True)
    response, lines = sse_lines(client, chat_body("open"))
    events = data_events(lines)
    assert response.status_code == 200
    assert streamed_text(events[:-1]) == "We "
    assert events[-1]["error"]["type"] == "server_error"
    assert "[DONE]" not in events


def test_cut_fault_drops_the_connection_mid_stream(cloud, client):
    cloud.set_faults(llm_cut_after_tokens=2)
    received = []
    with pytest.raises(httpx.RemoteProtocolError):
        with client.stream("POST", "/chat/completions", json=chat_body("open")) as response:
            received.extend(line for line in response.iter_lines() if line)
    assert streamed_text(data_events(received)) == "We open "
    assert "data: [DONE]" not in received


def test_stall_fault_sends_headers_and_ping_but_no_token(cloud, cloud_url_client_short_timeout):
    cloud.set_faults(llm_stall_first_token=True)
    received = []
    with pytest.raises(httpx.ReadTimeout):
        with cloud_url_client_short_timeout.stream("POST", "/chat/completions", json=chat_body("open")) as response:
            assert response.status_code == 200
            received.extend(line for line in response.iter_lines() if line)
    assert received == [": ping"]


@pytest.fixture
def cloud_url_client_short_timeout(cloud):
    with httpx.Client(base_url=cloud.http_base_url, timeout=httpx.Timeout(10, read=0.5)) as c:
        yield c


def test_server_recovers_after_faults_are_cleared(cloud, client):
    cloud.set_faults(llm_cut_after_tokens=0)
    with pytest.raises(httpx.RemoteProtocolError):
        sse_lines(client, chat_body("open"))
    cloud.clear_faults()
    assert streamed_text(data_events(sse_lines(client, chat_body("open"))[1])) == "We open at eight tomorrow."
