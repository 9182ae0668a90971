"""The front door against hostile clients, over real sockets (issue 13's findings, one test each).

Each test runs `agentd serve` on localcloud and plays the client that broke
the old front door with raw TCP (for what no WebSocket library would send) or
a real WebSocket client, and checks only what a client or an operator sees:
the bytes and close codes on the wire, whether the server closed the socket,
whether a healthy call from another source address (127.0.0.2 is on
loopback, so the attacker dials from there) was still greeted, and what the
log holds. Real time passes (the daemon's own deadlines), but every wait is
under a guard, and nothing asserts how long anything took.

The pure parts (the pending budget, the refusal log, log-line safety) are
tested directly at the end.
"""

from __future__ import annotations

import logging
import socket
import struct
from types import SimpleNamespace

import httpx
import pytest
import trio
import trio.testing
import trio_websocket
from agent_harness import GUARD_S, acme_config, serving

from agentd import http1
from agentd.codecs import twilio
from agentd.config import load_config
from agentd.errors import UpstreamUnavailable
from agentd.frontdoor import FrontDoor, PendingBudget, RefusalLog
from agentd.adapters.llm_openai import ChatSettings, OpenAIChat
from agentd.security import twilio_signature
from agentd.server import Server
from agentd.testbed.softphone import place_call

AUTH_TOKEN = "front-door-auth-token-0123456789"
TOKEN_ENV = "AGENTD_TEST_FRONT_DOOR_TOKEN"
PUBLIC_URL = "wss://agent.example.com/media"
SIGNED = {"x-twilio-signature": twilio_signature(AUTH_TOKEN, PUBLIC_URL)}
ATTACKER = "127.0.0.2"


@pytest.fixture
def agent_config(cloud, monkeypatch, tmp_path):
    """`agent_config(**overrides)`: the shipped config on localcloud, signatures checked."""
    monkeypatch.setenv(TOKEN_ENV, AUTH_TOKEN)
    config = acme_config(cloud, str(tmp_path / "telemetry"), **{
        "server.auth_token_env": TOKEN_ENV, "server.public_url": PUBLIC_URL})
    return lambda **overrides: config.with_overrides(**overrides)


def url_of(server: Server) -> str:
    return f"ws://127.0.0.1:{server.port}/media"


async def dial(server: Server, source: str = "127.0.0.1") -> trio.SocketStream:
    """A TCP connection to the agent from `source` (any 127.x address is on loopback)."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", server.port))
    return trio.SocketStream(sock)


def upgrade(path: str = "/media", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: agent.example.com", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the agent sends until it closes the socket (a hang here is the bug)."""
    received = b""
    with trio.fail_after(5):
        while True:
            try:
                chunk = await stream.receive_some()
            except trio.BrokenResourceError:
                return received
            if not chunk:
                return received
            received += chunk


async def read_head(stream: trio.SocketStream) -> tuple[int, bytes]:
    """The response's status and whatever followed its head; leaves the socket open."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = await stream.receive_some()
        if not chunk:
            break
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), rest


def frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (mask 0: the payload unchanged)."""
    size = len(payload)
    length = bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + struct.pack("!H", size)
    return bytes([0x80 | opcode]) + length + b"\0\0\0\0" + payload


def tracebacks(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


# --- 1. a refused upgrade is answered and closed at once -------------------------------------------

REFUSALS = {
    "unsigned upgrade": (upgrade(), 403, "signature"),
    "unknown path": (upgrade("/elsewhere", SIGNED), 404, "path"),
    "not HTTP": (b"HELLO THERE\r\n\r\n", 400, "protocol"),
    "not an upgrade": (b"GET /media HTTP/1.1\r\nHost: a\r\n\r\n", 426, "protocol"),
    "signed, but a query string added": (upgrade("/media?x=1", SIGNED), 403, "signature"),
}


async def test_every_refusal_is_answered_and_the_socket_closed_at_once(agent_config, caplog):
    caplog.set_level(logging.INFO)
    async with serving(agent_config()) as server:
        held = []
        for data, _, _ in REFUSALS.values():
            stream = await dial(server)
            await stream.send_all(data)
            held.append(stream)  # the client keeps its end: only the server can close it
        answers = [await read_until_closed(stream) for stream in held]
        server.draining = True
        stream = await dial(server)
        await stream.send_all(upgrade(headers=SIGNED))
        draining = await read_until_closed(stream)
        refused = dict(server.refused)
    for (case, (_, status, _)), answer in zip(REFUSALS.items(), answers):
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), case
        assert b"connection: close" in answer.lower(), case
    assert draining.startswith(b"HTTP/1.1 503 ")
    assert refused == {"signature": 2, "path": 1, "protocol": 2, "draining": 1}
    assert not tracebacks(caplog)


async def test_a_signed_upgrade_with_a_query_string_is_checked_over_that_url(agent_config):
    signed_with_query = {"x-twilio-signature": twilio_signature(AUTH_TOKEN, PUBLIC_URL + "?x=1")}
    async with serving(agent_config()) as server:
        stream = await dial(server)
        await stream.send_all(upgrade("/media?x=1", signed_with_query))
        status, _ = await read_head(stream)
    assert status == 101, "Twilio's rule: the URL as requested, query included"


# --- the route table: the seam for other paths (the voice webhook plugs in here) ----------------------

async def test_other_paths_go_to_the_route_table_and_a_failing_handler_is_only_a_500(agent_config, caplog):
    async def voice(request: http1.Request) -> http1.Response:
        return http1.Response(status=200, body=b"<Response/>",
                              headers=(("content-type", "text/xml"),))

    async def broken(request: http1.Request) -> http1.Response:
        raise RuntimeError("a bug in a handler")

    answers = {}
    async with serving(agent_config()) as server:
        server.routes.update({("POST", "/twilio/voice"): voice, ("POST", "/twilio/after"): broken})
        for case, data in {
            "voice": b"POST /twilio/voice HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nCallSid=CA1",
            "wrong method": b"GET /twilio/voice HTTP/1.1\r\nHost: a\r\n\r\n",
            "broken handler": b"POST /twilio/after HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        }.items():
            stream = await dial(server)
            await stream.send_all(data)
            answers[case] = await read_until_closed(stream)
        report = await place_call(url_of(server), [], extra_headers=SIGNED)
    assert answers["voice"].startswith(b"HTTP/1.1 200 ") and answers["voice"].endswith(b"<Response/>")
    assert answers["wrong method"].startswith(b"HTTP/1.1 405 ")
    assert answers["broken handler"].startswith(b"HTTP/1.1 500 ")
    assert "the handler for POST /twilio/after failed" in caplog.text
    assert report.greeting.audio_ms > 0, "the daemon serves on"


# --- 2. silent signed upgrades cannot keep calls out -----------------------------------------------

async def test_a_flood_of_silent_signed_upgrades_never_keeps_a_call_from_another_address_out(agent_config):
    # Few call slots and a small per-address share, so that the flood is many times both.
    config = agent_config(**{"server.max_calls": 2, "server.max_pending_per_ip": 3})
    statuses: list[int] = []
    async with serving(config) as server:
        async with trio.open_nursery() as attack:
            async def flood() -> None:
                while True:  # a replayed signature, then silence: never `start`
                    stream = await dial(server, ATTACKER)
                    await stream.send_all(upgrade(headers=SIGNED))
                    statuses.append((await read_head(stream))[0])
                    attack.start_soon(read_until_closed, stream)
                    await trio.sleep(0.02)

            attack.start_soon(flood)
            while statuses.count(101) < 6:  # more silent sockets than max_calls
                await trio.sleep(0.05)
            report = await place_call(url_of(server), [], extra_headers=SIGNED)
            attack.cancel_scope.cancel()
        refused = dict(server.refused)
    assert report.ended_by == "softphone", report.close_detail
    assert report.greeting.audio_ms > 0, "the healthy call was greeted during the flood"
    assert 503 in statuses and refused["pending"] > 0, "the attacker's share ran out, not the calls"
    assert refused["start_timeout"] > 0, "silent sockets were closed at server.start_timeout_ms"


async def test_a_silent_upgrade_is_closed_1008_at_the_start_timeout(agent_config):
    async with serving(agent_config(**{"server.start_timeout_ms": 300})) as server:
        async with trio_websocket.open_websocket_url(url_of(server), extra_headers=list(
                (k.encode(), v.encode()) for k, v in SIGNED.items())) as ws:
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
        refused = dict(server.refused)
    assert (closed.value.reason.code, closed.value.reason.reason) == (1008, "no start message")
    assert refused == {"start_timeout": 1}


async def test_an_idle_connection_is_closed_at_the_start_timeout(agent_config):
    async with serving(agent_config(**{"server.start_timeout_ms": 300})) as server:
        idle = await dial(server, ATTACKER)
        slow = await dial(server, ATTACKER)
        await slow.send_all(b"GET /media HTTP/1.1\r\n")  # slowloris: a head that never ends
        assert await read_until_closed(idle) == b"" and await read_until_closed(slow) == b""
        refused = dict(server.refused)
    assert refused == {"start_timeout": 2}


# --- 3. a client that leaves at once leaves no traceback -------------------------------------------

@pytest.mark.parametrize("how", ["FIN", "RST"])
async def test_a_client_that_leaves_at_once_adds_no_traceback_and_bounded_log(agent_config, caplog, how):
    caplog.set_level(logging.INFO)
    async with serving(agent_config()) as server:
        before = len(caplog.records)
        for _ in range(40):
            stream = await dial(server, ATTACKER)
            await stream.send_all(upgrade())  # unsigned
            if how == "RST":
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
        with trio.fail_after(5):
            while sum(server.refused.values()) < 40:
                await trio.sleep(0.02)
        lines = [r.getMessage() for r in caplog.records[before:]]
        report = await place_call(url_of(server), [], extra_headers=SIGNED)
    assert not tracebacks(caplog)
    assert len(lines) <= 5, "a flood is summed per interval, not logged line by line"
    assert all(len(line) < 300 for line in lines)
    assert report.greeting.audio_ms > 0


async def test_unknown_events_before_start_are_logged_once_per_socket(agent_config, caplog):
    async with serving(agent_config(**{"server.start_timeout_ms": 500})) as server:
        async with trio_websocket.open_websocket_url(url_of(server), extra_headers=list(
                (k.encode(), v.encode()) for k, v in SIGNED.items())) as ws:
            for n in range(200):
                await ws.send_message(f'{{"event":"novel{n}"}}')
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason.code == 1008
    assert sum("skipping unknown Twilio event" in r.getMessage() for r in caplog.records) == 1


# --- 4. the log cannot be forged through callSid ---------------------------------------------------

FORGED = {
    "newline": "CA0123\nERROR agentd.server forged line",
    "ANSI escape": "CA\x1b[2K\x1b[1Gforged",
    "60 KB": "CA" + "f" * 60_000,
}


async def test_a_hostile_call_sid_never_forges_or_floods_a_log_line(agent_config, caplog):
    caplog.set_level(logging.INFO)
    config = agent_config(**{"server.public_url": "", "server.max_message_bytes": 131_072})
    closes = {}
    async with serving(config) as server:
        for case, call_sid in FORGED.items():
            async with trio_websocket.open_websocket_url(url_of(server)) as ws:
                await ws.send_message(twilio.render_connected())
                await ws.send_message(twilio.render_start(stream_sid="MZ" + "0" * 32, call_sid=call_sid,
                                                          account_sid="AC1", custom_parameters={}))
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                closes[case] = closed.value.reason
    assert all(c.code == 1008 and c.reason.startswith("start.callSid") for c in closes.values()), closes
    messages = [r.getMessage() for r in caplog.records]
    assert not any("\n" in m or "\x1b" in m for m in messages)
    assert not any(line.lstrip().startswith("ERROR agentd.server forged") for line in caplog.text.splitlines())
    assert len(caplog.text) < 4000, "a 60 KB value is capped, not copied"


# --- 5. an upstream error body is redacted ---------------------------------------------------------

API_KEY = "sk-proj-front-door-test-0123456789abcdef"


async def echoing_llm(task_status=trio.TASK_STATUS_IGNORED) -> None:
    """An LLM endpoint that answers 401 and echoes the request's Authorization header, as some do."""
    async def answer(stream: trio.SocketStream) -> None:
        request = await http1.read_request(stream)
        body = (f'{{"error": {{"message": "invalid key: {request.header("authorization")} '
                f'(key={API_KEY})"}}}}').encode()
        await http1.write_response(stream, http1.Response(status=401, body=body))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await trio.serve_listeners(answer, listeners, task_status=task_status)


async def test_an_upstream_error_body_is_reported_without_the_key():
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(echoing_llm)
            port = listeners[0].socket.getsockname()[1]
            settings = ChatSettings.from_config(load_config(None).with_overrides(**{
                "llm.base_url": f"http://127.0.0.1:{port}/v1", "llm.timeout_ms": 5000}))
            async with httpx.AsyncClient() as client:
                chat = OpenAIChat(client, settings, api_key=API_KEY)
                with pytest.raises(UpstreamUnavailable) as failed:
                    async with chat.stream([{"role": "user", "content": "hi"}]):
                        pass
            nursery.cancel_scope.cancel()
    message = str(failed.value)
    assert "HTTP 401" in message and "invalid key" in message
    assert API_KEY not in message and API_KEY[:12] not in message
    assert "Bearer [redacted]" in message


async def test_a_call_whose_llm_echoes_the_key_never_puts_it_in_the_log(agent_config, caller, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("AGENTD_TEST_FRONT_DOOR_LLM_KEY", API_KEY)
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(echoing_llm)
            config = agent_config(**{
                "llm.base_url": f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/v1",
                "llm.api_key_env": "AGENTD_TEST_FRONT_DOOR_LLM_KEY"})
            async with serving(config) as server:
                report = await place_call(url_of(server), [caller["hours"]], extra_headers=SIGNED)
            nursery.cancel_scope.cancel()
    assert report.turns and report.turns[0].answered, "the caller heard the apology"
    assert "LLM failed: LLM: HTTP 401" in caplog.text, "the failure itself is logged"
    assert API_KEY not in caplog.text and API_KEY[3:15] not in caplog.text


# --- smaller points: 1007, the byte cap ------------------------------------------------------------

async def test_invalid_utf8_closes_with_1007(agent_config):
    async with serving(agent_config()) as server:
        stream = await dial(server)
        await stream.send_all(upgrade(headers=SIGNED))
        status, _ = await read_head(stream)
        await stream.send_all(frame(0x1, b'{"event":"connected","x":"\xff\xfe"}'))
        received = await read_until_closed(stream)
    assert status == 101
    assert received[:1] == b"\x88", "a close frame, not just a TCP close"
    assert struct.unpack("!H", received[2:4])[0] == 1007


async def test_the_transport_cap_counts_bytes_not_characters(agent_config):
    config = agent_config(**{"server.max_message_bytes": 4096, "server.public_url": ""})
    wide = "€" * 3000  # 3,000 characters, 9,000 bytes: over the transport's 8,192-byte cap
    async with serving(config) as server:
        async with trio_websocket.open_websocket_url(url_of(server)) as ws:
            await ws.send_message(f'{{"event":"connected","pad":"{wide}"}}')
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason.code == 1009


# --- out of file descriptors -----------------------------------------------------------------------

class ExhaustedListener(trio.abc.Listener):
    """accept() fails with EMFILE `times` times, then waits forever: a process out of descriptors."""

    def __init__(self, times: int) -> None:
        self.failures = times

    async def accept(self):
        await trio.lowlevel.checkpoint()
        if self.failures:
            self.failures -= 1
            raise OSError(24, "Too many open files")
        await trio.sleep_forever()

    async def aclose(self) -> None:
        pass


async def test_running_out_of_descriptors_is_survived_with_a_rate_limited_warning(caplog, autojump_clock):
    config = load_config(None)
    door = FrontDoor(SimpleNamespace(services=SimpleNamespace(config=config), refused={}), None)
    listener = ExhaustedListener(times=250)  # 25 s of EMFILE at trio's 10 tries a second
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(door.serve, [listener])
            while listener.failures:
                await trio.sleep(1)
            nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert 2 <= len(warnings) <= 3, "one warning per 10 s, not one per failed accept"
    assert "EMFILE" in warnings[0].getMessage()
    assert not tracebacks(caplog)


# --- the pure parts --------------------------------------------------------------------------------

def test_the_pending_budget_keeps_one_address_to_its_share():
    budget = PendingBudget(total=5, per_source=2)
    assert [budget.take("10.0.0.1", n) for n in range(3)] == [True, True, False]
    assert [budget.take("10.0.0.2", n) for n in range(2)] == [True, True]
    assert budget.take("10.0.0.3", 0) is True
    assert budget.take("10.0.0.4", 0) is False, "the total is full"
    budget.give_back("10.0.0.1", 0)
    assert budget.take("10.0.0.4", 0) is True


def test_out_of_descriptors_the_oldest_connection_of_the_busiest_address_is_shed_first():
    budget = PendingBudget(total=10, per_source=5)
    assert budget.evictee() is None
    budget.take("10.0.0.9", "lone caller")
    for n in range(3):
        budget.take("10.0.0.1", f"flood {n}")
    assert budget.evictee() == "flood 0"
    budget.give_back("10.0.0.1", "flood 0")
    assert budget.evictee() == "flood 1"


def test_the_refusal_log_sums_a_flood_into_one_line_per_interval(caplog):
    caplog.set_level(logging.INFO)
    refusals = RefusalLog(logging.getLogger("test.refusals"), lines=2)
    for n in range(10):
        refusals.note("signature" if n % 2 else "path", f"10.0.0.{n}:1", "detail")
    refusals.flush()
    refusals.flush()  # a quiet interval: nothing
    refusals.note("path", "10.0.0.1:1", "a\nforged line")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    assert messages[2] == "refused 8 more connections in the last 10s (path=4, signature=4)"
    assert messages[3] == "refusing a call from 10.0.0.1:1: path: a\\x0aforged line"
