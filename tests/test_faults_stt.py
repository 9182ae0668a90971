"""When streaming recognition fails mid-call: rotation before Google's stream limit,
streams that die, a recognizer that restarts, and streams that cannot be opened.
Whatever happens, every turn the caller spoke is transcribed once, in order.

localcloud's script engine decides the words (one script line per caller turn,
counted across every stream of the call, as real recognition would hear the
same audio again); the call is real: softphone or `TwilioSide`, agentd,
localcloud, all on sockets.
"""

from __future__ import annotations

import logging

import pytest
import trio
from test_faults_rig import (
    BYE_LINE,
    BYE_REPLY,
    GUARD_S,
    OPEN_LINE,
    OPEN_REPLY,
    PRICE_LINE,
    PRICE_REPLY,
    SLOT_MS,
    caller_voices,
    fault_config,
    open_rig,
    open_twilio_side,
    without_filler,
)

from agentd.testbed.softphone import place_call

STREAM_LIMIT = "Exceeded maximum allowed stream duration"


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    return caller_voices(tmp_path_factory.mktemp("voices"))


def answered(turns: list[dict]) -> list[tuple[str, str]]:
    """(caller text, reply) of each turn, an opening filler left out (a turn may be answered late, never lost)."""
    return [(t["caller_text"], without_filler(t["reply_text"])) for t in turns]


async def test_streams_rotate_before_the_duration_limit_and_no_turn_is_lost_or_doubled(base_config, voices, caplog):
    caplog.set_level(logging.INFO, logger="agentd.adapters.stt_google")
    config = fault_config(base_config, **{"stt.rotate_after_s": 5})
    script = (OPEN_LINE, PRICE_LINE, BYE_LINE)
    async with open_rig(config, script, stt_stream_limit_s=8) as rig:
        with trio.fail_after(GUARD_S):
            report = await place_call(rig.url, [voices["open"], voices["price"], voices["bye"]], business="acme")
            await rig.call_record(report.call_sid)
        turns = rig.turns(report.call_sid)
        stats = rig.cloud.stats()
        history = rig.history_sent()

    assert report.total_call_ms > 1.5 * 8000, "one stream could not have carried the call"
    assert answered(turns) == [
        (OPEN_LINE, OPEN_REPLY), (PRICE_LINE, PRICE_REPLY), (BYE_LINE, BYE_REPLY)]
    assert [(role, without_filler(text)) for role, text in history] == [
        ("user", OPEN_LINE), ("assistant", OPEN_REPLY), ("user", PRICE_LINE), ("assistant", PRICE_REPLY),
        ("user", BYE_LINE)]
    assert stats["streams_opened"] >= 3, "the stream was replaced every ~5 s"
    assert not [r for r in caplog.records if STREAM_LIMIT in r.getMessage()], "no stream ran into the limit"


async def test_a_stream_that_dies_before_the_final_is_replaced_and_the_caller_audio_replayed(base_config, voices):
    # Partials lag (one word per 400 ms of voice), so only a final carries the whole line.
    async with open_rig(fault_config(base_config), (PRICE_LINE,), stt_partial_interval_ms=400) as rig:
        with trio.fail_after(GUARD_S):
            async with open_twilio_side(rig.url) as side:
                await side.wait_for_reply(since=0)
                speak_at = side.slot + 10
                await side.wait_until(lambda: side.slot >= speak_at)
                # The stream dies 150 ms after the caller's last word: before localcloud's final.
                voice_end_ms = speak_at * SLOT_MS + voices["price"].speech_end_offset_ms
                rig.cloud.set_faults(stt_abort_after_s=(voice_end_ms + 150) / 1000, stt_abort_streams=1)
                await side.wait_for_reply(since=await side.speak(voices["price"].audio))
            turns = rig.turns(side.call_sid)
            stats = rig.cloud.stats()

    assert stats["streams_opened"] == 2 and stats["recognize_calls"] == 0, "one stream died; streaming went on"
    assert answered(turns) == [(PRICE_LINE, PRICE_REPLY)]


async def test_streams_that_keep_dying_are_retried_with_back_off_not_in_a_tight_loop(base_config, voices):
    async with open_rig(fault_config(base_config), (OPEN_LINE,)) as rig:
        rig.cloud.set_faults(stt_abort_after_s=2.0)  # every stream, replayed audio included
        with trio.fail_after(GUARD_S):
            report = await place_call(rig.url, [voices["open"]], business="acme")
            await rig.call_record(report.call_sid)
        turns = rig.turns(report.call_sid)
        stats = rig.cloud.stats()

    assert stats["streams_opened"] <= 3, "three attempts, then the fallback (no reconnect storm)"
    assert answered(turns) == [(OPEN_LINE, OPEN_REPLY)]


async def test_a_recognizer_restarted_on_the_same_port_loses_no_turn(base_config, voices):
    async with open_rig(fault_config(base_config), (PRICE_LINE, BYE_LINE)) as rig:
        cloud = rig.cloud
        grpc_port = int(cloud.grpc_target.rsplit(":", 1)[1])
        http_port = int(cloud.http_base_url.rsplit(":", 1)[1].split("/")[0])
        cloud.configure(grpc_port=grpc_port, http_port=http_port)  # the next start binds the same ports
        with trio.fail_after(GUARD_S):
            async with open_twilio_side(rig.url) as side:
                await side.wait_for_reply(since=0)
                side.say(voices["price"].audio)
                await side.wait_until(lambda: side.frames_left < len(voices["price"].audio) // 2 // 160)
                await trio.to_thread.run_sync(cloud.stop)  # mid-utterance: the recognizer goes away...
                await trio.sleep(1.0)  # ...for a second (an outage's length, not a measurement)
                await trio.to_thread.run_sync(cloud.start)
                assert cloud.grpc_target.endswith(f":{grpc_port}")
                await side.wait_for_reply(since=await side.said())
                await side.wait_for_reply(since=await side.speak(voices["bye"].audio))
            turns = rig.turns(side.call_sid)

    assert answered(turns) == [(PRICE_LINE, PRICE_REPLY), (BYE_LINE, BYE_REPLY)]


async def test_when_streams_cannot_open_the_fallback_answers_until_streaming_is_retried(base_config, voices):
    async with open_rig(fault_config(base_config), (PRICE_LINE, OPEN_LINE, BYE_LINE)) as rig:
        rig.cloud.set_faults(stt_fail_opens=3)
        with trio.fail_after(GUARD_S):
            # The first reply is long: streaming is retried (10 s after it gave up) before the last turn.
            report = await place_call(rig.url, [voices["price"], voices["open"], voices["bye"]], business="acme")
            await rig.call_record(report.call_sid)
        turns = rig.turns(report.call_sid)
        stats = rig.cloud.stats()

    assert answered(turns) == [
        (PRICE_LINE, PRICE_REPLY), (OPEN_LINE, OPEN_REPLY), (BYE_LINE, BYE_REPLY)]
    assert stats["streams_opened"] == 4, "three failed opens, then streaming was retried and stayed up"
    assert 1 <= stats["recognize_calls"] < 3, "the first turn went through Recognize, the last one streamed"
    assert "stt_recognize" in turns[0]["fallbacks"] and "stt_recognize" not in turns[-1]["fallbacks"]
