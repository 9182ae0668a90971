"""Who may open a call, and for how long: signature, per-call token, limits.

The pure checks (agentd.security) are tested directly; admission and limits
are tested over real sockets against `agentd serve` backed by localcloud, as
in test_whole_call.py. Raw WebSockets play a misbehaving peer; the softphone
plays Twilio where a whole call is needed. Assertions are about what each peer
sees (status codes, close codes, audio heard) and what is logged, never about
how long anything took.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging

import pytest
import trio
import trio_websocket
from agent_harness import acme_config, call_record, serving

from agentd.testbed import softphone
from agentd.codecs import twilio
from agentd.config import load_config
from agentd.errors import CallProtocolError, ConfigError
from agentd.testbed.localcloud import LocalCloud, settings_from_config
from agentd.security import (
    CallTokenCheck, CallTokenError, Gatekeeper, SignatureCheck, UpgradeRefused, make_call_token,
    twilio_signature,
)
from agentd.server import serve
from agentd.testbed.softphone import place_call

AUTH_TOKEN = "test-auth-token-0123456789abcdef"
CALL_SECRET = "test-call-token-secret"
PUBLIC_URL = "wss://agent.example.com/media"
TOKEN_ENV = "AGENTD_TEST_TWILIO_AUTH_TOKEN"
SECRET_ENV = "AGENTD_TEST_CALL_TOKEN_SECRET"
TOKEN_PARAM = "agentd_token"


def sid(name: str) -> str:
    """A CallSid in Twilio's format (CA + 32 hex), distinct per name."""
    return "CA" + hashlib.md5(name.encode()).hexdigest()


def start_message(call_sid: str, parameters: dict[str, str] | None = None) -> twilio.Start:
    message = twilio.render_start(stream_sid="MZ" + call_sid[2:], call_sid=call_sid, account_sid="AC1",
                                  custom_parameters=parameters or {})
    event = twilio.parse_inbound(message)
    assert isinstance(event, twilio.Start)
    return event


# --- the signature, pure --------------------------------------------------------------------------

def test_signature_is_base64_hmac_sha1_of_the_url():
    # Computed independently: printf URL | openssl dgst -sha1 -hmac 12345 -binary | base64
    assert twilio_signature("12345", PUBLIC_URL) == "TCuyLsF3K3bRblNbw7eu4s9Zuks="


def test_signature_check_accepts_only_one_exact_signature():
    check = SignatureCheck.for_url(AUTH_TOKEN, PUBLIC_URL)
    good = twilio_signature(AUTH_TOKEN, PUBLIC_URL)
    check.verify([("host", "x"), ("x-twilio-signature", good)])
    check.verify([("X-Twilio-Signature", good)])  # header names are case-insensitive
    refusals = {
        "missing": [],
        "does not match": [("x-twilio-signature", twilio_signature("other-token", PUBLIC_URL))],
        "sent 2 times": [("x-twilio-signature", good)] * 2,
        "non-ASCII": [("x-twilio-signature", "é" * 28)],
    }
    for reason, headers in refusals.items():
        with pytest.raises(UpgradeRefused, match="does not match" if reason == "non-ASCII" else reason) as refused:
            check.verify(headers)
        assert AUTH_TOKEN not in str(refused.value) and good not in str(refused.value)
    assert AUTH_TOKEN not in repr(check) and good not in repr(check)


def test_the_signature_covers_the_query_string_as_twilio_signs_it():
    check = SignatureCheck.for_url(AUTH_TOKEN, PUBLIC_URL)
    bare = twilio_signature(AUTH_TOKEN, PUBLIC_URL)
    with pytest.raises(UpgradeRefused, match="does not match"):
        check.verify([("x-twilio-signature", bare)], query="x=1")  # the captured value, a query added
    check.verify([("x-twilio-signature", twilio_signature(AUTH_TOKEN, PUBLIC_URL + "?x=1"))], query="x=1")


# --- the per-call token, pure ---------------------------------------------------------------------

def test_call_token_is_hex_hmac_sha256_of_the_call_sid():
    # Computed independently: printf CA0123... | openssl dgst -sha256 -hmac hush
    sid = "CA0123456789abcdef0123456789abcdef"
    assert make_call_token("hush", sid) == "2a9085cc286f0209ab5fd415ba6805231723ad6b9f6c8a09aff9afddbf1071ad"


def test_call_token_valid_once_per_call_sid():
    check = CallTokenCheck(param=TOKEN_PARAM, secret=CALL_SECRET)
    token = make_call_token(CALL_SECRET, sid("one"))
    check.check(start_message(sid("one"), {TOKEN_PARAM: token}))
    with pytest.raises(CallTokenError, match="already used"):
        check.check(start_message(sid("one"), {TOKEN_PARAM: token}))
    check.check(start_message(sid("two"), {TOKEN_PARAM: make_call_token(CALL_SECRET, sid("two")).upper()}))


@pytest.mark.parametrize(("parameters", "reason"), [
    ({}, "missing"),
    ({TOKEN_PARAM: ""}, "missing"),
    ({TOKEN_PARAM: make_call_token(CALL_SECRET, sid("other"))}, "invalid"),  # another call's token
    ({TOKEN_PARAM: make_call_token("wrong secret", sid("me"))}, "invalid"),
    ({TOKEN_PARAM: "é" * 64}, "invalid"),  # non-ASCII: refused, not a TypeError from compare_digest
    ({"token": make_call_token(CALL_SECRET, sid("me"))}, "missing"),  # under another name
])
def test_call_token_refusals_name_the_parameter(parameters, reason):
    check = CallTokenCheck(param=TOKEN_PARAM, secret=CALL_SECRET)
    with pytest.raises(CallTokenError, match=reason) as refused:
        check.check(start_message(sid("me"), parameters))
    assert isinstance(refused.value, CallProtocolError), "a protocol error: the call closes with 1008"
    assert str(refused.value).startswith(f"start.customParameters.{TOKEN_PARAM}:")
    assert CALL_SECRET not in str(refused.value)


def test_call_token_memory_is_bounded_and_forgets_the_oldest():
    check = CallTokenCheck(param=TOKEN_PARAM, secret=CALL_SECRET, remember=2)

    def use(sid: str) -> None:
        check.check(start_message(sid, {TOKEN_PARAM: make_call_token(CALL_SECRET, sid)}))

    for name in ("1", "2", "3"):
        use(sid(name))
    with pytest.raises(CallTokenError):
        use(sid("3"))
    with pytest.raises(CallTokenError):
        use(sid("2"))
    use(sid("1"))  # forgotten: the documented price of bounded memory
    assert "remembered=2/2" in repr(check) and CALL_SECRET not in repr(check)


# --- startup: which checks run, fail closed -------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    return load_config(None)


def test_no_checks_configured_lets_calls_in_with_a_warning(shipped, caplog):
    gate = Gatekeeper.from_config(shipped, env={})
    assert gate.signature is None and gate.call_token is None
    assert "validation off" in caplog.text
    gate.verify_upgrade([])
    gate.check_start(start_message(sid("any")))


def test_public_url_without_auth_token_refuses_to_start(shipped):
    config = shipped.with_overrides(**{"server.public_url": PUBLIC_URL, "server.auth_token_env": TOKEN_ENV})
    for env in ({}, {TOKEN_ENV: ""}):
        with pytest.raises(ConfigError, match=f"server.auth_token_env \\({TOKEN_ENV}\\)"):
            Gatekeeper.from_config(config, env=env)
    gate = Gatekeeper.from_config(config, env={TOKEN_ENV: AUTH_TOKEN})
    assert gate.signature is not None and gate.signature.public_url == PUBLIC_URL


def test_call_token_param_without_secret_refuses_to_start(shipped):
    config = shipped.with_overrides(**{"server.call_token_param": TOKEN_PARAM,
                                       "server.call_token_secret_env": SECRET_ENV})
    with pytest.raises(ConfigError, match=f"server.call_token_secret_env \\({SECRET_ENV}\\)"):
        Gatekeeper.from_config(config, env={})
    assert Gatekeeper.from_config(config, env={SECRET_ENV: CALL_SECRET}).call_token is not None


def test_auth_token_without_public_url_warns_that_nothing_is_checked(shipped, caplog):
    config = shipped.with_overrides(**{"server.auth_token_env": TOKEN_ENV})
    assert Gatekeeper.from_config(config, env={TOKEN_ENV: AUTH_TOKEN}).signature is None
    assert "NOT checked" in caplog.text and AUTH_TOKEN not in caplog.text


async def test_serve_refuses_to_start_before_opening_anything(shipped, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    config = shipped.with_overrides(**{"server.public_url": PUBLIC_URL, "server.auth_token_env": TOKEN_ENV,
                                       "server.port": 0, "server.host": "127.0.0.1"})
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        await serve(config)


# --- over real sockets ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cloud():
    base = load_config(None).with_overrides(**{"businesses.acme.greeting": "Acme Plumbing, hello."})
    with LocalCloud(settings_from_config(base, stt_engine="script", script_lines=("hello",))) as lc:
        yield lc


@pytest.fixture
def agent_config(cloud, monkeypatch, tmp_path):
    """`agent_config(**overrides)`: the shipped config on localcloud; the test secrets are in the env."""
    monkeypatch.setenv(TOKEN_ENV, AUTH_TOKEN)
    monkeypatch.setenv(SECRET_ENV, CALL_SECRET)
    config = acme_config(cloud, str(tmp_path / "telemetry"), **{
        "server.auth_token_env": TOKEN_ENV, "server.call_token_secret_env": SECRET_ENV})
    return lambda **overrides: config.with_overrides(**overrides)


@contextlib.asynccontextmanager
async def running_agent(config, records: list[dict] | None = None):
    """Serve `config` for the block; yields the URL to dial. Turn and call records go to `records`."""
    async with serving(config, records) as server:
        yield f"ws://127.0.0.1:{server.port}{config.server.path}"


@contextlib.asynccontextmanager
async def raw_stream(url: str, call_sid: str, parameters: dict[str, str] | None = None,
                     headers: dict[str, str] | None = None):
    """A WebSocket that has sent `connected` and `start`, as Twilio would, and nothing since."""
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    async with trio_websocket.open_websocket_url(url, extra_headers=extra) as ws:
        await ws.send_message(twilio.render_connected())
        await ws.send_message(twilio.render_start(stream_sid="MZ" + call_sid[2:], call_sid=call_sid,
                                                  account_sid="AC1", custom_parameters=parameters or {}))
        yield ws


async def agent_speaks(ws: trio_websocket.WebSocketConnection) -> bool:
    """True if the agent's first message is audio (the call was admitted and greeted)."""
    first = twilio.parse_outbound(await ws.get_message())
    return isinstance(first, twilio.OutboundMedia)


async def agent_closes(ws: trio_websocket.WebSocketConnection) -> trio_websocket.CloseReason:
    """Read until the agent closes the socket; its close reason."""
    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
        while True:
            await ws.get_message()
    return closed.value.reason


async def upgrade_status(url: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status the agent answers an upgrade with (101 when accepted)."""
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    try:
        async with trio_websocket.open_websocket_url(url, extra_headers=extra):
            return 101
    except trio_websocket.ConnectionRejected as exc:
        return exc.status_code


async def test_a_call_signed_as_twilio_signs_it_is_answered(agent_config):
    config = agent_config(**{"server.public_url": PUBLIC_URL})
    async with running_agent(config) as url:
        # Twilio signs the URL in the TwiML (behind the proxy), not the one this socket reached.
        report = await place_call(url, [], extra_headers={
            "X-Twilio-Signature": softphone.twilio_signature(AUTH_TOKEN, PUBLIC_URL)})
    assert report.ended_by == "softphone", report.close_detail
    assert report.greeting.audio_ms > 0, "the greeting was heard"


async def test_an_upgrade_without_a_valid_signature_gets_403(agent_config, caplog):
    caplog.set_level(logging.INFO)
    config = agent_config(**{"server.public_url": PUBLIC_URL})
    forged = {
        "missing": {},
        "wrong auth token": {"x-twilio-signature": twilio_signature("not-the-token", PUBLIC_URL)},
        "signed for the URL dialled, not the public one": None,  # filled in below, once the port is known
        "garbage": {"x-twilio-signature": "%%%"},
    }
    async with running_agent(config) as url:
        forged["signed for the URL dialled, not the public one"] = {
            "x-twilio-signature": twilio_signature(AUTH_TOKEN, url)}
        statuses = {case: await upgrade_status(url, headers) for case, headers in forged.items()}
        good = await upgrade_status(url, {"x-twilio-signature": twilio_signature(AUTH_TOKEN, PUBLIC_URL)})
    assert statuses == dict.fromkeys(forged, 403)
    assert good == 101, "the check refuses only what it should"
    refusals = [r.getMessage() for r in caplog.records if ": signature: " in r.getMessage()]
    assert len(refusals) == len(forged) and all("x-twilio-signature" in line for line in refusals)
    signatures = [h["x-twilio-signature"] for h in forged.values() if h]
    assert AUTH_TOKEN not in caplog.text
    assert not any(sig in caplog.text for sig in signatures), "signatures are never logged"


async def test_per_call_token_admits_once_and_refuses_wrong_or_reused(agent_config, caplog):
    caplog.set_level(logging.INFO)
    config = agent_config(**{"server.call_token_param": TOKEN_PARAM})
    token = make_call_token(CALL_SECRET, sid("good"))
    async with running_agent(config) as url:
        async with raw_stream(url, sid("good"), {TOKEN_PARAM: token}) as ws:
            admitted = await agent_speaks(ws)
        async with raw_stream(url, sid("good"), {TOKEN_PARAM: token}) as ws:
            reused = await agent_closes(ws)
        async with raw_stream(url, sid("wrong"), {TOKEN_PARAM: token}) as ws:
            wrong = await agent_closes(ws)
        async with raw_stream(url, sid("none")) as ws:
            missing = await agent_closes(ws)
    assert admitted, "a valid token: the agent greets"
    for closed, reason in ((reused, "already used"), (wrong, "invalid"), (missing, "missing")):
        assert closed.code == 1008
        assert reason in closed.reason and TOKEN_PARAM in closed.reason
    assert f"token: call={sid('wrong')}: start.customParameters.{TOKEN_PARAM}: call token invalid" in caplog.text
    assert token not in caplog.text and CALL_SECRET not in caplog.text


async def test_calls_beyond_max_calls_get_503_until_a_slot_frees(agent_config, caplog):
    caplog.set_level(logging.INFO)
    config = agent_config(**{"server.max_calls": 1})
    async with running_agent(config) as url:
        async with raw_stream(url, sid("first")) as ws:
            assert await agent_speaks(ws)
            refused = await upgrade_status(url)
        with trio.fail_after(5):  # the agent notices the hang-up and frees the slot
            while (status := await upgrade_status(url)) != 101:
                assert status == 503
                await trio.sleep(0.05)
    assert refused == 503
    assert "server.max_calls" in caplog.text


async def test_an_oversized_message_closes_only_that_call(agent_config):
    config = agent_config(**{"server.max_message_bytes": 4096})
    padding = "x" * 5000  # over max_message_bytes, under the transport's cap of twice that
    huge = "x" * 20000  # over the transport's cap: refused without being buffered
    closes = {}
    async with running_agent(config) as url:
        async with trio.open_nursery() as attackers:
            async def attack(name: str, filler: str) -> None:
                async with raw_stream(url, sid(name)) as ws:
                    await ws.send_message(f'{{"event":"mark","pad":"{filler}"}}')
                    closes[name] = await agent_closes(ws)

            attackers.start_soon(attack, "big", padding)
            attackers.start_soon(attack, "huge", huge)
            healthy = await place_call(url, [])
    assert closes["big"].code == 1008 and "larger than 4096 bytes" in closes["big"].reason
    assert closes["huge"].code == 1009
    assert healthy.ended_by == "softphone" and healthy.greeting.audio_ms > 0, "the other call went on"


async def test_a_call_past_max_call_duration_is_ended_by_the_agent(agent_config, caplog):
    config = agent_config(**{"server.max_call_duration_s": 1})
    records: list[dict] = []
    async with running_agent(config, records) as url:
        # The caller would stay on the line for 30 s of quiet after the greeting.
        report = await place_call(url, [], settle_ms=30_000)
    assert report.ended_by == "agent"
    assert "code=1000" in report.close_detail and "call duration limit" in report.close_detail
    assert f"call={report.call_sid} ending: server.max_call_duration_s" in caplog.text
    call = call_record(records, report.call_sid)
    assert call["end_reason"] == "call duration limit"
    assert call["states"][-2:] == ["CLOSING", "ENDED"], "the goodbye played before the cut"
    assert [t["canned"] for t in records if t["kind"] == "turn"] == ["goodbye"]


async def test_a_socket_that_never_sends_start_is_closed(agent_config):
    config = agent_config(**{"server.start_timeout_ms": 200})
    async with running_agent(config) as url:
        async with trio_websocket.open_websocket_url(url) as ws:
            await ws.send_message(twilio.render_connected())
            silent = await agent_closes(ws)
        async with raw_stream(url, sid("started")) as ws:
            await trio.sleep(0.8)  # four times the deadline, which ended with `start`
            await ws.send_message(twilio.render_stop("MZ" + sid("started")[2:], sid("started"), "AC1", sequence=2))
            started = await agent_closes(ws)
    assert silent.code == 1008 and silent.reason == "no start message"
    assert started.code == 1000 and started.reason == "bye"
