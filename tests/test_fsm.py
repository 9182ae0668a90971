"""Specification of the call state machine (agentd/fsm.py).

Each test states one rule, drives the FSM through ``handle`` with explicit
``at`` times, and checks the returned actions and the state after every event
that matters. Timers are driven with ``Tick(at=...)`` and ``next_deadline()``;
nothing here reads a clock, except the last section, which runs the FSM
under Trio's MockClock the way the call driver does.

Every FSM starts from the shipped settings (etc/agentd.toml). Numbers
(seconds): min_utt 0.6, silence 0.5 (utterance < 2 s) or 1.8, hangover 0.22,
final timeout 0.32, fallback timeout 5.0, refractory 1.1, breath 0.05-0.12,
barge-in 0.3 (+0.22 to confirm it, after a 0.25 echo guard, words required),
filler after 1.2, early finalize and speculation on.

Tests of the basic turn rules that the shipped latency and echo refinements
would change run the PLAIN variant and say so; tests/test_fsm_latency.py
specifies those refinements.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pytest import approx

from agentd.fsm import (
    BeginPlayback, CallFSM, CallStarted, CancelReply, Final, FsmError, Hangup, Partial, PlayGreeting,
    PlaybackDone, ReplyAudioReady, ReplyFinished, SpeechEnded, SpeechStarted, StartReply, State, SttLost, SttReady,
    StopPlayback, Tick, TranscribeFallback,
)
from fsm_helpers import (
    BUILDERS, EVENT_TYPES, RNG_SEED, drive_under_trio_clock, ended_fsm, finalizing_fsm, greeting_fsm, listening_fsm, new_fsm,
    refractory_fsm, sample_event, speaking_fsm, thinking_fsm, tick_until_quiet,
)

INF = float("inf")
#: The basic turn rules: no echo guard or confirmation delay on barge-in, no words needed to
#: interrupt, no early finalize, no speculation, no filler.
PLAIN = dict(barge_in_guard_s=0.0, barge_in_confirm_s=0.0, barge_in_requires_words=False,
             early_finalize=False, spec_enabled=False, filler_after_s=0.0)
G, R, L, F, T, H, S, C, E = (State.GREETING, State.REFRACTORY, State.LISTENING, State.FINALIZING,
                             State.THINKING, State.HOLDING, State.SPEAKING, State.CLOSING, State.ENDED)


def at_deadline(fsm: CallFSM) -> list:
    """Tick exactly at the next deadline (what a punctual driver does)."""
    return fsm.handle(Tick(at=fsm.next_deadline()))


# ------------------------------------------------------------- GREETING ---


def test_call_start_plays_the_greeting():
    fsm = new_fsm()
    assert fsm.next_deadline() == INF
    assert fsm.handle(CallStarted(at=0.0)) == [PlayGreeting()]
    assert fsm.state is G
    assert fsm.next_deadline() == INF


def test_the_end_of_the_greeting_opens_the_refractory_window():
    fsm = greeting_fsm(now=0.0)
    assert fsm.handle(PlaybackDone(at=3.0, reply=0)) == [ReplyFinished(reply=0)]
    assert fsm.state is R
    assert fsm.next_deadline() == approx(4.1)


def test_sustained_speech_interrupts_the_greeting_and_opens_the_turn_at_its_start():
    fsm = greeting_fsm(now=0.0, **PLAIN)
    assert fsm.handle(SpeechStarted(at=1.0)) == []
    assert fsm.next_deadline() == approx(1.3)
    assert fsm.handle(Tick(at=1.29)) == []
    assert fsm.state is G
    assert fsm.handle(Tick(at=1.3)) == [StopPlayback(), CancelReply(reply=0)]
    assert fsm.state is L
    fsm.handle(Final(at=1.9, text="is this the bakery", audio_end_at=1.8))
    assert fsm.handle(SpeechEnded(at=2.0)) == []
    assert at_deadline(fsm) == [
        StartReply(reply=1, text="is this the bakery", speech_start_at=1.0, speech_end_at=2.0)
    ]
    assert fsm.state is T


def test_a_short_sound_during_the_greeting_does_not_interrupt_it():
    fsm = greeting_fsm(now=0.0)
    fsm.handle(SpeechStarted(at=1.0))
    assert fsm.handle(SpeechEnded(at=1.2)) == []
    assert fsm.next_deadline() == INF
    assert fsm.handle(Tick(at=1.5)) == []
    assert fsm.state is G


def test_words_heard_during_the_greeting_belong_to_the_interrupting_turn():
    fsm = greeting_fsm(now=0.0, **PLAIN)
    fsm.handle(SpeechStarted(at=1.0))
    assert fsm.handle(Partial(at=1.2, text="hello", audio_end_at=1.2)) == []
    assert fsm.state is G
    assert fsm.handle(Tick(at=1.3)) == [StopPlayback(), CancelReply(reply=0)]
    assert fsm.transcript == "hello"


def test_without_greeting_barge_in_speech_during_the_greeting_is_held_until_the_window_closes():
    fsm = greeting_fsm(now=0.0, greeting_barge_in=False, **PLAIN)
    assert fsm.handle(SpeechStarted(at=2.0)) == []
    assert fsm.next_deadline() == INF
    assert fsm.handle(PlaybackDone(at=3.0, reply=0)) == [ReplyFinished(reply=0)]
    assert fsm.state is R
    assert fsm.handle(Tick(at=4.1)) == []
    assert fsm.state is L
    fsm.handle(Final(at=4.4, text="sorry who is this", audio_end_at=4.4))
    fsm.handle(SpeechEnded(at=4.5))
    assert at_deadline(fsm) == [
        StartReply(reply=1, text="sorry who is this", speech_start_at=2.0, speech_end_at=4.5)
    ]


def test_with_barge_in_disabled_the_greeting_is_never_interrupted():
    fsm = greeting_fsm(now=0.0, barge_in_enabled=False)
    assert fsm.handle(SpeechStarted(at=1.0)) == []
    assert fsm.next_deadline() == INF
    assert fsm.handle(Tick(at=2.5)) == []
    assert fsm.state is G


def test_a_mark_of_another_reply_does_not_end_the_greeting():
    fsm = greeting_fsm(now=0.0)
    assert fsm.handle(PlaybackDone(at=3.0, reply=1)) == []
    assert fsm.state is G
    assert fsm.next_deadline() == INF


# ----------------------------------------------------------- REFRACTORY ---


def test_listening_starts_when_the_refractory_window_closes():
    fsm = refractory_fsm(now=5.0)
    assert fsm.handle(Tick(at=6.0)) == []
    assert fsm.state is R
    assert fsm.handle(Tick(at=6.1)) == []
    assert fsm.state is L
    assert fsm.next_deadline() == INF


def test_speech_in_the_window_is_held_and_counts_from_its_real_start():
    fsm = refractory_fsm(now=5.0, **PLAIN)
    assert fsm.handle(SpeechStarted(at=5.4)) == []
    assert fsm.state is R
    assert fsm.next_deadline() == approx(6.1)  # holding speech does not move the window
    assert at_deadline(fsm) == []
    assert fsm.state is L
    assert fsm.next_deadline() == INF  # still speaking
    fsm.handle(SpeechEnded(at=6.6))
    fsm.handle(Final(at=6.8, text="can I book a table", audio_end_at=6.6))
    assert fsm.next_deadline() == approx(7.1)
    assert at_deadline(fsm) == [
        StartReply(reply=1, text="can I book a table", speech_start_at=5.4, speech_end_at=6.6)
    ]


def test_speech_that_ended_inside_the_window_is_timed_from_its_end_once_the_window_closes():
    fsm = refractory_fsm(now=5.0)
    fsm.handle(SpeechStarted(at=5.1))
    assert fsm.handle(SpeechEnded(at=5.9)) == []
    assert fsm.state is R
    assert fsm.handle(Tick(at=6.1)) == []
    assert fsm.state is L
    assert fsm.next_deadline() == approx(6.4)  # 0.5 s after the last voiced instant
    assert at_deadline(fsm) == []
    assert fsm.state is F  # 0.8 s of speech, words may still come


def test_a_blip_held_in_the_window_is_dropped_as_noise_when_the_window_closes():
    fsm = refractory_fsm(now=5.0)
    fsm.handle(SpeechStarted(at=5.1))
    fsm.handle(SpeechEnded(at=5.3))
    assert fsm.handle(Tick(at=6.1)) == []
    assert fsm.state is L
    assert fsm.next_deadline() == INF


def test_words_in_the_window_open_listening_at_once():
    fsm = refractory_fsm(now=5.0, **PLAIN)
    fsm.handle(SpeechStarted(at=5.2))
    assert fsm.handle(Partial(at=5.6, text="can I", audio_end_at=5.6)) == []
    assert fsm.state is L
    assert fsm.next_deadline() == INF  # the caller is still speaking
    fsm.handle(SpeechEnded(at=6.0))
    fsm.handle(Final(at=6.2, text="can I pay by card", audio_end_at=6.0))
    assert fsm.handle(Tick(at=6.5)) == [
        StartReply(reply=1, text="can I pay by card", speech_start_at=5.2, speech_end_at=6.0)
    ]


def test_a_final_in_the_window_without_vad_speech_is_a_turn():
    fsm = refractory_fsm(now=5.0)
    assert fsm.handle(Final(at=5.5, text="yes", audio_end_at=5.4)) == []
    assert fsm.state is L
    assert fsm.next_deadline() == approx(6.0)
    assert at_deadline(fsm) == [StartReply(reply=1, text="yes", speech_start_at=5.5, speech_end_at=5.5)]


@pytest.mark.parametrize("result", [
    Final(at=5.5, text="", audio_end_at=5.4),
    Partial(at=5.5, text="  ", audio_end_at=5.4),
])
def test_a_result_without_words_keeps_the_window_open(result):
    fsm = refractory_fsm(now=5.0)
    assert fsm.handle(result) == []
    assert fsm.state is R
    assert fsm.next_deadline() == approx(6.1)


def test_a_late_result_of_the_answered_turn_keeps_the_window_open():
    fsm = speaking_fsm(now=16.0)  # reply 1 committed at 15.0
    fsm.handle(PlaybackDone(at=17.0, reply=1))
    assert fsm.handle(Final(at=17.2, text="what time do you open", audio_end_at=14.5)) == []
    assert fsm.state is R
    assert fsm.transcript == ""


# ------------------------------------------------------------ LISTENING ---


def test_silence_after_speech_arms_the_end_of_turn_from_the_last_voiced_instant():
    fsm = listening_fsm(now=10.0)
    assert fsm.handle(SpeechStarted(at=10.5)) == []
    assert fsm.next_deadline() == INF
    assert fsm.handle(SpeechEnded(at=11.5)) == []
    assert fsm.next_deadline() == approx(12.0)
    assert fsm.handle(Tick(at=11.99)) == []
    assert fsm.state is L


def test_the_end_of_turn_commits_at_once_when_the_transcript_is_settled():
    fsm = listening_fsm(now=10.0, **PLAIN)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Final(at=11.4, text="do you deliver", audio_end_at=11.3))
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.handle(Tick(at=12.0)) == [
        StartReply(reply=1, text="do you deliver", speech_start_at=10.5, speech_end_at=11.5)
    ]
    assert fsm.state is T
    assert fsm.reply == 1
    assert fsm.next_deadline() == INF


def test_the_end_of_turn_waits_for_the_final_when_only_a_partial_is_in():
    fsm = listening_fsm(now=10.0)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Partial(at=11.4, text="do you", audio_end_at=11.3))
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.handle(Tick(at=12.0)) == []
    assert fsm.state is F
    assert fsm.next_deadline() == approx(12.32)


def test_a_blip_without_words_is_dropped_and_the_next_utterance_starts_afresh():
    fsm = listening_fsm(now=10.0)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(SpeechEnded(at=10.9))  # 0.4 s < min_utt
    assert fsm.handle(Tick(at=11.4)) == []
    assert fsm.state is L
    assert fsm.next_deadline() == INF
    fsm.handle(SpeechStarted(at=12.0))
    fsm.handle(Final(at=12.9, text="hello", audio_end_at=12.9))
    fsm.handle(SpeechEnded(at=13.0))
    assert at_deadline(fsm) == [StartReply(reply=1, text="hello", speech_start_at=12.0, speech_end_at=13.0)]


def test_a_short_utterance_with_words_is_a_turn():
    fsm = listening_fsm(now=10.0)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Final(at=10.8, text="yes", audio_end_at=10.8))
    fsm.handle(SpeechEnded(at=10.8))  # 0.3 s, but a word
    assert fsm.handle(Tick(at=11.3)) == [
        StartReply(reply=1, text="yes", speech_start_at=10.5, speech_end_at=10.8)
    ]


def test_a_long_utterance_needs_the_long_silence():
    fsm = listening_fsm(now=10.0)
    fsm.handle(SpeechStarted(at=10.2))
    fsm.handle(SpeechEnded(at=12.5))  # 2.3 s
    assert fsm.next_deadline() == approx(14.3)
    assert fsm.handle(Tick(at=13.0)) == []
    assert fsm.state is L


def test_an_utterance_just_under_two_seconds_needs_only_the_short_silence():
    fsm = listening_fsm(now=10.0)
    fsm.handle(SpeechStarted(at=10.2))
    fsm.handle(SpeechEnded(at=12.1))  # 1.9 s
    assert fsm.next_deadline() == approx(12.6)


def test_the_silence_rule_counts_the_whole_utterance_across_pauses():
    fsm = listening_fsm(now=10.0)
    fsm.handle(SpeechStarted(at=10.2))
    fsm.handle(SpeechEnded(at=11.2))
    fsm.handle(SpeechStarted(at=11.5))
    fsm.handle(SpeechEnded(at=12.4))  # 2.2 s since the utterance began
    assert fsm.next_deadline() == approx(14.2)


def test_speech_before_the_deadline_cancels_the_end_of_turn_and_continues_the_utterance():
    fsm = listening_fsm(now=10.0, **PLAIN)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(SpeechEnded(at=11.0))
    assert fsm.handle(SpeechStarted(at=11.3)) == []
    assert fsm.next_deadline() == INF
    fsm.handle(SpeechEnded(at=12.0))
    fsm.handle(Final(at=12.1, text="two coffees please", audio_end_at=12.0))
    assert at_deadline(fsm) == [
        StartReply(reply=1, text="two coffees please", speech_start_at=10.5, speech_end_at=12.0)
    ]


def test_words_arriving_in_the_silence_do_not_push_the_end_of_turn_back():
    fsm = listening_fsm(now=10.0)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.handle(Partial(at=11.8, text="do you deliver", audio_end_at=11.5)) == []
    assert fsm.next_deadline() == approx(12.0)


def test_words_without_vad_speech_open_an_utterance():
    fsm = listening_fsm(now=10.0)
    assert fsm.handle(Partial(at=10.5, text="hello", audio_end_at=10.4)) == []
    assert fsm.state is L
    assert fsm.next_deadline() == approx(11.0)
    assert at_deadline(fsm) == []
    assert fsm.state is F


def test_results_of_an_answered_turn_are_ignored_while_listening():
    fsm = thinking_fsm(now=15.0, **PLAIN)  # committed at 15.0
    fsm.handle(ReplyAudioReady(at=15.5, reply=1))
    tick_until_quiet(fsm, until=16.0)
    fsm.handle(PlaybackDone(at=17.0, reply=1))
    fsm.handle(Tick(at=18.1))
    assert fsm.state is L
    # Google's late final for the words we already answered (audio ends at the commit).
    assert fsm.handle(Final(at=18.3, text="what time do you open", audio_end_at=15.0)) == []
    assert fsm.state is L
    assert fsm.transcript == ""
    assert fsm.next_deadline() == INF


# ---- early finalize

STRONG = "what time do you open tomorrow?"


def test_early_finalize_ends_the_turn_after_the_hangover_when_the_words_look_complete():
    fsm = listening_fsm(now=10.0, **PLAIN | dict(early_finalize=True))
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Partial(at=11.3, text=STRONG, audio_end_at=11.3))
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.next_deadline() == approx(11.72)
    # The words ended the turn, so it is answered at once: their final would only revise history.
    assert at_deadline(fsm) == [
        StartReply(reply=1, text=STRONG, speech_start_at=10.5, speech_end_at=11.5, required_silence_s=0.22)
    ]
    assert fsm.state is T


def test_early_finalize_waits_the_full_silence_when_the_words_dangle():
    fsm = listening_fsm(now=10.0, **PLAIN | dict(early_finalize=True))
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Partial(at=11.3, text="I would like to book a table for the", audio_end_at=11.3))
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.next_deadline() == approx(12.0)


def test_a_strong_partial_arriving_in_the_silence_brings_the_end_of_turn_forward():
    fsm = listening_fsm(now=10.0, early_finalize=True)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.next_deadline() == approx(12.0)
    assert fsm.handle(Partial(at=11.6, text=STRONG, audio_end_at=11.5)) == []
    assert fsm.next_deadline() == approx(11.72)


def test_without_early_finalize_strong_words_wait_the_full_silence():
    fsm = listening_fsm(now=10.0, **PLAIN)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Partial(at=11.3, text=STRONG, audio_end_at=11.3))
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.next_deadline() == approx(12.0)


# ----------------------------------------------------------- FINALIZING ---
# finalizing_fsm(now=12.0, **PLAIN): utterance 10.5 .. 11.5, partial "what time do you".


def test_a_final_while_finalizing_commits_the_turn_at_once():
    fsm = finalizing_fsm(now=12.0, **PLAIN)
    assert fsm.next_deadline() == approx(12.32)
    assert fsm.handle(Final(at=12.1, text="what time do you open", audio_end_at=11.5)) == [
        StartReply(reply=1, text="what time do you open", speech_start_at=10.5, speech_end_at=11.5)
    ]
    assert fsm.state is T
    assert fsm.next_deadline() == INF


def test_the_finals_of_several_segments_are_joined_into_one_turn():
    fsm = listening_fsm(now=10.0)
    fsm.handle(SpeechStarted(at=10.2))
    fsm.handle(Final(at=10.9, text="hello", audio_end_at=10.8))
    fsm.handle(Partial(at=11.4, text="I'd like", audio_end_at=11.4))
    fsm.handle(SpeechEnded(at=11.5))
    assert at_deadline(fsm) == []
    assert fsm.state is F
    assert fsm.handle(Final(at=12.1, text="I'd like a table", audio_end_at=11.5)) == [
        StartReply(reply=1, text="hello I'd like a table", speech_start_at=10.2, speech_end_at=11.5)
    ]


def test_a_newer_partial_while_finalizing_keeps_waiting_for_the_final():
    fsm = finalizing_fsm(now=12.0, **PLAIN)
    assert fsm.handle(Partial(at=12.1, text="what time do you open", audio_end_at=11.5)) == []
    assert fsm.state is F
    assert fsm.next_deadline() == approx(12.32)
    assert fsm.transcript == "what time do you open"


def test_on_final_timeout_the_latest_partial_is_committed():
    fsm = finalizing_fsm(now=12.0, **PLAIN)
    fsm.handle(Partial(at=12.1, text="what time do you open", audio_end_at=11.5))
    assert fsm.handle(Tick(at=12.31)) == []
    assert fsm.handle(Tick(at=12.32)) == [
        StartReply(reply=1, text="what time do you open", speech_start_at=10.5, speech_end_at=11.5)
    ]
    assert fsm.state is T


def test_when_nothing_was_heard_the_final_timeout_returns_to_listening():
    fsm = listening_fsm(now=10.0)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(SpeechEnded(at=11.5))  # a second of sound, no words
    assert fsm.handle(Tick(at=12.0)) == []
    assert fsm.state is F
    assert fsm.handle(Tick(at=12.32)) == []
    assert fsm.state is L
    assert fsm.next_deadline() == INF
    fsm.handle(SpeechStarted(at=13.0))  # the next utterance starts afresh
    fsm.handle(Final(at=13.4, text="hi", audio_end_at=13.4))
    fsm.handle(SpeechEnded(at=13.5))
    assert at_deadline(fsm) == [StartReply(reply=1, text="hi", speech_start_at=13.0, speech_end_at=13.5)]


def test_an_empty_final_when_nothing_was_heard_returns_to_listening():
    fsm = listening_fsm(now=10.0)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(SpeechEnded(at=11.5))
    fsm.handle(Tick(at=12.0))
    assert fsm.handle(Final(at=12.1, text="", audio_end_at=11.5)) == []
    assert fsm.state is L
    assert fsm.next_deadline() == INF


def test_the_caller_resuming_while_finalizing_continues_the_same_turn():
    fsm = finalizing_fsm(now=12.0, **PLAIN)
    assert fsm.handle(SpeechStarted(at=12.1)) == []
    assert fsm.state is L
    assert fsm.next_deadline() == INF
    fsm.handle(Partial(at=12.5, text="what time do you open on sunday", audio_end_at=12.5))
    fsm.handle(SpeechEnded(at=12.8))  # 2.3 s since 10.5: the long silence applies
    assert fsm.next_deadline() == approx(14.6)
    fsm.handle(Final(at=13.0, text="what time do you open on sunday", audio_end_at=12.8))
    assert at_deadline(fsm) == [
        StartReply(reply=1, text="what time do you open on sunday", speech_start_at=10.5, speech_end_at=12.8)
    ]


def test_a_speech_end_while_finalizing_changes_nothing():
    fsm = finalizing_fsm(now=12.0, **PLAIN)
    assert fsm.handle(SpeechEnded(at=12.1)) == []
    assert fsm.state is F
    assert fsm.next_deadline() == approx(12.32)


def test_a_late_final_of_the_answered_turn_does_not_commit_the_next_one():
    fsm = speaking_fsm(now=16.0)  # reply 1 committed at 15.0
    fsm.handle(PlaybackDone(at=17.0, reply=1))
    fsm.handle(Tick(at=18.1))
    fsm.handle(SpeechStarted(at=18.5))
    fsm.handle(Partial(at=19.0, text="and on", audio_end_at=19.0))
    fsm.handle(SpeechEnded(at=19.5))
    fsm.handle(Tick(at=20.0))
    assert fsm.state is F
    assert fsm.handle(Final(at=20.1, text="what time do you open", audio_end_at=14.5)) == []
    assert fsm.state is F
    assert fsm.next_deadline() == approx(20.32)
    assert fsm.transcript == "and on"


# ------------------------------------------------------------- THINKING ---
# thinking_fsm(now=14.0): reply 1 "what time do you open" committed at 14.0, speech 12.5 .. 13.5.


def test_a_reply_ready_within_a_breath_of_the_callers_last_voiced_frame_waits_for_the_rest_of_it():
    """The breath (drawn from the injected rng) is a floor on the gap after the caller's speech."""
    fsm = thinking_fsm(now=14.0, breath_min_s=0.8, breath_max_s=1.2)  # the caller stopped at 13.5
    breath = random.Random(RNG_SEED).uniform(0.8, 1.2)
    assert fsm.handle(ReplyAudioReady(at=14.1, reply=1)) == []
    assert fsm.state is T
    assert fsm.next_deadline() == approx(13.5 + breath)
    assert fsm.handle(Tick(at=13.5 + breath - 0.001)) == []
    assert fsm.state is T
    assert at_deadline(fsm) == [BeginPlayback(reply=1)]
    assert fsm.state is S
    assert fsm.next_deadline() == INF


def test_a_reply_ready_after_a_breath_plays_at_once():
    fsm = thinking_fsm(now=14.0)  # the caller stopped at 13.5; the breath is at most 0.12
    assert fsm.handle(ReplyAudioReady(at=14.3, reply=1)) == []
    assert fsm.next_deadline() == approx(14.3)
    assert at_deadline(fsm) == [BeginPlayback(reply=1)]
    assert fsm.state is S


def test_the_breath_is_uniform_between_the_configured_bounds():
    class RecordingRandom(random.Random):
        def uniform(self, a: float, b: float) -> float:
            self.asked = (a, b)
            return 0.9

    rng = RecordingRandom()
    fsm = thinking_fsm(now=14.0, rng=rng, breath_min_s=0.8, breath_max_s=1.0)
    fsm.handle(ReplyAudioReady(at=14.1, reply=1))
    assert rng.asked == (0.8, 1.0)
    assert fsm.next_deadline() == approx(14.4)


def test_reply_audio_of_another_reply_does_not_start_playback():
    fsm = thinking_fsm(now=14.0, **PLAIN)
    assert fsm.handle(ReplyAudioReady(at=14.8, reply=0)) == []
    assert fsm.handle(ReplyAudioReady(at=14.8, reply=2)) == []
    assert fsm.state is T
    assert fsm.next_deadline() == INF


def test_more_reply_audio_does_not_restart_the_breath():
    fsm = thinking_fsm(now=14.0)
    fsm.handle(ReplyAudioReady(at=14.8, reply=1))
    deadline = fsm.next_deadline()
    assert fsm.handle(ReplyAudioReady(at=14.85, reply=1)) == []
    assert fsm.next_deadline() == deadline


def test_sustained_speech_while_thinking_cancels_the_reply_and_the_answered_words_rejoin_the_turn():
    fsm = thinking_fsm(now=14.0, **PLAIN)
    assert fsm.handle(SpeechStarted(at=14.2)) == []
    assert fsm.next_deadline() == approx(14.5)
    assert fsm.handle(Tick(at=14.5)) == [CancelReply(reply=1, resumes_turn=True)]
    assert fsm.state is L
    assert fsm.transcript == "what time do you open"
    fsm.handle(Partial(at=14.6, text="on sunday", audio_end_at=14.6))
    fsm.handle(SpeechEnded(at=15.0))  # 12.5 .. 15.0 is one 2.5 s utterance
    assert fsm.next_deadline() == approx(16.8)
    fsm.handle(Final(at=15.1, text="on sunday", audio_end_at=15.0))
    assert at_deadline(fsm) == [StartReply(
        reply=2, text="what time do you open on sunday", speech_start_at=12.5, speech_end_at=15.0)]


def test_short_speech_while_thinking_does_not_cancel_the_reply():
    fsm = thinking_fsm(now=14.0, **PLAIN)
    fsm.handle(SpeechStarted(at=14.2))
    assert fsm.handle(SpeechEnded(at=14.4)) == []
    assert fsm.next_deadline() == INF
    assert fsm.handle(Tick(at=14.6)) == []
    assert fsm.state is T


def test_with_barge_in_disabled_speech_while_thinking_does_not_cancel_the_reply():
    fsm = thinking_fsm(now=14.0, barge_in_enabled=False, **PLAIN)
    assert fsm.handle(SpeechStarted(at=14.2)) == []
    assert fsm.next_deadline() == INF
    assert fsm.state is T


def test_speech_begun_while_thinking_holds_the_reply_then_takes_the_turn():
    fsm = thinking_fsm(now=14.0, **PLAIN)
    fsm.handle(SpeechStarted(at=14.2))
    fsm.handle(ReplyAudioReady(at=14.25, reply=1))  # breath ends by 14.37
    assert fsm.handle(Tick(at=14.4)) == []  # the agent does not start over the caller
    assert fsm.state is H
    assert fsm.next_deadline() == approx(14.5)
    assert fsm.handle(Tick(at=14.5)) == [CancelReply(reply=1, resumes_turn=True)]
    assert fsm.state is L


def test_a_late_final_of_the_committed_turn_is_not_heard_twice():
    fsm = thinking_fsm(now=14.0, **PLAIN)
    assert fsm.handle(Final(at=14.3, text="what time do you open", audio_end_at=13.9)) == []
    assert fsm.state is T
    assert fsm.transcript == ""
    fsm.handle(SpeechStarted(at=14.4))
    assert at_deadline(fsm) == [CancelReply(reply=1, resumes_turn=True)]
    assert fsm.transcript == "what time do you open"


def test_hanging_up_while_thinking_cancels_the_reply():
    fsm = thinking_fsm(now=14.0)
    assert fsm.handle(Hangup(at=14.5)) == [CancelReply(reply=1)]
    assert fsm.state is E
    assert fsm.next_deadline() == INF


# ------------------------------------------------------------- SPEAKING ---
# speaking_fsm(now=16.0): reply 1 committed at 15.0 (speech 13.5 .. 14.5), playing.


def test_the_last_mark_of_the_reply_opens_the_refractory_window():
    fsm = speaking_fsm(now=16.0)
    assert fsm.handle(PlaybackDone(at=18.0, reply=1)) == [ReplyFinished(reply=1)]
    assert fsm.state is R
    assert fsm.next_deadline() == approx(19.1)


def test_a_mark_of_an_abandoned_reply_does_not_end_the_reply():
    fsm = speaking_fsm(now=16.0)
    assert fsm.handle(PlaybackDone(at=16.5, reply=0)) == []
    assert fsm.state is S


def test_sustained_speech_interrupts_the_reply_and_opens_the_turn_at_its_start():
    fsm = speaking_fsm(now=16.0, **PLAIN)
    assert fsm.handle(SpeechStarted(at=16.5)) == []
    assert fsm.next_deadline() == approx(16.8)
    assert fsm.handle(Tick(at=16.79)) == []
    assert fsm.state is S
    assert fsm.handle(Tick(at=16.8)) == [StopPlayback(), CancelReply(reply=1)]
    assert fsm.state is L
    assert fsm.next_deadline() == INF
    fsm.handle(SpeechEnded(at=17.5))
    fsm.handle(Final(at=17.6, text="no the other one", audio_end_at=17.5))
    assert at_deadline(fsm) == [
        StartReply(reply=2, text="no the other one", speech_start_at=16.5, speech_end_at=17.5)
    ]


def test_speech_shorter_than_the_barge_in_minimum_does_not_interrupt():
    fsm = speaking_fsm(now=16.0)
    fsm.handle(SpeechStarted(at=16.5))
    assert fsm.handle(SpeechEnded(at=16.7)) == []
    assert fsm.next_deadline() == INF
    assert fsm.handle(Tick(at=17.0)) == []
    assert fsm.state is S


def test_with_barge_in_disabled_speech_never_interrupts_the_reply():
    fsm = speaking_fsm(now=16.0, barge_in_enabled=False)
    assert fsm.handle(SpeechStarted(at=16.5)) == []
    assert fsm.next_deadline() == INF
    assert fsm.handle(Tick(at=18.0)) == []
    assert fsm.state is S


def test_an_earlier_cough_does_not_move_the_start_of_the_interrupting_speech():
    fsm = speaking_fsm(now=16.0, **PLAIN)
    fsm.handle(SpeechStarted(at=16.2))
    fsm.handle(SpeechEnded(at=16.3))  # a cough: too short to interrupt
    fsm.handle(SpeechStarted(at=17.0))
    assert fsm.handle(Tick(at=17.3)) == [StopPlayback(), CancelReply(reply=1)]
    fsm.handle(SpeechEnded(at=18.0))  # one second of speech: the short silence
    assert fsm.next_deadline() == approx(18.5)
    fsm.handle(Final(at=18.1, text="sorry one more thing", audio_end_at=18.0))
    assert at_deadline(fsm) == [
        StartReply(reply=2, text="sorry one more thing", speech_start_at=17.0, speech_end_at=18.0)
    ]


def test_speech_still_going_when_the_reply_ends_is_held_through_the_window():
    fsm = speaking_fsm(now=16.0)
    fsm.handle(SpeechStarted(at=17.9))
    assert fsm.handle(PlaybackDone(at=18.0, reply=1)) == [ReplyFinished(reply=1)]
    assert fsm.state is R
    assert fsm.next_deadline() == approx(19.1)  # the barge-in timer died with SPEAKING
    assert at_deadline(fsm) == []
    assert fsm.state is L
    fsm.handle(SpeechEnded(at=19.5))
    fsm.handle(Final(at=19.6, text="thanks bye", audio_end_at=19.5))
    assert at_deadline(fsm) == [StartReply(reply=2, text="thanks bye", speech_start_at=17.9, speech_end_at=19.5)]


def test_hanging_up_while_speaking_cancels_the_reply():
    fsm = speaking_fsm(now=16.0)
    assert fsm.handle(Hangup(at=16.5)) == [CancelReply(reply=1)]
    assert fsm.state is E
    assert fsm.next_deadline() == INF


# ------------------------------------------------------ STT fallback mode ---


def test_after_stt_is_lost_the_end_of_turn_asks_for_a_fallback_transcription():
    fsm = listening_fsm(now=10.0)
    assert fsm.handle(SttLost(at=10.1)) == []
    assert fsm.state is L
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.handle(Tick(at=12.0)) == [TranscribeFallback(speech_start_at=10.5, speech_end_at=11.5)]
    assert fsm.state is F
    assert fsm.next_deadline() == approx(17.0)


def fallback_pending_fsm() -> CallFSM:
    """STT lost; an utterance 10.5 .. 11.5 was sent to the fallback at 12.0."""
    fsm = listening_fsm(now=10.0)
    fsm.handle(SttLost(at=10.1))
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.handle(Tick(at=12.0)) == [TranscribeFallback(speech_start_at=10.5, speech_end_at=11.5)]
    return fsm


def test_the_fallback_final_commits_the_turn():
    fsm = fallback_pending_fsm()
    assert fsm.handle(Final(at=12.8, text="do you deliver", audio_end_at=11.5)) == [
        StartReply(reply=1, text="do you deliver", speech_start_at=10.5, speech_end_at=11.5)
    ]
    assert fsm.state is T


def test_an_empty_fallback_final_returns_to_listening():
    fsm = fallback_pending_fsm()
    assert fsm.handle(Final(at=12.8, text="", audio_end_at=11.5)) == []
    assert fsm.state is L
    assert fsm.next_deadline() == INF


def test_a_fallback_that_never_answers_returns_to_listening():
    fsm = fallback_pending_fsm()
    assert fsm.handle(Tick(at=17.0)) == []
    assert fsm.state is L


def test_stt_lost_while_waiting_for_the_final_sends_the_turn_to_the_fallback():
    fsm = finalizing_fsm(now=12.0, **PLAIN)
    assert fsm.handle(SttLost(at=12.1)) == [TranscribeFallback(speech_start_at=10.5, speech_end_at=11.5)]
    assert fsm.state is F
    assert fsm.next_deadline() == approx(17.1)
    assert fsm.handle(SttLost(at=12.2)) == []  # already in fallback mode: one request only
    assert fsm.next_deadline() == approx(17.1)


def test_the_fallback_transcript_replaces_what_streaming_heard_before_it_was_lost():
    fsm = listening_fsm(now=10.0)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Final(at=10.9, text="hello", audio_end_at=10.8))
    fsm.handle(SttLost(at=11.0))
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.handle(Tick(at=12.0)) == [TranscribeFallback(speech_start_at=10.5, speech_end_at=11.5)]
    assert fsm.handle(Final(at=12.8, text="hello do you deliver", audio_end_at=11.5)) == [
        StartReply(reply=1, text="hello do you deliver", speech_start_at=10.5, speech_end_at=11.5)
    ]


def test_an_empty_fallback_final_returns_to_listening_even_after_streamed_words():
    fsm = listening_fsm(now=10.0)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Final(at=10.9, text="hello", audio_end_at=10.8))
    fsm.handle(SttLost(at=11.0))
    fsm.handle(SpeechEnded(at=11.5))
    fsm.handle(Tick(at=12.0))
    assert fsm.handle(Final(at=12.8, text="", audio_end_at=11.5)) == []
    assert fsm.state is L


def test_when_stt_is_back_turns_wait_for_streaming_finals_again():
    fsm = listening_fsm(now=10.0)
    fsm.handle(SttLost(at=10.1))
    assert fsm.handle(SttReady(at=10.2)) == []
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Partial(at=11.4, text="do you", audio_end_at=11.4))
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.handle(Tick(at=12.0)) == []
    assert fsm.state is F
    assert fsm.next_deadline() == approx(12.32)


# ----------------------------------------------------------- the table ---

ALL_STATES = list(State)
LIVE_STATES = [s for s in State if s is not E]


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("state", ALL_STATES, ids=lambda s: s.name)
def test_every_state_has_a_rule_for_every_event_type(state, event_type):
    fsm = BUILDERS[state](**PLAIN)
    event = sample_event(event_type, at=30.0)
    if event_type is CallStarted and state is not G:
        with pytest.raises(FsmError, match=f"CallStarted is not expected in {state.name}"):
            fsm.handle(event)
    else:
        assert isinstance(fsm.handle(event), list)


@pytest.mark.parametrize("state, event", [
    (G, ReplyAudioReady(at=30.0, reply=1)),
    (R, PlaybackDone(at=30.0, reply=1)),  # stale echo of the finished reply
    (R, ReplyAudioReady(at=30.0, reply=1)),
    (L, PlaybackDone(at=30.0, reply=1)),  # marks echoed by our own `clear`
    (L, ReplyAudioReady(at=30.0, reply=1)),  # audio of an abandoned reply
    (F, PlaybackDone(at=30.0, reply=1)),
    (F, ReplyAudioReady(at=30.0, reply=1)),
    (T, PlaybackDone(at=30.0, reply=1)),
    (S, ReplyAudioReady(at=30.0, reply=1)),  # later sentences of the reply playing now
], ids=lambda x: getattr(x, "name", type(x).__name__))
def test_harmless_stragglers_change_nothing(state, event):
    fsm = BUILDERS[state](**PLAIN)
    deadline = fsm.next_deadline()
    assert fsm.handle(event) == []
    assert fsm.state is state
    assert fsm.next_deadline() == deadline


@pytest.mark.parametrize("event", [
    Partial(at=30.0, text="uh huh", audio_end_at=30.0),
    Final(at=30.0, text="uh huh", audio_end_at=30.0),
], ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("state", [G, S], ids=lambda s: s.name)
def test_words_while_the_agent_talks_are_kept_without_changing_state(state, event):
    fsm = BUILDERS[state]()
    assert fsm.handle(event) == []
    assert fsm.state is state
    assert fsm.transcript == "uh huh"


@pytest.mark.parametrize("event_type", [SttLost, SttReady], ids=lambda t: t.__name__)
@pytest.mark.parametrize("state", [G, R, L, T, S], ids=lambda s: s.name)
def test_stt_coming_and_going_outside_finalizing_changes_no_state(state, event_type):
    fsm = BUILDERS[state]()
    deadline = fsm.next_deadline()
    assert fsm.handle(event_type(at=30.0)) == []
    assert fsm.state is state
    assert fsm.next_deadline() == deadline


@pytest.mark.parametrize("state", LIVE_STATES, ids=lambda s: s.name)
def test_hanging_up_ends_the_call_from_any_state(state):
    fsm = BUILDERS[state](**PLAIN)
    expected = [CancelReply(reply=1)] if state in (T, H, S) else []
    assert fsm.handle(Hangup(at=30.0)) == expected
    assert fsm.state is E
    assert fsm.next_deadline() == INF


@pytest.mark.parametrize("event_type", [t for t in EVENT_TYPES if t is not CallStarted],
                         ids=lambda t: t.__name__)
def test_every_event_after_hangup_is_ignored(event_type):
    fsm = ended_fsm()
    assert fsm.handle(sample_event(event_type, at=30.0)) == []
    assert fsm.state is E
    assert fsm.next_deadline() == INF


def test_a_second_call_start_is_a_driver_bug():
    fsm = listening_fsm()
    with pytest.raises(FsmError, match="CallStarted is not expected in LISTENING"):
        fsm.handle(CallStarted(at=30.0))
    assert fsm.state is L


def test_the_repr_shows_state_reply_transcript_and_timers():
    fsm = finalizing_fsm(now=12.0, **PLAIN)
    text = repr(fsm)
    for part in ("FINALIZING", "reply=0", "'what time do you'", "final@12.320"):
        assert part in text


# ---------------------------------------------------------------- time ---


def test_a_late_tick_fires_each_timer_as_of_its_own_deadline():
    fsm = listening_fsm(now=10.0, **PLAIN)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Partial(at=11.0, text="hello", audio_end_at=11.0))
    fsm.handle(SpeechEnded(at=11.5))
    # End of turn at 12.0, final timeout at 12.32: one late tick runs both.
    assert fsm.handle(Tick(at=20.0)) == [
        StartReply(reply=1, text="hello", speech_start_at=10.5, speech_end_at=11.5)
    ]
    assert fsm.state is T
    # The commit happened as of 12.32, so words spoken at 13.0 are new, not stale: the caller
    # goes on before hearing a reply, and the turn continues.
    assert fsm.handle(Final(at=20.1, text="and goodbye", audio_end_at=13.0)) == [
        CancelReply(reply=1, resumes_turn=True)
    ]
    assert fsm.transcript == "hello and goodbye"


def test_one_late_tick_runs_every_due_timer_in_deadline_order():
    fsm = thinking_fsm(now=14.0, **PLAIN)
    fsm.handle(SpeechStarted(at=14.2))  # barge-in due at 14.5
    fsm.handle(ReplyAudioReady(at=14.25, reply=1))  # breath due by 14.37, held: the caller is talking
    assert fsm.handle(Tick(at=14.6)) == [CancelReply(reply=1, resumes_turn=True)]
    assert fsm.state is L


def test_a_ready_reply_waits_for_a_short_interjection_to_end():
    fsm = thinking_fsm(now=14.0, **PLAIN)
    fsm.handle(ReplyAudioReady(at=14.0, reply=1))
    fsm.handle(SpeechStarted(at=14.05))  # barge-in would be due at 14.35
    assert fsm.handle(Tick(at=fsm.next_deadline())) == []  # breath came due: do not talk over them
    assert fsm.state is H
    assert fsm.handle(SpeechEnded(at=14.2)) == []
    assert fsm.handle(Tick(at=14.42)) == [BeginPlayback(reply=1)]
    assert fsm.state is S


def test_a_tick_before_the_deadline_changes_nothing():
    fsm = refractory_fsm(now=5.0)
    assert fsm.handle(Tick(at=5.5)) == []
    assert fsm.state is R
    assert fsm.next_deadline() == approx(6.1)


# --------------------------------------------------- random conversations ---


def _random_event(data, fsm: CallFSM, now: float, voiced: bool):
    kind = data.draw(st.sampled_from(
        4 * ["tick_deadline"] + 3 * ["speech"] + 2 * ["final", "audio", "done"]
        + ["partial", "tick", "stt_lost", "stt_ready"]))
    words = st.sampled_from(["", "yes", "do you", STRONG, "a table for the"])
    reply = fsm.reply + data.draw(st.sampled_from([0, 0, 0, 1, -1]))
    if kind == "tick_deadline" and fsm.next_deadline() < INF:
        return Tick(at=max(now, fsm.next_deadline()))
    if kind in ("tick", "tick_deadline"):
        return Tick(at=now)
    if kind == "speech":
        return SpeechEnded(at=now) if voiced else SpeechStarted(at=now)
    if kind in ("partial", "final"):
        cls = Partial if kind == "partial" else Final
        return cls(at=now, text=data.draw(words), audio_end_at=now - data.draw(st.sampled_from([0.0, 0.3, 3.0])))
    if kind == "audio":
        return ReplyAudioReady(at=now, reply=reply)
    if kind == "done":
        return PlaybackDone(at=now, reply=reply)
    return {"stt_lost": SttLost, "stt_ready": SttReady}[kind](at=now)


class _Observer:
    """What a driver can check about any run: the FSM's promises, step by step."""

    def __init__(self) -> None:
        self.voiced, self.streaming, self.last_reply = False, True, 0

    def check(self, fsm: CallFSM, event, actions: list) -> None:
        self.voiced = isinstance(event, SpeechStarted) or (self.voiced and not isinstance(event, SpeechEnded))
        self.streaming = {SttLost: False, SttReady: True}.get(type(event), self.streaming)
        if isinstance(event, Tick):
            assert fsm.next_deadline() > event.at, "a due timer survived the tick"
        for action in actions:
            if isinstance(action, StartReply):
                assert action.reply == self.last_reply + 1 and action.text
                assert action.speech_start_at <= action.speech_end_at
                self.last_reply = action.reply
            elif isinstance(action, (BeginPlayback, CancelReply)):
                assert action.reply == self.last_reply
            elif isinstance(action, TranscribeFallback):
                assert not self.streaming
        landmarks = [a for a in actions if isinstance(a, (StartReply, BeginPlayback, StopPlayback))]
        if landmarks:  # the last of these says where the call is now
            assert fsm.state is {StartReply: T, BeginPlayback: S, StopPlayback: L}[type(landmarks[-1])]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans(), st.booleans())
def test_any_conversation_keeps_the_fsm_promises(data, early_finalize, greeting_barge_in):
    fsm = new_fsm(**PLAIN | dict(early_finalize=early_finalize, greeting_barge_in=greeting_barge_in))
    fsm.handle(CallStarted(at=0.0))
    observer, now = _Observer(), 0.0
    for _ in range(data.draw(st.integers(1, 80))):
        now += data.draw(st.sampled_from([0.0, 0.05, 0.2, 0.4, 1.0, 2.5]))
        event = _random_event(data, fsm, now, observer.voiced)
        now = max(now, event.at)
        observer.check(fsm, event, fsm.handle(event))
    fsm.handle(Hangup(at=now))
    assert fsm.state is E and fsm.next_deadline() == INF
    for _ in range(3):
        assert fsm.handle(_random_event(data, fsm, now, observer.voiced)) == []
    assert fsm.state is E


# ------------------------------------------------- under a Trio MockClock ---


async def test_a_whole_turn_runs_under_trio_mock_clock(autojump_clock):
    """A tiny driver like call.py's: the next event or the next deadline, whichever comes first."""
    fsm = new_fsm(**PLAIN)
    script = [
        CallStarted(at=0.0), PlaybackDone(at=3.0, reply=0),
        SpeechStarted(at=5.0), Partial(at=5.6, text="do you", audio_end_at=5.6), SpeechEnded(at=6.0),
        Final(at=6.2, text="do you deliver", audio_end_at=6.0),
        ReplyAudioReady(at=7.0, reply=1), PlaybackDone(at=9.0, reply=1), Hangup(at=12.0),
    ]
    log = await drive_under_trio_clock(fsm, script)

    assert log == [
        (0.0, "CallStarted", [PlayGreeting()], G),
        (3.0, "PlaybackDone", [ReplyFinished(reply=0)], R),
        (approx(4.1), "Tick", [], L),
        (5.0, "SpeechStarted", [], L),
        (5.6, "Partial", [], L),
        (6.0, "SpeechEnded", [], L),
        (6.2, "Final", [], L),
        (approx(6.5), "Tick",
         [StartReply(reply=1, text="do you deliver", speech_start_at=5.0, speech_end_at=6.0)], T),
        (7.0, "ReplyAudioReady", [], T),
        (7.0, "Tick", [BeginPlayback(reply=1)], S),  # a breath after 6.0 is long past
        (9.0, "PlaybackDone", [ReplyFinished(reply=1)], R),
        (approx(10.1), "Tick", [], L),
        (12.0, "Hangup", [], E),
    ]
