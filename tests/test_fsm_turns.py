"""Specification of turn-taking at the floor (agentd/fsm.py): answer as soon as the
caller's words say the turn is over, without answering half a turn.

- Immediate commit: when the words ended the turn early (a strong transcript), the
  turn is answered at once; the recogniser's late final only revises history
  (``ReviseTurn``), it never asks for a second answer.
- Unfinished sentences: a transcript whose last word leaves the phrase open
  (conjunction, preposition, article, a bare Hebrew prefix letter, the relative ש)
  waits the full silence rule; one without sentence punctuation waits
  ``strong_bare_silence_s``; a punctuated one only the VAD hangover.
- A caller who goes on after the commit but before the reply plays continues the
  same turn: the reply is cancelled at their first new words and never plays. Once
  playback began, interrupting is a barge-in, as before.

Numbers (seconds, shipped settings unless a test says otherwise): silence 0.5
(utterance < 2 s) or 1.8, hangover 0.22, bare silence 0.5, final timeout 0.32;
the echo guard, barge-in confirmation, speculation and filler are off here so
each rule shows alone (tests/test_fsm_latency.py specifies those).
"""

from __future__ import annotations

import pytest
from pytest import approx

from agentd.fsm import (
    BeginPlayback, CallFSM, CallStarted, CancelReply, Final, Hangup, Partial, PlaybackDone, ReplyAudioReady,
    ReplyFinished, ReviseTurn, SpeechEnded, SpeechStarted, StartReply, State, StopPlayback, Tick,
)
from fsm_helpers import drive_under_trio_clock, listening_fsm, new_fsm

INF = float("inf")
L, F, T, H, S = State.LISTENING, State.FINALIZING, State.THINKING, State.HOLDING, State.SPEAKING
#: Shipped turn rules (early finalize on, words needed to interrupt) without the refinements
#: that would blur them: no echo guard, no barge-in confirmation, no speculation, no filler.
TURNS = dict(barge_in_guard_s=0.0, barge_in_confirm_s=0.0, spec_enabled=False, filler_after_s=0.0)


def at_deadline(fsm: CallFSM) -> list:
    """Tick exactly at the next deadline (what a punctual driver does)."""
    return fsm.handle(Tick(at=fsm.next_deadline()))


def spoken(words: str, *, start: float = 10.5, end: float = 11.5, final: bool = False, **settings) -> CallFSM:
    """The caller spoke ``start`` .. ``end``; ``words`` (a partial unless ``final``) came 0.1 s before the end."""
    fsm = listening_fsm(now=10.0, **TURNS | settings)
    fsm.handle(SpeechStarted(at=start))
    result = Final if final else Partial
    fsm.handle(result(at=end - 0.1, text=words, audio_end_at=end - 0.1))
    fsm.handle(SpeechEnded(at=end))
    return fsm


def answered(words: str, *, final: bool = False, end: float = 11.5) -> CallFSM:
    """The caller spoke 10.5 .. ``end``; ``words`` (a partial unless ``final``) ended the turn."""
    fsm = spoken(words, end=end, final=final)
    assert at_deadline(fsm) == [StartReply(reply=1, text=words, speech_start_at=10.5, speech_end_at=end)]
    assert fsm.state is T
    return fsm


# ================================================================ immediate commit


def test_a_punctuated_partial_is_answered_one_hangover_after_the_last_voiced_frame():
    fsm = spoken("What time do you open tomorrow?")
    assert fsm.next_deadline() == approx(11.72)
    assert at_deadline(fsm) == [StartReply(
        reply=1, text="What time do you open tomorrow?", speech_start_at=10.5, speech_end_at=11.5)]
    assert fsm.path == (F, T)  # through FINALIZING without waiting in it
    assert fsm.next_deadline() == INF  # no wait for the final


def test_a_weak_partial_still_waits_for_its_final():
    fsm = spoken("a table")
    assert at_deadline(fsm) == []  # 12.0: the silence rule ended it, not the words
    assert fsm.state is F
    assert fsm.next_deadline() == approx(12.32)


# ================================================================ late final


def test_the_late_final_of_an_answered_partial_revises_the_turn_without_a_second_answer():
    fsm = answered("what time do you open tomorrow?")
    revised = fsm.handle(Final(at=12.4, text="What time do you open tomorrow?", audio_end_at=11.5))
    assert revised == [ReviseTurn(reply=1, was="what time do you open tomorrow?",
                                  text="What time do you open tomorrow?")]
    assert fsm.state is T
    assert fsm.transcript == ""  # the next turn starts empty
    assert fsm.handle(Final(at=12.5, text="What time do you open?", audio_end_at=11.5)) == []  # only once


def test_the_late_final_is_reconciled_while_the_reply_already_plays():
    fsm = answered("what time do you open tomorrow?")
    fsm.handle(ReplyAudioReady(at=12.0, reply=1))
    assert at_deadline(fsm) == [BeginPlayback(reply=1)]
    assert fsm.state is S
    assert fsm.handle(Final(at=12.6, text="what time do you open tomorrow", audio_end_at=11.5)) == [
        ReviseTurn(reply=1, was="what time do you open tomorrow?", text="what time do you open tomorrow")]
    assert fsm.state is S  # no barge-in: these are the answered words, not new ones


def test_a_late_final_with_the_same_words_changes_nothing():
    fsm = answered("what time do you open tomorrow?")
    assert fsm.handle(Final(at=12.4, text="what time do you open tomorrow?", audio_end_at=11.5)) == []
    assert fsm.state is T


def test_the_late_final_replaces_only_the_interim_words_behind_the_closed_segments():
    fsm = listening_fsm(now=10.0, **TURNS)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Final(at=11.0, text="Hi.", audio_end_at=10.9))
    fsm.handle(Partial(at=11.4, text="I'd like a table for two.", audio_end_at=11.4))
    fsm.handle(SpeechEnded(at=11.5))
    assert at_deadline(fsm)[0].text == "Hi. I'd like a table for two."
    assert fsm.handle(Final(at=12.4, text="I'd like a table for two, please.", audio_end_at=11.5)) == [
        ReviseTurn(reply=1, was="Hi. I'd like a table for two.", text="Hi. I'd like a table for two, please.")]


def test_a_turn_answered_on_its_final_has_nothing_to_reconcile():
    fsm = answered("What time do you open tomorrow?", final=True)
    assert fsm.handle(Final(at=12.4, text="What time do you open tomorrow?", audio_end_at=11.5)) == []


# ===================================================== the caller goes on before playback


def test_new_words_before_the_reply_plays_cancel_it_and_the_turn_goes_on():
    """ "I'd like to book a table ... for four people": the pause outlasted the bare silence."""
    fsm = answered("I'd like to book a table")  # bare: committed 0.5 s after 11.5
    fsm.handle(SpeechStarted(at=12.1))
    assert fsm.state is T  # a sound alone is not yet a new turn
    assert fsm.handle(Partial(at=12.4, text="I'd like to book a table for four", audio_end_at=12.4)) == [
        CancelReply(reply=1, resumes_turn=True)]
    assert fsm.state is L
    # The answered words were an interim of the segment the caller resumed: replaced, not repeated.
    assert fsm.transcript == "I'd like to book a table for four"
    assert fsm.handle(ReplyAudioReady(at=12.5, reply=1)) == []  # the cancelled reply's audio: ignored
    fsm.handle(Final(at=13.0, text="I'd like to book a table for four people.", audio_end_at=12.9))
    fsm.handle(SpeechEnded(at=13.0))
    assert at_deadline(fsm) == [StartReply(
        reply=2, text="I'd like to book a table for four people.", speech_start_at=10.5, speech_end_at=13.0)]


def test_new_words_after_an_answered_final_are_added_to_it():
    fsm = answered("I'd like to book a table", final=True)
    assert fsm.handle(Final(at=12.6, text="for four people.", audio_end_at=12.5)) == [
        CancelReply(reply=1, resumes_turn=True)]
    assert fsm.transcript == "I'd like to book a table for four people."


def test_new_words_that_do_not_repeat_the_answered_interim_are_added_to_it():
    fsm = answered("I'd like to book a table")
    fsm.handle(SpeechStarted(at=12.1))
    assert fsm.handle(Partial(at=12.4, text="for four", audio_end_at=12.4)) == [
        CancelReply(reply=1, resumes_turn=True)]
    assert fsm.transcript == "I'd like to book a table for four"


def test_new_words_while_the_ready_reply_holds_for_the_caller_cancel_it():
    fsm = answered("I'd like to book a table")
    fsm.handle(SpeechStarted(at=12.1))
    fsm.handle(ReplyAudioReady(at=12.2, reply=1))
    assert at_deadline(fsm) == []
    assert fsm.state is H  # never start talking over the caller
    assert fsm.handle(Partial(at=12.5, text="I'd like to book a table for four", audio_end_at=12.5)) == [
        CancelReply(reply=1, resumes_turn=True)]
    assert fsm.state is L


def test_sustained_speech_without_words_before_playback_resumes_the_answered_interim():
    fsm = spoken("I'd like to book a table", barge_in_requires_words=False)
    assert at_deadline(fsm)[0].reply == 1
    fsm.handle(SpeechStarted(at=12.1))
    assert at_deadline(fsm) == [CancelReply(reply=1, resumes_turn=True)]  # 12.4: barge-in, no words yet
    assert fsm.transcript == "I'd like to book a table"
    fsm.handle(Partial(at=12.6, text="I'd like to book a table for four", audio_end_at=12.6))
    assert fsm.transcript == "I'd like to book a table for four"  # the interim grew in place


# ============================================================ after playback began


def test_after_playback_began_new_words_alone_do_not_stop_the_reply():
    fsm = answered("I'd like to book a table")
    fsm.handle(ReplyAudioReady(at=12.1, reply=1))
    assert at_deadline(fsm) == [BeginPlayback(reply=1)]
    assert fsm.handle(Partial(at=12.5, text="okay", audio_end_at=12.5)) == []
    assert fsm.state is S


def test_after_playback_began_sustained_speech_with_words_is_a_barge_in():
    fsm = answered("I'd like to book a table")
    fsm.handle(ReplyAudioReady(at=12.1, reply=1))
    at_deadline(fsm)
    fsm.handle(SpeechStarted(at=12.6))
    fsm.handle(Partial(at=12.8, text="for four people", audio_end_at=12.8))
    assert at_deadline(fsm) == [StopPlayback(), CancelReply(reply=1)]  # 12.9: not a resumed turn
    assert fsm.state is L


# ============================================================ unfinished sentences


WEAK, BARE, PUNCTUATED = 1.8, 0.5, 0.22  # the silence each kind of ending needs after 2.3 s of speech


@pytest.mark.parametrize(("words", "silence"), [
    ("I'd like to book a table for", WEAK),
    ("Can I speak to the", WEAK),
    ("I want the pasta and", WEAK),
    ("I'm calling about a", WEAK),
    ("אני רוצה להזמין שולחן ל", WEAK),  # a bare prefix letter: "to ..."
    ("אני רוצה להזמין שולחן ו", WEAK),  # "and ..."
    ("אני מחפש את הבחור ש", WEAK),  # the relative ש: "the guy who ..."
    ("אני רוצה לדבר עם", WEAK),  # "with"
    ("הזמנתי שולחן אבל", WEAK),  # "but"
    ("אני רוצה להזמין שולחן לארבעה ו", WEAK),
    ("I'd like to book a table tomorrow", BARE),
    ("what time do you open on friday", BARE),
    ("אני רוצה להזמין שולחן לארבעה", BARE),
    ("מה שעות הפתיחה שלכם מחר", BARE),
    ("I'd like to book a table.", PUNCTUATED),
    ("Where are you from?", PUNCTUATED),  # a stranded preposition ends a question
    ("אני רוצה להזמין שולחן לארבעה.", PUNCTUATED),
    ("מה שעות הפתיחה שלכם מחר?", PUNCTUATED),
], ids=repr)
def test_how_a_transcript_ends_sets_the_silence_that_ends_the_turn(words, silence):
    """Mid-phrase: the whole silence rule; no sentence punctuation: the bare silence; punctuated: the hangover."""
    fsm = spoken(words, start=10.2, end=12.5)  # 2.3 s of speech: the rule wants 1.8 s
    assert fsm.next_deadline() == approx(12.5 + silence)
    if silence != WEAK:
        assert at_deadline(fsm)[0].text == words  # answered at once: no wait for the final
        assert fsm.required_silence_s == approx(silence)


def test_the_bare_silence_is_its_own_setting():
    fsm = spoken("I'd like to book a table", strong_bare_silence_s=0.35)
    assert fsm.next_deadline() == approx(11.85)


def test_the_bare_silence_never_exceeds_the_silence_rule():
    fsm = spoken("I'd like to book a table", strong_bare_silence_s=0.9)
    assert fsm.next_deadline() == approx(12.0)  # the 0.5 s rule for a short utterance
    assert at_deadline(fsm)[0].text == "I'd like to book a table"  # strong words: no wait for the final
    assert fsm.state is T


# ============================================================ under Trio's clock


async def test_a_hesitation_after_the_commit_never_plays_half_an_answer(autojump_clock):
    """The whole exchange on Trio's MockClock, driven like call.py drives the FSM."""
    fsm = new_fsm(**TURNS)
    script = [
        CallStarted(at=0.0), PlaybackDone(at=3.0, reply=0),
        SpeechStarted(at=4.0), Partial(at=5.9, text="I'd like to book a table", audio_end_at=5.9),
        SpeechEnded(at=6.0),  # a 0.6 s pause: longer than the bare silence
        SpeechStarted(at=6.6), ReplyAudioReady(at=6.7, reply=1),
        Partial(at=6.8, text="I'd like to book a table for four", audio_end_at=6.9),
        SpeechEnded(at=7.5), Partial(at=7.4, text="I'd like to book a table for four people.", audio_end_at=7.4),
        ReplyAudioReady(at=8.3, reply=2), PlaybackDone(at=10.0, reply=2), Hangup(at=12.0),
    ]
    script.sort(key=lambda e: e.at)
    log = await drive_under_trio_clock(fsm, script)
    actions = [action for _, _, acts, _ in log for action in acts]
    assert [a for a in actions if isinstance(a, BeginPlayback)] == [BeginPlayback(reply=2)]
    assert CancelReply(reply=1, resumes_turn=True) in actions
    started = [a for a in actions if isinstance(a, StartReply)]
    assert [(a.reply, a.text, a.speech_start_at) for a in started] == [
        (1, "I'd like to book a table", 4.0), (2, "I'd like to book a table for four people.", 4.0)]
    assert ReplyFinished(reply=2) in actions
    assert fsm.state is State.ENDED


# ============================================================ the hesitation guard


def test_a_punctuated_question_with_a_pause_after_it_never_plays_before_the_guard():
    """ "What time do you open? ... on Saturday?": complete-looking words, then a 680 ms pause.
    The turn is answered at once, but its audio waits out the hesitation guard (0.7 s shipped, plus
    the VAD's onset: 0.78 s) after the last voiced frame, so the caller's second half cancels it
    before anyone hears it."""
    fsm = answered("What time do you open?")  # punctuated: committed one hangover after 11.5
    assert fsm.handle(ReplyAudioReady(at=11.8, reply=1)) == []  # ready long before the guard
    assert fsm.next_deadline() == approx(11.5 + 0.78)
    fsm.handle(SpeechStarted(at=12.18))  # the caller goes on after 680 ms
    assert fsm.handle(Partial(at=12.3, text="What time do you open? On Saturday", audio_end_at=12.3)) == [
        CancelReply(reply=1, resumes_turn=True)]
    assert fsm.state is L


def test_without_the_guard_the_same_pause_is_talked_over():
    """The counter-case that makes the guard necessary: the breath alone plays the answer mid-pause."""
    fsm = spoken("What time do you open?", hesitation_guard_s=0.0)
    at_deadline(fsm)
    fsm.handle(ReplyAudioReady(at=11.8, reply=1))
    assert at_deadline(fsm) == [BeginPlayback(reply=1)]  # at 11.8: 380 ms into the caller's pause
    assert fsm.state is S
