"""Whole calls over real sockets: softphone <-> agentd serve <-> localcloud.

Every part is the production code: agentd's gRPC and HTTP clients talk to
localcloud (script STT engine, espeak-ng TTS, rules LLM) on 127.0.0.1, and the
softphone plays Twilio's side in real time. Assertions are about behaviour
(what was heard, said, sent, in which order), never about how long it took.
"""

from __future__ import annotations

import pytest
import trio
import trio_websocket
from agent_harness import call_record, start_agent, turns_of, wait_for_call_record
from conftest import BYE_LINE, HOURS_LINE

from agentd.codecs import twilio
from agentd.testbed.softphone import CallReport, place_call

CALL_LIMIT_S = 60  # a guard against hangs, not a performance assertion
BAD_CALL, BAD_STREAM = "CA" + "bad0" * 8, "MZ" + "bad0" * 8


async def one_call(config, turns: list, records: list[dict]) -> CallReport:
    """One call to business "acme" speaking ``turns``, on an agent started for it; returns once agentd has
    recorded the call's end (its records land in ``records``)."""
    with trio.fail_after(CALL_LIMIT_S):
        async with trio.open_nursery() as nursery:
            url = await start_agent(nursery, config, records)
            report = await place_call(url, turns, business="acme")
            await wait_for_call_record(records, report.call_sid)
            nursery.cancel_scope.cancel()
    return report


async def test_a_call_is_greeted_then_each_turn_answered(config, cloud, caller):
    acme = config.business("acme")
    records: list[dict] = []
    report = await one_call(config, [caller["hours"], caller["bye"]], records)
    call = call_record(records, report.call_sid)

    assert report.violations == ()
    assert report.greeting.audio_ms > 0, "the greeting was heard"
    assert report.greeting.latency_ms < report.turns[0].started_ms, "greeting before the caller speaks"
    assert [t.answered for t in report.turns] == [True, True]

    turns = turns_of(records, report.call_sid)
    assert [t["caller_text"] for t in turns] == [HOURS_LINE, BYE_LINE]
    hours_reply = next(r.reply for r in acme.rules if "open" in r.keywords)
    assert turns[0]["reply_text"] == hours_reply
    assert "goodbye" in turns[1]["reply_text"].lower()

    request = cloud.stats()["last_chat_request"]
    assert request["stream"] is True
    assert request["messages"][0] == {"role": "system", "content": acme.system_prompt}
    assert request["messages"][-1] == {"role": "user", "content": BYE_LINE}
    assert {"role": "user", "content": HOURS_LINE} in request["messages"], "history carries turn 1"

    # Reply audio arrived as frames, each piece followed by a mark that came back.
    assert report.turns[0].reply_frames > 0 and len(report.turns[0].marks_echoed) >= 2
    assert call["states"][:6] == ["REFRACTORY", "LISTENING", "FINALIZING", "THINKING", "SPEAKING", "REFRACTORY"]
    # The goodbye rule calls end_call: its words play uninterrupted (CLOSING), then the agent hangs up.
    assert call["states"][6:] == ["LISTENING", "FINALIZING", "THINKING", "CLOSING", "ENDED"]
    assert call["end_reason"] == "agent hung up"
    for turn in turns:
        stamps = turn["stamps_ms"]
        # A speculative draft may ask the LLM before the caller stops; speech waits for the turn.
        for order in (["speech_start", "speech_end", "tts_start", "tts_first_audio", "first_reply_frame_sent"],
                      ["ai_start", "ai_first_token", "tts_start"]):
            assert [stamps[name] for name in order] == sorted(stamps[name] for name in order)
        assert turn["speculation"] in ("hit", "miss", "late", "none")
        # localcloud reports token usage at the end of each stream, as OpenAI does when asked.
        usage = turn["llm_usage"]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0


async def test_two_concurrent_calls_are_kept_apart(config, cloud, caller):
    records: list[dict] = []
    reports = {}
    with trio.fail_after(CALL_LIMIT_S):
        async with trio.open_nursery() as nursery:
            url = await start_agent(nursery, config, records)

            async def dial(business: str) -> None:
                reports[business] = await place_call(url, [caller["hours"]], business=business)

            async with trio.open_nursery() as calls:
                calls.start_soon(dial, "acme")
                calls.start_soon(dial, "default")
            for report in reports.values():
                await wait_for_call_record(records, report.call_sid)
            nursery.cancel_scope.cancel()

    acme, default = reports["acme"], reports["default"]
    assert acme.call_sid != default.call_sid
    [acme_turn] = turns_of(records, acme.call_sid)
    [default_turn] = turns_of(records, default.call_sid)
    assert acme_turn["caller_text"] == default_turn["caller_text"] == HOURS_LINE
    assert acme_turn["reply_text"] == next(r.reply for r in config.business("acme").rules if "open" in r.keywords)
    # The Hebrew business has no English keywords: its own fallback, in its own call.
    assert default_turn["reply_text"] == config.business("default").fallback_reply
    assert acme.turns[0].answered and default.turns[0].answered


async def test_a_malformed_frame_closes_only_that_call(config, cloud, caller):
    records: list[dict] = []
    with trio.fail_after(CALL_LIMIT_S):
        async with trio.open_nursery() as nursery:
            url = await start_agent(nursery, config, records)
            healthy = {}

            async def healthy_call() -> None:
                healthy["report"] = await place_call(url, [caller["hours"]], business="acme")

            nursery.start_soon(healthy_call)
            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.send_message(twilio.render_connected())
                await ws.send_message(twilio.render_start(
                    stream_sid=BAD_STREAM, call_sid=BAD_CALL, account_sid="AC1", custom_parameters={}))
                await ws.send_message(f'{{"event": "media", "streamSid": "{BAD_STREAM}", "media": {{"payload": "%%%"}}}}')
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    while True:
                        await ws.get_message()
            while "report" not in healthy:
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    assert closed.value.reason.code == 1008
    assert "media" in closed.value.reason.reason
    assert healthy["report"].turns[0].answered
    assert call_record(records, BAD_CALL)["states"][-1] == "ENDED"


async def test_when_streaming_stt_cannot_open_the_fallback_answers(config, cloud, caller):
    cloud.set_faults(stt_fail_opens=3)
    records: list[dict] = []
    report = await one_call(config, [caller["hours"]], records)

    stats = cloud.stats()
    assert stats["recognize_calls"] >= 1, "the turn went through unary Recognize"
    [turn] = turns_of(records, report.call_sid)
    assert turn["caller_text"], "the fallback transcribed the caller"
    assert report.turns[0].answered


async def test_streaming_synthesis_plays_the_reply_as_chunks_arrive(config, cloud, caller):
    config = config.with_overrides(**{"tts.streaming": True, "businesses.acme.voice": "en-US-Chirp3-HD-Charon"})
    records: list[dict] = []
    report = await one_call(config, [caller["hours"]], records)

    stats = cloud.stats()
    assert stats["streaming_synth_calls"] >= 2 and stats["synth_calls"] == 0
    assert report.greeting.audio_ms > 0 and report.violations == ()
    [turn] = turns_of(records, report.call_sid)
    assert turn["reply_text"] == next(r.reply for r in config.business("acme").rules if "open" in r.keywords)
    # ~200 ms chunks each get a mark: more marks than sentences came back.
    assert len(report.turns[0].marks_echoed) > 2


async def test_a_final_that_comes_after_its_turn_is_not_stamped_on_the_next_turn(config, cloud, caller):
    # Finals 2.5 s after the audio: each turn is committed on its partial at stt.final_timeout_ms, and
    # its final arrives while the agent answers -- before the caller's next turn has begun.
    cloud.configure(stt_final_delay_ms=2500)
    records: list[dict] = []
    report = await one_call(config, [caller["hours"], caller["bye"]], records)

    turns = turns_of(records, report.call_sid)
    assert [t["caller_text"] for t in turns] == [HOURS_LINE, BYE_LINE]
    for turn in turns:
        stamps = turn["stamps_ms"]
        if "final_text" in stamps:
            assert stamps["final_text"] >= stamps["speech_start"], f"turn {turn['turn']}: {stamps}"
