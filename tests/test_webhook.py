"""The voice webhook and the stream's <Connect action>: TwiML, forms, signatures, pure handlers."""

from __future__ import annotations

import urllib.parse
import xml.etree.ElementTree as ET

import httpx
import pytest
import trio

from agentd import twiml
from agentd.config import load_config
from agentd.http1 import Request, read_request, route, write_response
from agentd.security import make_call_token
from agentd.webhook import CallOutcomes, Webhook, WebhookError, parse_form, post_signature, webhook_urls

AUTH_TOKEN = "test-auth-token"
SECRET = "call-token-secret"
PUBLIC = "wss://agent.example.com/media"
VOICE_URL = "https://agent.example.com/twilio/voice"
AFTER_URL = "https://agent.example.com/twilio/after"


@pytest.fixture
def config():
    return load_config(None, env={}).with_overrides(**{
        "server.public_url": PUBLIC, "server.call_token_param": "token",
        "businesses.acme.numbers": ["+15551230000"]})


@pytest.fixture
def hook(config):
    env = {"TWILIO_AUTH_TOKEN": AUTH_TOKEN, "AGENTD_CALL_TOKEN_SECRET": SECRET}
    return Webhook.from_config(config, CallOutcomes(), env=env)


def form(**fields) -> tuple[bytes, list[tuple[str, str]]]:
    pairs = [("AccountSid", "AC1"), ("CallSid", "CA42"), ("From", "+15559870000"), *fields.items()]
    return urllib.parse.urlencode(pairs).encode(), pairs


def signed(url: str, pairs, token: str = AUTH_TOKEN) -> list[tuple[str, str]]:
    return [("content-type", "application/x-www-form-urlencoded"),
            ("x-twilio-signature", post_signature(token, url, pairs))]


def post(headers, body: bytes, path: str = "/twilio/voice") -> Request:
    """A POST as the front door (agentd.http1) hands it to a handler."""
    return Request(method="POST", path=path, query="", headers=tuple(headers), body=body, raw=b"")


def parsed(answer) -> ET.Element:
    assert (answer.status, dict(answer.headers)["content-type"]) == (200, "text/xml; charset=utf-8")
    assert answer.body.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    return ET.fromstring(answer.body)


# --- signatures ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("caller", "expected"), [
    ("+14158675309", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),  # the example in Twilio's request-validation docs
    ("+12349013030", "0/KCTR6DLpKmkAf8muzZqo1nDgQ="),
])
def test_post_signature_matches_published_examples(caller, expected):
    params = {"CallSid": "CA1234567890ABCDE", "Caller": caller, "Digits": "1234", "From": caller,
              "To": "+18005551212"}
    assert post_signature("12345", "https://mycompany.com/myapp.php?foo=1&bar=2", params.items()) == expected


def test_the_signature_sorts_parameters_by_name_whatever_their_order():
    pairs = [("To", "+1"), ("CallSid", "CA1"), ("From", "+2")]
    assert post_signature("t", "https://h/x", pairs) == post_signature("t", "https://h/x", sorted(pairs))


# --- forms --------------------------------------------------------------------------------------

def test_a_form_parses_into_pairs_with_escapes_and_blanks():
    pairs = (("To", "+15551230000"), ("Digits", ""), ("Name", "a b"))
    assert parse_form(b"To=%2B15551230000&Digits=&Name=a+b") == pairs
    assert parse_form(b"") == ()


@pytest.mark.parametrize("body", [b"\xff\xfe=1", b"no-equals-sign", b"a=" + b"x" * 20_000])
def test_a_body_that_is_not_a_small_form_is_refused(body):
    with pytest.raises(WebhookError):
        parse_form(body)


# --- TwiML --------------------------------------------------------------------------------------

def test_connect_stream_escapes_every_value():
    doc = ET.fromstring(twiml.connect_stream('wss://h/m?"x"', "https://h/after", {"business": 'a"<b>&'}))
    param = doc.find("Connect/Stream/Parameter")
    assert doc.find("Connect/Stream").get("url") == 'wss://h/m?"x"' and param.get("value") == 'a"<b>&'


def test_parameters_longer_than_twilio_allows_are_our_bug():
    with pytest.raises(ValueError):
        twiml.connect_stream(PUBLIC, AFTER_URL, {"business": "x" * 501})


def test_dial_and_hangup():
    assert ET.fromstring(twiml.dial("+15555550100")).find("Dial").text == "+15555550100"
    assert ET.fromstring(twiml.hangup()).find("Hangup") is not None


# --- the voice webhook --------------------------------------------------------------------------

def test_urls_come_from_the_public_url(config):
    urls = webhook_urls(config)
    assert (urls.voice, urls.after) == (VOICE_URL, AFTER_URL)
    plain = config.with_overrides(**{"server.public_url": "ws://127.0.0.1:8080/media", "server.voice_path": "/v"})
    assert webhook_urls(plain).voice == "http://127.0.0.1:8080/v"
    assert webhook_urls(config.with_overrides(**{"server.public_url": ""})) is None


def test_a_signed_call_to_a_business_number_connects_to_that_business_with_a_call_token(hook):
    body, pairs = form(To="+15551230000")
    doc = parsed(hook.voice(post(signed(VOICE_URL, pairs), body)))
    connect = doc.find("Connect")
    assert connect.get("action") == AFTER_URL and connect.get("method") == "POST"
    assert connect.find("Stream").get("url") == PUBLIC
    params = {p.get("name"): p.get("value") for p in connect.findall("Stream/Parameter")}
    assert params == {"business": "acme", "token": make_call_token(SECRET, "CA42")}


def test_a_call_to_any_other_number_gets_the_default_business(hook):
    body, pairs = form(To="+15550000000")
    doc = parsed(hook.voice(post(signed(VOICE_URL, pairs), body)))
    assert doc.find("Connect/Stream/Parameter").get("value") == "default"


@pytest.mark.parametrize("headers", [
    [],  # no signature
    "wrong token",
    "other url",
    "twice",
])
def test_a_forged_or_missing_signature_is_refused_with_403(hook, headers):
    body, pairs = form(To="+15551230000")
    if headers == "wrong token":
        headers = signed(VOICE_URL, pairs, token="not-the-token")
    elif headers == "other url":
        headers = signed(AFTER_URL, pairs)
    elif headers == "twice":
        headers = signed(VOICE_URL, pairs) * 2
    answer = hook.voice(post(headers, body))
    assert answer.status == 403 and b"Response" not in answer.body


def test_a_tampered_form_fails_the_signature(hook):
    body, pairs = form(To="+15551230000")
    tampered, _ = form(To="+15550000000")
    assert hook.voice(post(signed(VOICE_URL, pairs), tampered)).status == 403


def test_without_an_auth_token_no_signature_is_needed(config):
    hook = Webhook.from_config(config, CallOutcomes(), env={"AGENTD_CALL_TOKEN_SECRET": SECRET})
    body, _ = form(To="+15551230000")
    assert parsed(hook.voice(post([], body))).find("Connect") is not None


def test_a_malformed_form_is_400_and_no_public_url_is_503(hook, config):
    assert hook.voice(post([], b"\xff")).status == 400
    unset = Webhook.from_config(config.with_overrides(**{"server.public_url": ""}), CallOutcomes(), env={})
    assert unset.voice(post([], form()[0])).status == 503


# --- after the stream ---------------------------------------------------------------------------

def test_after_a_transfer_the_answer_dials_the_number_once(hook):
    hook.outcomes.record_transfer("CA42", "+15555550100")
    body, pairs = form(CallStatus="in-progress")
    doc = parsed(hook.after(post(signed(AFTER_URL, pairs), body)))
    assert doc.find("Dial").text == "+15555550100"
    again = parsed(hook.after(post(signed(AFTER_URL, pairs), body)))
    assert again.find("Hangup") is not None


def test_after_any_other_ending_the_answer_hangs_up(hook):
    body, pairs = form()
    assert parsed(hook.after(post(signed(AFTER_URL, pairs), body))).find("Hangup") is not None
    assert hook.after(post([], body)).status == 403


def test_outcomes_are_bounded_oldest_first():
    outcomes = CallOutcomes(remember=2)
    for sid in ("CA1", "CA2", "CA3"):
        outcomes.record_transfer(sid, "+15555550100")
    assert outcomes.take("CA1") is None and outcomes.take("CA3") == "+15555550100"


# --- over a real socket, through the front door's HTTP piece -----------------------------------

async def serve_routes(nursery, routes) -> int:
    """agentd.http1 on 127.0.0.1, one request per connection answered from `routes`; returns the port."""
    async def connection(stream):
        await write_response(stream, await route(routes, await read_request(stream)))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, connection, listeners)
    return listeners[0].socket.getsockname()[1]


async def test_twilio_posts_to_both_routes_over_a_socket(nursery, hook):
    port = await serve_routes(nursery, hook.routes())
    body, pairs = form(To="+15551230000")
    hook.outcomes.record_transfer("CA42", "+15555550100")
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            voice = await client.post("/twilio/voice", content=body, headers=signed(VOICE_URL, pairs))
            after = await client.post("/twilio/after", content=body, headers=signed(AFTER_URL, pairs))
            forged = await client.post("/twilio/after", content=body, headers=signed(VOICE_URL, pairs))
            wrong_method = await client.get("/twilio/voice")
    assert voice.status_code == 200 and voice.headers["content-type"] == "text/xml; charset=utf-8"
    assert ET.fromstring(voice.content).find("Connect/Stream").get("url") == PUBLIC
    assert ET.fromstring(after.content).find("Dial").text == "+15555550100"
    assert forged.status_code == 403 and wrong_method.status_code == 405


def test_form_values_cannot_forge_a_log_line(hook, caplog):
    """A signed form is still the peer's words: a CallSid or To carrying a newline and a fake line
    is escaped in agentd's own line, never written raw."""
    body, pairs = form(CallSid="CA1\nERROR forged line", To="+1\x1b[31m555")
    with caplog.at_level("INFO", logger="agentd.webhook"):
        hook.voice(post(signed(VOICE_URL, pairs), body))
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "voice webhook" in text
    assert "\nERROR forged line" not in text and "\x1b" not in text
    assert "invalid:" in text
