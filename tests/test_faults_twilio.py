"""Faults on Twilio's side of a call, and barge-in correctness, over real sockets.

`TwilioSide` (test_faults_rig) plays Twilio: the test decides when the caller
speaks, hangs up or loses the line, and whether marks come back. It waits on
what it observed (agent audio played, marks sent), never on a stopwatch; the
time bounds are the spec's own: a call gives back everything it held within
1 s of ending, and a line with no message for `server.media_timeout_ms` is ended.
"""

from __future__ import annotations

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
    Resources,
    Rig,
    TwilioSide,
    caller_voices,
    fault_config,
    open_rig,
    open_twilio_side,
    wait_until_released,
)

from agentd.testbed.softphone.playback import SLOT_MS


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    return caller_voices(tmp_path_factory.mktemp("voices"))


# --------------------------------------------------------- the call ends, abruptly ---


async def test_when_the_line_drops_mid_reply_the_call_gives_back_everything(base_config, voices):
    async with open_rig(fault_config(base_config), (OPEN_LINE,)) as rig:
        with trio.fail_after(GUARD_S):
            baseline = Resources.now(rig.cloud)
            async with open_twilio_side(rig.url) as side:
                await side.wait_for_reply(since=0)  # the greeting
                turn_at = side.slot
                side.say(voices["open"].audio)
                await side.wait_until(lambda: side.played_since(turn_at) >= 10)  # 200 ms into the reply
                held_during_call = Resources.now(rig.cloud)
                await side.drop()
            released = await wait_until_released(rig.cloud, baseline)
            call = await rig.call_record(side.call_sid)

    assert held_during_call.stt_streams == 1 and held_during_call.tasks > baseline.tasks
    assert released == baseline, "tasks, threads and gRPC streams are gone within 1 s of the drop"
    assert call["states"][-2:] == ["SPEAKING", "ENDED"], "the line dropped while the agent spoke"


async def test_a_stop_mid_turn_ends_the_call_and_its_pending_llm_request(base_config, voices):
    async with open_rig(fault_config(base_config), (OPEN_LINE,)) as rig:
        rig.cloud.set_faults(llm_stall_first_token=True)  # answers only when the client hangs up
        with trio.fail_after(GUARD_S):
            baseline = Resources.now(rig.cloud)
            async with open_twilio_side(rig.url) as side:
                await side.wait_for_reply(since=0)
                side.say(voices["open"].audio)
                # A (draft or final) request for this turn is waiting on the LLM.
                await side.wait_until(lambda: rig.cloud.stats()["active_chats"] > 0)
                held_during_call = Resources.now(rig.cloud)
                await side.hang_up()
            released = await wait_until_released(rig.cloud, baseline)
            call = await rig.call_record(side.call_sid)

    assert held_during_call.chat_requests == 1 and held_during_call.stt_streams == 1
    assert released == baseline, "the chat request, the STT stream and every task end within 1 s of `stop`"
    assert side.close_code == 1000, "the agent closed the socket normally"
    assert call["states"][-1] == "ENDED" and "SPEAKING" not in call["states"], "nothing was said after `stop`"


# ----------------------------------------------- the line goes quiet, never closed ---

QUIET_MS = 1000  # server.media_timeout_ms here: short, yet far above any scheduling hiccup of the 20 ms line


async def test_when_twilio_goes_quiet_mid_reply_the_agent_ends_the_call(base_config, voices, caplog):
    # A half-open connection: Twilio's side sends nothing more, yet the socket never closes.
    config = fault_config(base_config, **{"server.media_timeout_ms": QUIET_MS})
    async with open_rig(config, (PRICE_LINE,)) as rig:
        with trio.fail_after(GUARD_S):
            baseline = Resources.now(rig.cloud)
            async with open_twilio_side(rig.url) as side:
                await side.wait_for_reply(since=0)
                turn_at = side.slot
                side.say(voices["price"].audio)
                await side.wait_until(lambda: side.played_since(turn_at) >= 10)  # 200 ms into the reply
                side.go_quiet()
                with trio.move_on_after(10 * QUIET_MS / 1000):  # a bound, so a missing watchdog fails fast
                    await side.wait_until(lambda: side.close_code is not None)
            released = await wait_until_released(rig.cloud, baseline)
            call = await rig.call_record(side.call_sid)

    assert (side.close_code, side.close_reason) == (1000, f"no media for {QUIET_MS} ms"), "the agent ends the call"
    assert released == baseline, "tasks, threads, the STT stream and the chat request are gone"
    assert call["end_reason"] == f"no media for {QUIET_MS} ms"
    assert call["states"][-2:] == ["SPEAKING", "ENDED"], "the line went quiet while the agent spoke"
    [why] = [r for r in caplog.records if r.getMessage().startswith(f"call={side.call_sid} ended:")]
    assert why.levelname == "WARNING" and f"no message from Twilio for {QUIET_MS} ms" in why.getMessage()


async def test_a_silent_caller_during_a_long_reply_keeps_the_call(base_config, voices):
    # Twilio streams line silence every 20 ms while the agent talks: that is a live line.
    config = fault_config(base_config, **{"server.media_timeout_ms": QUIET_MS})
    async with open_rig(config, (PRICE_LINE,)) as rig:
        with trio.fail_after(GUARD_S):
            async with open_twilio_side(rig.url) as side:
                await side.wait_for_reply(since=0)
                turn_at = await side.speak(voices["price"].audio)
                await side.wait_for_reply(since=turn_at)  # the whole reply, then 700 ms of quiet
                still_open = side.close_code is None
            call = await rig.call_record(side.call_sid)
            [turn] = rig.turns(side.call_sid)

    assert side.played_since(turn_at) * SLOT_MS > 3 * QUIET_MS, "the reply lasted several media timeouts"
    assert still_open, f"the agent hung up on a live line: {side.close_reason}"
    assert turn["reply_text"] == PRICE_REPLY and not turn["interrupted"]
    assert call["end_reason"] == "stop", "the caller hung up, not the agent"


# ------------------------------------------------------------- marks never return ---


async def call_with_marks_never_echoed(config, voices) -> tuple[Rig, TwilioSide, list[dict]]:
    """The caller asks "open" then says "bye", each after the agent's previous reply; Twilio echoes no mark."""
    async with open_rig(config, (OPEN_LINE, BYE_LINE)) as rig:
        with trio.fail_after(GUARD_S):
            async with open_twilio_side(rig.url, echo_marks=False) as side:
                await side.wait_for_reply(since=0)
                for turn in ("open", "bye"):
                    await side.wait_for_reply(since=await side.speak(voices[turn].audio))
            turns = rig.turns(side.call_sid)
    return rig, side, turns


async def test_when_marks_never_come_back_each_reply_still_ends_and_the_call_goes_on(base_config, voices):
    # A short mark timeout, so a caller who waits as long as a person does finds the agent listening.
    config = fault_config(base_config, **{"audio.mark_timeout_ms": 400})
    rig, side, turns = await call_with_marks_never_echoed(config, voices)

    assert side.marks_sent and not side.marks_echoed, "Twilio never echoed a mark"
    assert side.clears == [], "the caller's turns were taken as turns, not as interruptions"
    assert [(t["caller_text"], t["reply_text"], t["interrupted"]) for t in turns] == [
        (OPEN_LINE, OPEN_REPLY, False), (BYE_LINE, BYE_REPLY, False)]
    assert rig.history_sent() == [("user", OPEN_LINE), ("assistant", OPEN_REPLY), ("user", BYE_LINE)]


async def test_when_marks_never_come_back_a_reply_heard_in_full_stays_in_history(base_config, voices):
    rig, _, turns = await call_with_marks_never_echoed(fault_config(base_config), voices)

    assert [t["caller_text"] for t in turns] == [OPEN_LINE, BYE_LINE]
    assert rig.history_sent() == [("user", OPEN_LINE), ("assistant", OPEN_REPLY), ("user", BYE_LINE)]


# ------------------------------------------------------------------------ barge-in ---


async def test_after_a_barge_in_history_keeps_only_what_was_heard_before_the_clear(base_config, voices):
    # Twilio holds the whole reply (a 2.4 s lead), so marks are pending there when `clear` comes.
    config = fault_config(base_config, **{"audio.tx_lead_frames": 120})
    async with open_rig(config, (PRICE_LINE, BYE_LINE)) as rig:
        with trio.fail_after(GUARD_S):
            async with open_twilio_side(rig.url) as side:
                await side.wait_for_reply(since=0)
                side.say(voices["price"].audio)
                # "Sure." has played (r1-1 came back); the long second piece is playing and
                # its mark r1-2 already waits in Twilio's buffer: now the caller talks over it.
                await side.wait_until(lambda: "r1-1" in side.marks_echoed and "r1-2" in side.marks_sent)
                await side.wait_for_reply(since=await side.speak(voices["bye"].audio))
            turns = rig.turns(side.call_sid)

    assert len(side.clears) == 1 and "r1-2" in side.echoed_by_clear, "the clear echoed the pending mark"
    assert turns[0]["interrupted"] and turns[0]["caller_text"] == PRICE_LINE
    assert rig.history_sent() == [("user", PRICE_LINE), ("assistant", "Sure."), ("user", BYE_LINE)], \
        "the reply is cut to the pieces heard before the clear; marks echoed by the clear do not count"
    assert turns[1]["reply_text"] == BYE_REPLY


async def test_an_echo_at_the_start_of_agent_audio_does_not_interrupt(base_config, voices):
    await _assert_reply_not_interrupted(base_config, voices, sound="blip", when="first_frame", words=True)


async def test_speech_shorter_than_barge_in_min_does_not_interrupt(base_config, voices):
    await _assert_reply_not_interrupted(base_config, voices, sound="blip", when="first_mark", words=True)


async def test_speech_with_no_words_does_not_interrupt(base_config, voices):
    await _assert_reply_not_interrupted(base_config, voices, sound="open", when="first_mark", words=False)


async def _assert_reply_not_interrupted(base_config, voices, *, sound: str, when: str, words: bool) -> None:
    """The caller makes `sound` while reply 1 plays -- at its first frame or after its first
    mark -- and the recognizer hears `words` in it or not: the reply must play to its end."""
    script = (OPEN_LINE, "yes" if words else "")
    async with open_rig(fault_config(base_config), script) as rig:
        with trio.fail_after(GUARD_S):
            async with open_twilio_side(rig.url) as side:
                await side.wait_for_reply(since=0)
                turn_at = side.slot
                side.say(voices["open"].audio)
                if when == "first_frame":
                    await side.wait_until(lambda: side.played_since(turn_at + 1) > 0 and not side.saying)
                else:
                    await side.wait_until(lambda: "r1-1" in side.marks_echoed)
                side.say(voices[sound].audio)
                await side.wait_until(lambda: "r1-2" in side.marks_echoed or bool(side.clears))
            turns = rig.turns(side.call_sid)

    assert side.clears == [], f"a {sound!r} {'with' if words else 'without'} words must not interrupt the reply"
    assert turns[0]["reply_text"] == OPEN_REPLY and not turns[0]["interrupted"]
