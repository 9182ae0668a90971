"""Specification of the phone conversation's rows (agentd/fsm.py): keypad entries, the idle
caller, and the model ending or transferring the call.

Every FSM runs the shipped settings (etc/agentd.toml): digits complete after 3 s without a
press, a silent caller is reprompted 8 s after the agent stopped, twice, then hears goodbye.
"""

from __future__ import annotations

import dataclasses
import random

from pytest import approx

from agentd.dtmf import digits_message
from agentd.fsm import (
    GOODBYE, HUNG_UP, SILENT, TRANSFERRED, AgentEnds, BeginPlayback, CallFSM, CallStarted, CancelReply, EndCall,
    Ending, Final, KeyPressed, Partial, PlaybackDone, PlayGoodbye, PlayLine, ReplyAudioReady, ReplyFinished,
    ReplyQueued, SpeechEnded, SpeechStarted, StartReply, State, StopPlayback, Tick, Timer,
)
from fsm_helpers import DEFAULTS, RNG_SEED, thinking_fsm, tick_until_quiet

FRONT_DESK = "+15555550100"
KEYPAD = {"0": Ending(TRANSFERRED, "handoff", FRONT_DESK), "9": Ending(HUNG_UP)}


def phone_fsm(**settings) -> CallFSM:
    """A call of a business with a reprompt line and keypad actions 0 (front desk) and 9 (hang up)."""
    return CallFSM(dataclasses.replace(DEFAULTS, **settings), rng=random.Random(RNG_SEED), keypad=KEYPAD,
                   reprompt=True)


def greeted(now: float = 5.0, **settings) -> CallFSM:
    """The greeting finished playing at ``now``: the floor is the caller's."""
    fsm = phone_fsm(**settings)
    fsm.handle(CallStarted(at=now - 3.0))
    fsm.handle(PlaybackDone(at=now, reply=0))
    assert fsm.state is State.REFRACTORY
    return fsm


def listening(now: float = 10.0) -> CallFSM:
    fsm = greeted(now=now - DEFAULTS.refractory_s)
    assert fsm.handle(Tick(at=now)) == []
    assert fsm.state is State.LISTENING
    return fsm


def starts(actions) -> list[StartReply]:
    return [a for a in actions if isinstance(a, StartReply)]


# ------------------------------------------------------------------ keypad ---


def test_digits_completed_by_the_inter_digit_timeout_become_the_callers_turn():
    fsm = listening(now=10.0)
    assert fsm.handle(KeyPressed(at=10.0, digit="1")) == []
    assert fsm.handle(KeyPressed(at=11.0, digit="2")) == []
    assert fsm.next_deadline() == approx(11.0 + DEFAULTS.dtmf_digit_timeout_s)
    assert tick_until_quiet(fsm, 13.9) == [], "no entry is complete before the timeout"
    [start] = starts(fsm.handle(Tick(at=14.0)))
    assert start.text == digits_message("12")
    assert fsm.state is State.THINKING


def test_the_pound_key_ends_an_entry_at_once_and_is_not_part_of_it():
    fsm = listening(now=10.0)
    for at, digit in ((10.0, "4"), (10.3, "2")):
        fsm.handle(KeyPressed(at=at, digit=digit))
    [start] = starts(fsm.handle(KeyPressed(at=10.6, digit="#")))
    assert start.text == digits_message("42") and fsm.state is State.THINKING
    assert Timer.DTMF.value not in repr(fsm), "the finished entry leaves no timer behind"


def test_a_stray_pound_key_is_no_turn():
    fsm = listening(now=10.0)
    assert fsm.handle(KeyPressed(at=10.0, digit="#")) == []
    assert fsm.state is State.LISTENING


def test_digits_during_agent_speech_stop_it_and_become_the_next_turn():
    fsm = thinking_fsm(now=14.0)
    fsm.handle(ReplyAudioReady(at=14.5, reply=1))
    assert fsm.handle(Tick(at=15.0)) == [BeginPlayback(reply=1)]
    assert fsm.handle(KeyPressed(at=15.5, digit="7")) == [], "the reply keeps playing while keys come"
    assert fsm.state is State.SPEAKING
    actions = fsm.handle(KeyPressed(at=16.0, digit="#"))
    assert actions[:2] == [StopPlayback(), CancelReply(reply=1)]
    assert [s.text for s in starts(actions)] == [digits_message("7")]
    assert fsm.state is State.THINKING


def test_an_entry_begun_while_the_agent_speaks_survives_the_reply_ending():
    fsm = thinking_fsm(now=14.0)
    fsm.handle(ReplyAudioReady(at=14.5, reply=1))
    fsm.handle(Tick(at=15.0))
    fsm.handle(KeyPressed(at=15.2, digit="3"))
    fsm.handle(PlaybackDone(at=15.4, reply=1))
    assert fsm.state is State.REFRACTORY
    [start] = starts(tick_until_quiet(fsm, 15.2 + DEFAULTS.dtmf_digit_timeout_s))
    assert start.text == digits_message("3")


def test_digits_while_a_reply_is_prepared_join_the_turn_it_answers():
    fsm = phone_fsm()
    fsm.handle(CallStarted(at=0.0))
    fsm.handle(PlaybackDone(at=2.0, reply=0))
    tick_until_quiet(fsm, 3.0)
    fsm.handle(SpeechStarted(at=3.0))
    fsm.handle(SpeechEnded(at=4.0))
    fsm.handle(Final(at=4.1, text="my account number is", audio_end_at=4.0))
    tick_until_quiet(fsm, 6.0)
    assert fsm.state is State.THINKING
    fsm.handle(KeyPressed(at=6.1, digit="5"))
    actions = fsm.handle(KeyPressed(at=6.2, digit="#"))
    assert CancelReply(reply=1, resumes_turn=True) in actions, "the words rejoin the turn"
    [start] = starts(actions)
    assert start.text == f"my account number is {digits_message('5')}"


def test_a_mapped_single_digit_transfers_after_the_handoff_line():
    fsm = listening(now=10.0)
    assert fsm.handle(KeyPressed(at=10.0, digit="0")) == [PlayGoodbye(line="handoff")]
    assert fsm.state is State.CLOSING
    fsm.handle(ReplyQueued(at=10.1, reply=GOODBYE, playout_s=1.0))
    assert fsm.handle(PlaybackDone(at=11.2, reply=GOODBYE)) == [
        ReplyFinished(reply=GOODBYE), EndCall(reason=TRANSFERRED, transfer_to=FRONT_DESK)]


def test_a_mapped_digit_inside_an_entry_is_just_a_digit():
    fsm = listening(now=10.0)
    fsm.handle(KeyPressed(at=10.0, digit="1"))
    assert fsm.handle(KeyPressed(at=10.2, digit="0")) == []
    [start] = starts(fsm.handle(KeyPressed(at=10.4, digit="#")))
    assert start.text == digits_message("10")


def test_a_mapped_digit_during_the_greeting_stops_it_and_says_goodbye():
    fsm = phone_fsm()
    fsm.handle(CallStarted(at=0.0))
    assert fsm.handle(KeyPressed(at=1.0, digit="9")) == [StopPlayback(), CancelReply(reply=0),
                                                         PlayGoodbye(line="goodbye")]
    assert fsm.state is State.CLOSING


# -------------------------------------------------------------- idle caller ---


def test_a_silent_caller_is_reprompted_then_hears_goodbye_after_the_last_reprompt():
    fsm = greeted(now=5.0)
    idle = DEFAULTS.idle_reprompt_s
    actions = tick_until_quiet(fsm, 5.0 + idle)
    assert actions == [PlayLine(reply=1, line="reprompt")] and fsm.state is State.SPEAKING
    fsm.handle(ReplyQueued(at=13.1, reply=1, playout_s=1.0))
    fsm.handle(PlaybackDone(at=14.0, reply=1))
    assert tick_until_quiet(fsm, 14.0 + idle) == [PlayLine(reply=2, line="reprompt")]
    fsm.handle(PlaybackDone(at=23.0, reply=2))
    assert tick_until_quiet(fsm, 23.0 + idle - 0.01) == [], "each reprompt gets the whole idle wait"
    assert tick_until_quiet(fsm, 23.0 + idle) == [PlayGoodbye(line="goodbye")]
    assert fsm.state is State.CLOSING
    assert fsm.handle(PlaybackDone(at=33.0, reply=GOODBYE))[-1] == EndCall(reason=SILENT)


def test_a_caller_who_answers_the_reprompt_starts_the_count_over():
    fsm = greeted(now=5.0)
    tick_until_quiet(fsm, 13.0)
    fsm.handle(PlaybackDone(at=14.0, reply=1))
    tick_until_quiet(fsm, 14.5)
    fsm.handle(SpeechStarted(at=15.0))
    fsm.handle(Partial(at=15.5, text="yes I'm here", audio_end_at=15.4))
    fsm.handle(SpeechEnded(at=16.0))
    tick_until_quiet(fsm, 18.0)
    assert fsm.state is State.THINKING, "their words are a turn"
    fsm.handle(ReplyAudioReady(at=18.5, reply=2))
    tick_until_quiet(fsm, 19.0)
    fsm.handle(PlaybackDone(at=20.0, reply=2))
    idle = DEFAULTS.idle_reprompt_s
    assert starts(tick_until_quiet(fsm, 20.0 + idle)) == []
    assert fsm.state is State.SPEAKING and fsm.reply == 3, "a fresh reprompt, not the goodbye"


def test_noise_without_words_does_not_count_as_the_caller_answering():
    fsm = greeted(now=5.0)
    fsm.handle(SpeechStarted(at=7.0))
    fsm.handle(SpeechEnded(at=7.3))  # a cough: no words ever come
    actions = tick_until_quiet(fsm, 5.0 + DEFAULTS.idle_reprompt_s)
    assert actions[-1] == PlayLine(reply=1, line="reprompt")


def test_without_a_reprompt_line_a_silent_caller_is_left_be():
    fsm = CallFSM(DEFAULTS, rng=random.Random(RNG_SEED))
    fsm.handle(CallStarted(at=0.0))
    fsm.handle(PlaybackDone(at=2.0, reply=0))
    assert tick_until_quiet(fsm, 200.0) == [] and fsm.state is State.LISTENING


# ---------------------------------------------------- the model ends the call ---


def speaking_reply(now: float = 16.0) -> CallFSM:
    fsm = thinking_fsm(now=now - 2.0)
    fsm.handle(ReplyAudioReady(at=now - 1.0, reply=1))
    assert fsm.handle(Tick(at=now)) == [BeginPlayback(reply=1)]
    return fsm


def test_end_call_after_words_finishes_them_uninterrupted_then_hangs_up_without_a_goodbye():
    fsm = speaking_reply(now=16.0)
    assert fsm.handle(AgentEnds(at=16.2, reply=1, spoke=True)) == []
    assert fsm.state is State.CLOSING
    fsm.handle(SpeechStarted(at=16.3))
    assert tick_until_quiet(fsm, 18.0) == [], "the caller cannot interrupt the last words"
    fsm.handle(ReplyQueued(at=16.4, reply=1, playout_s=2.0))
    assert fsm.handle(PlaybackDone(at=18.5, reply=1)) == [ReplyFinished(reply=1), EndCall(reason=HUNG_UP)]


def test_end_call_as_the_only_output_says_the_goodbye_line():
    fsm = thinking_fsm(now=14.0)
    assert fsm.handle(AgentEnds(at=14.3, reply=1)) == []
    fsm.handle(ReplyAudioReady(at=14.4, reply=1))  # the empty reply
    assert tick_until_quiet(fsm, 15.0) == [BeginPlayback(reply=1)]
    assert fsm.state is State.CLOSING
    assert fsm.handle(PlaybackDone(at=15.0, reply=1)) == [ReplyFinished(reply=1), PlayGoodbye(line="goodbye")]
    assert fsm.handle(PlaybackDone(at=17.0, reply=GOODBYE))[-1] == EndCall(reason=HUNG_UP)


def test_a_transfer_says_the_handoff_line_then_ends_with_the_number():
    fsm = speaking_reply(now=16.0)
    fsm.handle(AgentEnds(at=16.2, reply=1, transfer_to=FRONT_DESK, spoke=True))
    assert fsm.handle(PlaybackDone(at=17.0, reply=1)) == [ReplyFinished(reply=1), PlayGoodbye(line="handoff")]
    assert fsm.handle(PlaybackDone(at=19.0, reply=GOODBYE))[-1] == EndCall(reason=TRANSFERRED,
                                                                          transfer_to=FRONT_DESK)


def test_the_last_words_whose_marks_never_come_back_still_end_the_call():
    fsm = speaking_reply(now=16.0)
    fsm.handle(AgentEnds(at=16.2, reply=1, spoke=True))
    fsm.handle(ReplyQueued(at=16.4, reply=1, playout_s=1.0))
    actions = tick_until_quiet(fsm, 30.0)
    assert actions == [ReplyFinished(reply=1, marks_lost=True), EndCall(reason=HUNG_UP)]


def test_an_ending_of_a_reply_the_caller_talked_over_is_dropped():
    fsm = thinking_fsm(now=14.0)
    fsm.handle(SpeechStarted(at=14.1))
    fsm.handle(Partial(at=14.4, text="wait actually", audio_end_at=14.3))
    tick_until_quiet(fsm, 15.0)
    assert fsm.state is State.LISTENING, "the caller took the turn back"
    assert fsm.handle(AgentEnds(at=15.1, reply=1)) == []
    assert fsm.state is State.LISTENING
