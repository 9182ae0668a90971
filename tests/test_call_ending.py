"""How the agent ends a call (``Call.wind_down``, ``Call.end_now``) and what the
records say, over real sockets.

The daemon's services (localcloud behind them) come from the rig's ``agentd
serve``; the Media Stream is served here by the same steps the daemon
takes -- agentd.wsconn's handshake handed over to a ``MediaSocket``,
``wait_start``, then ``Call(ws, services, start)`` -- so the test
holds the ``Call`` and can end it as another part of agentd would. Twilio's
side is the rig's ``TwilioSide``; nothing waits on a stopwatch.
"""

from __future__ import annotations

import functools

import pytest
import trio
import trio_websocket
from test_faults_rig import (
    GUARD_S, OPEN_LINE, OPEN_REPLY, Rig, TwilioSide, caller_voices, fault_config, open_rig, open_twilio_side,
    without_filler,
)

from agentd import media_socket, wsconn
from agentd.call import Call
from agentd.server import wait_start

GOODBYE_LINE = "Thanks, bye."


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    return caller_voices(tmp_path_factory.mktemp("voices"))


@pytest.fixture
def ending_config(base_config):
    return fault_config(base_config, **{"businesses.acme.goodbye": GOODBYE_LINE})


async def serve_calls(nursery: trio.Nursery, rig: Rig, calls: list[Call]) -> str:
    """Serve Media Streams with the rig's services; each Call lands in ``calls``. Returns the URL."""

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        max_bytes = rig.config.server.max_message_bytes
        async with media_socket.accepted(request, max_message_size=2 * max_bytes) as ws:
            start = await wait_start(ws, max_bytes=max_bytes)
            call = Call(ws, rig.server.services, start)
            calls.append(call)
            reason = await call.run()
            await ws.aclose(code=1000, reason=reason)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(functools.partial(trio.serve_listeners, lambda stream: wsconn.serve_websocket(
        stream, handler, max_message_bytes=2 * rig.config.server.max_message_bytes, handshake_timeout_s=GUARD_S, close_timeout_s=1), listeners))
    return f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/media"


async def goodbye_heard(side: TwilioSide, since: int) -> None:
    """Agent audio played after slot ``since``, and the agent closed the socket."""
    await side.wait_until(lambda: side.close_code is not None)
    assert side.played_since(since) > 0, "the goodbye was played before the call ended"


async def test_winding_down_a_quiet_call_says_goodbye_then_hangs_up(ending_config, voices):
    async with open_rig(ending_config, ()) as rig, trio.open_nursery() as nursery:
        calls: list[Call] = []
        url = await serve_calls(nursery, rig, calls)
        with trio.fail_after(GUARD_S):
            async with open_twilio_side(url) as side:
                await side.wait_for_reply(since=0)  # the greeting
                since = side.slot
                calls[0].wind_down("idle caller")
                await goodbye_heard(side, since)
            call = await rig.call_record(side.call_sid)
        nursery.cancel_scope.cancel()

    assert side.close_code == 1000 and side.close_reason == "idle caller"
    assert side.clears == [], "nothing was playing, so nothing was cleared"
    assert call["end_reason"] == "idle caller"
    assert call["states"][-2:] == ["CLOSING", "ENDED"]
    assert call["business"] == "acme" and call["call_sid"] == side.call_sid


async def test_winding_down_mid_reply_clears_it_and_the_caller_cannot_stop_the_goodbye(ending_config, voices):
    async with open_rig(ending_config, (OPEN_LINE, OPEN_LINE)) as rig, trio.open_nursery() as nursery:
        calls: list[Call] = []
        url = await serve_calls(nursery, rig, calls)
        with trio.fail_after(GUARD_S):
            async with open_twilio_side(url) as side:
                await side.wait_for_reply(since=0)
                turn_at = side.slot
                side.say(voices["open"].audio)
                await side.wait_until(lambda: side.played_since(turn_at) >= 10)  # 200 ms into the reply
                calls[0].wind_down("call duration limit")
                await side.wait_until(lambda: side.clears)
                goodbye_from = side.slot
                side.say(voices["open"].audio)  # the caller talks over the goodbye
                await goodbye_heard(side, goodbye_from)
            call = await rig.call_record(side.call_sid)
            turn, goodbye = rig.turns(side.call_sid)
        nursery.cancel_scope.cancel()

    assert len(side.clears) == 1, "one clear for the reply; the goodbye was never cleared"
    assert turn["canned"] is None and goodbye["canned"] == "goodbye", "the agent's own line is marked so"
    assert not goodbye["interrupted"]
    assert call["end_reason"] == "call duration limit"
    assert turn["interrupted"] and turn["reply_text"]
    assert OPEN_REPLY.startswith(without_filler(turn["reply_text"])), "only the reply's own pieces were queued"
    assert turn["business"] == "acme" and turn["call_sid"] == side.call_sid


async def test_ending_a_call_now_still_writes_its_record(ending_config):
    async with open_rig(ending_config, ()) as rig, trio.open_nursery() as nursery:
        calls: list[Call] = []
        url = await serve_calls(nursery, rig, calls)
        with trio.fail_after(GUARD_S):
            async with open_twilio_side(url) as side:
                await side.wait_until(lambda: calls)
                calls[0].end_now("operator hung up")
                await side.wait_until(lambda: side.close_code is not None)
            call = await rig.call_record(side.call_sid)
        nursery.cancel_scope.cancel()

    assert side.close_reason == "operator hung up"
    assert call["end_reason"] == "operator hung up"
    assert "CLOSING" not in call["states"]


async def test_turn_records_name_the_degradations_they_took(ending_config, voices):
    async with open_rig(ending_config, (OPEN_LINE,)) as rig:
        with trio.fail_after(GUARD_S):
            async with open_twilio_side(rig.url, echo_marks=False) as side:
                await side.wait_for_reply(since=0)
                turn_at = side.slot
                side.say(voices["open"].audio)
                await side.wait_for_reply(since=turn_at)
                await side.wait_until(lambda: rig.turns(side.call_sid))
            [turn] = rig.turns(side.call_sid)

    assert turn["fallbacks"] == ["mark_timeout"], "its marks never came back"
    assert turn["business"] == "acme"
