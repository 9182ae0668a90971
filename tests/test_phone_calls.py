"""Whole phone calls over real sockets: transfer, the agent hanging up, keypad digits, the
silent caller, and business tools, through `agentd serve` and localcloud.

Twilio's side is the rig's `TwilioSide` (it speaks, presses keys and stays silent when told);
localcloud's script engine decides what the caller said and its rules engine answers, with
the tool calls its rules name. The after-stream TwiML is asked of the daemon's own webhook
routes, over a socket, as Twilio asks it once the stream has ended. One call runs the whole
sequence with every check on: signed voice webhook, signed upgrade carrying the per-call token,
signed after-stream request.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import httpx
import pytest
import trio
from test_faults_rig import GUARD_S, caller_voices, fault_config, open_rig, open_twilio_side
from test_webhook import serve_routes

from agentd.dtmf import digits_message
from agentd.security import twilio_signature
from agentd.server import webhook_routes
from agentd.webhook import post_signature, webhook_urls

PERSON_LINE = "can i talk to a person"
BYE_LINE = "thanks goodbye"
ORDER_LINE = "where is my order"
FRONT_DESK = "+15555550100"
HANDOFF = "Putting you through."
GOODBYE = "Bye now."
REPROMPT = "Still there?"
_RULES = [
    {"keywords": ["person"], "reply": "Of course.", "tool": "transfer_call", "arguments": '{"to": "front_desk"}'},
    {"keywords": ["goodbye"], "reply": "Goodbye!", "tool": "end_call"},
    {"keywords": ["order"], "reply": "", "tool": "order_status", "arguments": '{"order": "A7"}',
     "after_tool": "Your order {result}."},
]


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    return caller_voices(tmp_path_factory.mktemp("voices"))


@pytest.fixture
def phone_config(base_config):
    return fault_config(base_config, **{
        "businesses.acme.rules": _RULES, "businesses.acme.handoff": HANDOFF,
        "businesses.acme.goodbye": GOODBYE, "businesses.acme.reprompt": REPROMPT,
        "businesses.acme.fillers": [], "turn.idle_reprompt_s": 30.0,
    })


async def ask_after(nursery, rig, call_sid: str) -> ET.Element:
    """POST server.after_path as Twilio does when the stream ends; the TwiML it answers."""
    config = rig.config.with_overrides(**{"server.public_url": "wss://agent.example.com/media"})
    rig.server.services.config = config  # the webhook builds its URLs from the public address
    port = await serve_routes(nursery, webhook_routes(rig.server, env={}))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        answer = await client.post(config.server.after_path, data={"CallSid": call_sid})
    assert answer.status_code == 200
    return ET.fromstring(answer.content)


@dataclass
class Ended:
    """A call the agent ended: its record, its turns and what Twilio was told after the stream."""

    call: dict
    turns: list[dict]
    after: ET.Element
    close_reason: str | None


async def call_until_the_agent_ends(nursery, config, heard: tuple[str, ...], act) -> Ended:
    """A call on which localcloud hears ``heard``: after the greeting, ``await act(side)``; then wait
    for the agent to end the call, and ask the after-stream TwiML as Twilio would."""
    async with open_rig(config, heard) as rig:
        with trio.fail_after(GUARD_S):
            async with open_twilio_side(rig.url) as side:
                await side.wait_for_reply(since=0)
                await act(side)
                await side.wait_until(lambda: side.close_code is not None)
            call = await rig.call_record(side.call_sid)
            after = await ask_after(nursery, rig, side.call_sid)
            return Ended(call, rig.turns(side.call_sid), after, side.close_reason)


async def test_a_caller_who_asks_for_a_person_is_transferred_and_twilio_dials_the_desk(
        phone_config, voices, nursery):
    ended = await call_until_the_agent_ends(nursery, phone_config, (PERSON_LINE,),
                                            lambda side: side.speak(voices["open"].audio))

    assert ended.call["end_reason"] == "agent transferred" and ended.close_reason == "agent transferred"
    assert ended.after.find("Dial").text == FRONT_DESK
    assert [t["canned"] for t in ended.turns] == [None, "handoff"], "the handoff line is the agent's own"
    assert [t["reply_text"] for t in ended.turns] == ["Of course.", HANDOFF]
    assert ended.call["states"][-2:] == ["CLOSING", "ENDED"]


async def test_a_caller_who_says_goodbye_is_hung_up_on_and_twilio_hangs_up(phone_config, voices, nursery):
    ended = await call_until_the_agent_ends(nursery, phone_config, (BYE_LINE,),
                                            lambda side: side.speak(voices["bye"].audio))

    assert ended.call["end_reason"] == "agent hung up"
    assert ended.after.find("Hangup") is not None
    assert [t["reply_text"] for t in ended.turns] == ["Goodbye!"], "the model's words were its goodbye"


async def test_digits_the_caller_types_reach_the_model_as_their_turn(phone_config, voices):
    async with open_rig(phone_config, ()) as rig:
        with trio.fail_after(GUARD_S):
            async with open_twilio_side(rig.url) as side:
                await side.wait_for_reply(since=0)
                await side.press("1234#")
                await side.wait_until(lambda: rig.cloud.stats()["last_chat_request"] is not None)
            await rig.call_record(side.call_sid)

    request = rig.cloud.stats()["last_chat_request"]
    assert request["messages"][-1] == {"role": "user", "content": digits_message("1234")}
    assert [t["name"] for t in (tool["function"] for tool in request["tools"])][:2] == ["end_call", "transfer_call"]


async def test_a_keypad_digit_the_business_maps_transfers_the_call(phone_config, nursery):
    ended = await call_until_the_agent_ends(nursery, phone_config, (), lambda side: side.press("0"))

    assert ended.call["end_reason"] == "agent transferred"
    assert ended.after.find("Dial").text == FRONT_DESK
    assert [t["canned"] for t in ended.turns] == ["handoff"]


async def test_a_silent_caller_is_reprompted_then_the_agent_hangs_up(phone_config):
    config = phone_config.with_overrides(**{"turn.idle_reprompt_s": 1.0, "turn.idle_max_reprompts": 1})
    async with open_rig(config, ()) as rig:
        with trio.fail_after(GUARD_S):
            async with open_twilio_side(rig.url) as side:
                await side.wait_until(lambda: side.close_code is not None)  # the caller never says a word
            call = await rig.call_record(side.call_sid)
            turns = rig.turns(side.call_sid)

    assert call["end_reason"] == "caller silent"
    assert [(t["canned"], t["reply_text"]) for t in turns] == [("reprompt", REPROMPT), ("goodbye", GOODBYE)]
    assert call["states"][-4:] == ["SPEAKING", "REFRACTORY", "CLOSING", "ENDED"]


async def test_a_business_tools_answer_goes_to_the_model_which_is_asked_again(
        phone_config, voices, tool_server):
    tool = {"name": "order_status", "description": "Where an order is.", "timeout_ms": 2000,
            "url": f"http://127.0.0.1:{tool_server.port}/order",
            "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}}
    config = phone_config.with_overrides(**{"businesses.acme.tools": [tool]})
    async with open_rig(config, (ORDER_LINE,)) as rig:
        with trio.fail_after(GUARD_S):
            async with open_twilio_side(rig.url) as side:
                await side.wait_for_reply(since=0)
                side.say(voices["open"].audio)
                await side.wait_until(lambda: rig.turns(side.call_sid))
            await rig.call_record(side.call_sid)
            [turn] = rig.turns(side.call_sid)

    request = rig.cloud.stats()["last_chat_request"]
    roles = [m["role"] for m in request["messages"] if m["role"] != "system"]
    assert roles == ["user", "assistant", "tool"], "asked again with the call and its result"
    assert json.loads(request["messages"][-1]["content"]) == {"slot": "Monday 9:00", "asked": {"order": "A7"}}
    assert "Monday 9:00" in turn["reply_text"], "the model's second answer was said"
    assert [path for path, _, _ in tool_server.requests] == ["/order"]


async def tool_call(config, tool_server, voices, path: str, *, timeout_ms: int = 2000, fillers=()):
    """A call whose one turn makes the model call the business tool at ``path``; its turn and last request."""
    tool = {"name": "order_status", "description": "Where an order is.", "timeout_ms": timeout_ms,
            "url": f"http://127.0.0.1:{tool_server.port}{path}",
            "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}}
    # No speculative drafts: one request per round, so the tool is asked exactly once.
    config = config.with_overrides(**{"businesses.acme.tools": [tool], "businesses.acme.fillers": list(fillers),
                                      "spec.enabled": False})
    async with open_rig(config, (ORDER_LINE,)) as rig:
        with trio.fail_after(GUARD_S):
            async with open_twilio_side(rig.url) as side:
                await side.wait_for_reply(since=0)
                await side.speak(voices["open"].audio)
                await side.wait_until(lambda: asked_again(rig))  # the model has the tool's result
                await side.wait_for_reply(since=side.slot)
            await rig.call_record(side.call_sid)
            turns = rig.turns(side.call_sid)
    assert len(turns) == 1, [(t["reply_text"], t["caller_text"], t["canned"]) for t in turns]
    return turns[0], rig.cloud.stats()["last_chat_request"]


def asked_again(rig) -> bool:
    request = rig.cloud.stats()["last_chat_request"]
    return request is not None and request["messages"][-1]["role"] == "tool"


async def test_a_slow_business_tool_gets_the_filler_first(phone_config, tool_server, voices):
    turn, _ = await tool_call(phone_config, tool_server, voices, "/slow", timeout_ms=5000, fillers=["One moment."])
    assert turn["reply_text"].startswith("One moment. ") and "filler" in turn["fallbacks"], turn
    assert "Monday 9:00" in turn["reply_text"], "then the answer"


@pytest.mark.parametrize(("path", "timeout_ms", "error"), [("/fails", 2000, "HTTP 503"),
                                                          ("/never", 300, "no answer within 300 ms")])
async def test_a_failing_or_silent_business_tool_is_reported_to_the_model_as_an_error(
        phone_config, tool_server, voices, path, timeout_ms, error):
    turn, request = await tool_call(phone_config, tool_server, voices, path, timeout_ms=timeout_ms)
    result = json.loads(request["messages"][-1]["content"])
    assert request["messages"][-1]["role"] == "tool" and error in result["error"]
    assert turn["reply_text"], "the caller hears the model's answer to the error, never silence"


async def test_the_daemons_own_listener_serves_the_voice_and_after_routes(phone_config):
    async with open_rig(phone_config, ()) as rig:
        server = rig.config.server
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{rig.server.port}") as client:
            voice = await client.post(server.voice_path, data={"CallSid": "CA1", "To": "+15551230000"})
            after = await client.post(server.after_path, data={"CallSid": "CA1"})
    # Without server.public_url there is no stream URL to answer with: routed, and refused as such.
    assert voice.status_code == after.status_code == 503
    assert voice.text == "server.public_url is not set\n"


async def test_a_call_placed_as_twilio_places_it_passes_every_check_and_is_transferred(
        phone_config, voices, monkeypatch):
    """Every check on, the whole sequence Twilio runs: the signed voice webhook answers TwiML
    with the stream URL and a per-call token; the upgrade to that URL is signed and `start`
    carries the TwiML's parameters; the caller asks for a person; once the agent ends the
    stream, the signed after-stream request is answered with the transfer."""
    auth_token, secret, call_sid, number = "whole-call-auth-token", "whole-call-secret", "CA" + "5" * 32, "+15551230000"
    monkeypatch.setenv("AGENTD_TEST_AUTH_TOKEN", auth_token)
    monkeypatch.setenv("AGENTD_TEST_CALL_SECRET", secret)
    checks = {"server.public_url": "wss://agent.example.com/media", "server.auth_token_env": "AGENTD_TEST_AUTH_TOKEN",
              "server.call_token_secret_env": "AGENTD_TEST_CALL_SECRET", "server.call_token_param": "token",
              "businesses.acme.numbers": [number]}
    form = [("AccountSid", "AC1"), ("CallSid", call_sid), ("From", "+15559870000"), ("To", number)]

    async with open_rig(phone_config, (PERSON_LINE,), agent_overrides=checks) as rig:
        urls, server = webhook_urls(rig.config), rig.config.server

        async def twilio_asks(path: str, signed_url: str) -> httpx.Response:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{rig.server.port}") as client:
                return await client.post(path, data=dict(form), headers={
                    "x-twilio-signature": post_signature(auth_token, signed_url, form)})

        with trio.fail_after(GUARD_S):
            voice = await twilio_asks(server.voice_path, urls.voice)
            stream = ET.fromstring(voice.content).find("Connect/Stream")
            parameters = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
            async with open_twilio_side(rig.url, call_sid=call_sid, parameters=parameters, headers={
                    "x-twilio-signature": twilio_signature(auth_token, stream.get("url"))}) as side:
                await side.wait_for_reply(since=0)
                await side.speak(voices["open"].audio)
                await side.wait_until(lambda: side.close_code is not None)
            after = await twilio_asks(server.after_path, urls.after)
            call = await rig.call_record(call_sid)

    assert voice.status_code == 200 and "token" in parameters and parameters["business"] == "acme"
    assert call["end_reason"] == "agent transferred" and side.close_reason == "agent transferred"
    assert after.status_code == 200 and ET.fromstring(after.content).find("Dial").text == FRONT_DESK

