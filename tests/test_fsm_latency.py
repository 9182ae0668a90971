"""Specification of the FSM's two latency features (agentd/fsm.py).

Early finalize: a turn whose words already look complete ("strong", see
``agentd.text.is_strong_partial``) ends after ``hangover_s`` of silence
instead of the whole ``min_silence``.

Speculative replies: a transcript that holds still for ``spec_stable_s`` is
drafted (``StartReply(draft=True)``, nothing plays). If the turn ends on the
same words (``normalize_for_match``), the draft is adopted (``AdoptDraft``)
and plays once its audio is ready, waiting at most ``spec_wait_s``; otherwise
it is cancelled and a fresh reply is asked for. A draft never plays unless
adopted.

Like tests/test_fsm.py: each test states one rule, drives ``handle`` with
explicit ``at`` times, drives timers with ``Tick`` and ``next_deadline()``,
and checks state and actions after each event that matters. The last section
runs the FSM under Trio's MockClock, the way the call driver does.

Numbers used (seconds): silence 0.5 (utterance < 2 s) or 1.8, hangover 0.22,
final timeout 0.32, strong = 12 chars with punctuation (hangover) or 18 without (0.5 s);
spec: 14 normalized chars, stable 0.25, wait 0.4.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pytest import approx

from agentd.fsm import (
    AdoptDraft, BeginPlayback, CallFSM, CallStarted, CancelReply, Final, Hangup, Partial, PlayGreeting,
    PlaybackDone, ReplyAudioReady, ReplyFinished, SpeechEnded, SpeechStarted, StartReply, State, SttLost,
    StopPlayback, SttReady, Tick, TranscribeFallback,
)
from agentd.text import normalize_for_match
from fsm_helpers import drive_under_trio_clock, listening_fsm, new_fsm, tick_until_quiet

INF = float("inf")
G, R, L, F, T, S, E = (State.GREETING, State.REFRACTORY, State.LISTENING, State.FINALIZING,
                       State.THINKING, State.SPEAKING, State.ENDED)
#: The basic turn rules (the shipped config turns the features below on, and adds an echo
#: guard, a barge-in confirmation, words before barge-in and a filler): each feature is
#: specified on top of these, one at a time.
BASE = dict(barge_in_guard_s=0.0, barge_in_confirm_s=0.0, barge_in_requires_words=False,
            early_finalize=False, spec_enabled=False, filler_after_s=0.0)
EARLY = BASE | dict(early_finalize=True)
SPEC = BASE | dict(spec_enabled=True)


def at_deadline(fsm: CallFSM) -> list:
    """Tick exactly at the next deadline (what a punctual driver does)."""
    return fsm.handle(Tick(at=fsm.next_deadline()))


def counts(drafts: int = 0, hits: int = 0, misses: int = 0, late: int = 0) -> dict[str, int]:
    return {"drafts": drafts, "hits": hits, "misses": misses, "late": late}


def spoken_turn(fsm: CallFSM, words: str, *, start: float = 10.5, end: float = 11.5) -> None:
    """The caller speaks from ``start`` to ``end``; the recogniser's partial ``words`` comes at ``end - 0.1``."""
    fsm.handle(SpeechStarted(at=start))
    fsm.handle(Partial(at=end - 0.1, text=words, audio_end_at=end - 0.1))
    fsm.handle(SpeechEnded(at=end))


# ================================================================ early finalize
# listening_fsm(now=10.0): the caller speaks 10.5 .. 11.5, so the full silence
# ends at 12.0 and the hangover at 11.72.


def test_early_finalize_ends_a_punctuated_turn_after_the_hangover():
    fsm = listening_fsm(now=10.0, **EARLY)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Final(at=11.4, text="Do you deliver?", audio_end_at=11.4))  # 15 chars, a question mark
    assert fsm.handle(SpeechEnded(at=11.5)) == []
    assert fsm.next_deadline() == approx(11.72)
    assert fsm.handle(Tick(at=11.71)) == []
    assert fsm.state is L
    assert fsm.handle(Tick(at=11.72)) == [
        StartReply(reply=1, text="Do you deliver?", speech_start_at=10.5, speech_end_at=11.5)
    ]
    assert fsm.state is T
    assert fsm.required_silence_s == approx(0.22)


def test_the_same_short_words_without_punctuation_wait_the_full_silence():
    fsm = listening_fsm(now=10.0, **EARLY)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Final(at=11.4, text="Do you deliver", audio_end_at=11.4))  # 14 chars: not enough bare
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.next_deadline() == approx(12.0)
    assert fsm.handle(Tick(at=11.72)) == []
    assert fsm.state is L
    assert at_deadline(fsm) == [
        StartReply(reply=1, text="Do you deliver", speech_start_at=10.5, speech_end_at=11.5)
    ]
    assert fsm.required_silence_s == approx(0.5)


def test_a_long_hebrew_turn_without_punctuation_ends_after_the_bare_silence():
    """Without sentence punctuation the caller may be hesitating mid-sentence, so the words
    earn strong_bare_silence_s (0.5), not the hangover; still far less than the 1.8 s rule."""
    words = "אני רוצה להזמין שולחן לארבעה"  # 28 chars, no punctuation (Hebrew STT rarely adds any)
    fsm = listening_fsm(now=10.0, **EARLY)
    fsm.handle(SpeechStarted(at=10.2))
    fsm.handle(Final(at=12.4, text=words, audio_end_at=12.4))
    fsm.handle(SpeechEnded(at=12.5))  # 2.3 s: the full rule would want 1.8 s
    assert fsm.next_deadline() == approx(13.0)
    assert at_deadline(fsm) == [StartReply(reply=1, text=words, speech_start_at=10.2, speech_end_at=12.5)]
    assert fsm.required_silence_s == approx(0.5)


def test_early_finalize_also_cuts_the_long_silence_of_a_long_utterance():
    fsm = listening_fsm(now=10.0, **EARLY)
    fsm.handle(SpeechStarted(at=10.2))
    fsm.handle(Final(at=12.4, text="I would like to book a table.", audio_end_at=12.4))
    fsm.handle(SpeechEnded(at=12.5))  # 2.3 s: the full rule would want 1.8 s
    assert fsm.next_deadline() == approx(12.72)
    assert at_deadline(fsm) == [StartReply(
        reply=1, text="I would like to book a table.", speech_start_at=10.2, speech_end_at=12.5)]
    assert fsm.required_silence_s == approx(0.22)


@pytest.mark.parametrize("words", [
    "אני רוצה להזמין שולחן ל",  # a bare prefix particle: "... a table for"
    "אפשר להזמין שולחן ו",  # "... and"
    "אני רוצה להזמין את",  # the object marker: the object is still coming
    "אני רוצה לדבר עם מישהו על",  # "... about"
    "I would like to book a table and",
    "I would like to book a table for the",
    "Could you put me through to Dr.",  # punctuated, but a name must follow
])
def test_early_finalize_waits_the_full_silence_when_the_words_dangle(words):
    fsm = listening_fsm(now=10.0, **EARLY)
    spoken_turn(fsm, words)
    assert fsm.next_deadline() == approx(12.0)
    assert fsm.handle(Tick(at=11.9)) == []
    assert fsm.state is L
    assert at_deadline(fsm) == []  # only a partial: wait for the final
    assert fsm.state is F
    fsm.handle(Tick(at=fsm.next_deadline()))
    assert fsm.state is T
    assert fsm.required_silence_s == approx(0.5)


@pytest.mark.parametrize("words", [
    "see you at 3.",  # may become "see you at 3.30"
    "a table for 2.",  # may become "a table for 2.5 hours"
    "it opens at 9:00.",
])
def test_early_finalize_does_not_trust_a_dot_after_a_number(words):
    fsm = listening_fsm(now=10.0, **EARLY)
    spoken_turn(fsm, words)
    assert fsm.next_deadline() == approx(12.0)


def test_a_number_that_grows_past_the_dot_becomes_a_complete_sentence():
    fsm = listening_fsm(now=10.0, **EARLY)
    spoken_turn(fsm, "see you at 3.")
    assert fsm.next_deadline() == approx(12.0)
    fsm.handle(Partial(at=11.6, text="see you at 3.30?", audio_end_at=11.5))
    assert fsm.next_deadline() == approx(11.72)


def test_without_early_finalize_a_strong_turn_waits_the_full_silence():
    fsm = listening_fsm(now=10.0, **BASE)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Final(at=11.4, text="Do you deliver?", audio_end_at=11.4))
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.next_deadline() == approx(12.0)
    assert fsm.handle(Tick(at=11.72)) == []
    assert fsm.state is L
    assert at_deadline(fsm) == [
        StartReply(reply=1, text="Do you deliver?", speech_start_at=10.5, speech_end_at=11.5)
    ]
    assert fsm.required_silence_s == approx(0.5)


def test_a_strong_partial_arriving_in_the_silence_pulls_the_end_of_turn_in():
    fsm = listening_fsm(now=10.0, **EARLY)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.next_deadline() == approx(12.0)
    assert fsm.handle(Partial(at=11.6, text="what time do you open tomorrow?", audio_end_at=11.5)) == []
    assert fsm.next_deadline() == approx(11.72)
    assert at_deadline(fsm) == [  # a partial, but its words ended the turn: no wait for the final
        StartReply(reply=1, text="what time do you open tomorrow?", speech_start_at=10.5, speech_end_at=11.5)
    ]
    assert fsm.state is T
    assert fsm.required_silence_s == approx(0.22)


def test_a_strong_partial_arriving_after_the_hangover_ends_the_turn_as_of_its_arrival():
    """The recogniser is slower than the VAD: the words come when the hangover is long over.
    The end of turn is due at once, but not before the words that justify it (causality),
    so the turn is committed as of their arrival."""
    fsm = listening_fsm(now=10.0, **EARLY)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.handle(Partial(at=11.8, text="what time do you open tomorrow?", audio_end_at=11.5)) == []
    assert fsm.next_deadline() == approx(11.8)
    assert at_deadline(fsm) == [
        StartReply(reply=1, text="what time do you open tomorrow?", speech_start_at=10.5, speech_end_at=11.5)
    ]
    assert fsm.state is T


def test_a_weaker_partial_in_the_silence_pushes_the_end_of_turn_back_out():
    fsm = listening_fsm(now=10.0, **EARLY)
    spoken_turn(fsm, "what time do you open tomorrow?")
    assert fsm.next_deadline() == approx(11.72)
    assert fsm.handle(Partial(at=11.6, text="what time do you open tomorrow and", audio_end_at=11.5)) == []
    assert fsm.next_deadline() == approx(12.0)


def test_a_caller_resuming_while_finalizing_continues_the_same_turn():
    fsm = listening_fsm(now=10.0, **EARLY)
    spoken_turn(fsm, "I'd like a table")  # weak: too short without punctuation
    assert at_deadline(fsm) == []  # 12.0: the full silence, waiting for the final
    assert fsm.state is F
    assert fsm.handle(SpeechStarted(at=12.1)) == []  # "... for four people tonight"
    assert fsm.state is L
    assert fsm.next_deadline() == INF  # the final timeout died with FINALIZING
    assert fsm.handle(Final(at=12.2, text="I'd like a table", audio_end_at=11.5)) == []
    assert fsm.state is L  # the caller is talking: a final is not the end of the turn
    fsm.handle(Partial(at=12.6, text="for four people tonight.", audio_end_at=12.6))
    fsm.handle(SpeechEnded(at=12.8))
    fsm.handle(Final(at=12.9, text="for four people tonight.", audio_end_at=12.8))
    assert fsm.next_deadline() == approx(13.02)  # punctuated: the hangover
    assert at_deadline(fsm) == [StartReply(
        reply=1, text="I'd like a table for four people tonight.", speech_start_at=10.5, speech_end_at=12.8)]
    assert fsm.state is T


# ================================================================== speculation
# drafting_fsm(): the caller speaks from 10.5; the partial "what time do you open"
# arrives at 11.0 and holds still until 11.25, when reply 1 is drafted.

WORDS = "what time do you open"
FINAL_WORDS = "What time do you open?"  # the same words as far as matching goes


def draft(reply: int, text: str, start: float, end: float) -> StartReply:
    return StartReply(reply=reply, text=text, speech_start_at=start, speech_end_at=end, draft=True)


def drafting_fsm(**settings) -> CallFSM:
    """Reply 1 was drafted at 11.25 on WORDS; the caller is still speaking (since 10.5)."""
    fsm = listening_fsm(now=10.0, **SPEC, **settings)
    fsm.handle(SpeechStarted(at=10.5))
    assert fsm.handle(Partial(at=11.0, text=WORDS, audio_end_at=11.0)) == []
    assert fsm.next_deadline() == approx(11.25)
    assert fsm.handle(Tick(at=11.25)) == [draft(1, WORDS, 10.5, 11.25)]
    assert fsm.state is L
    return fsm


def adopted_fsm() -> CallFSM:
    """drafting_fsm(), then the turn (10.5 .. 11.5) ended on the same words at 12.0; no draft audio yet."""
    fsm = drafting_fsm()
    fsm.handle(SpeechEnded(at=11.5))
    fsm.handle(Final(at=11.6, text=FINAL_WORDS, audio_end_at=11.5))
    assert at_deadline(fsm) == [AdoptDraft(reply=1, text=FINAL_WORDS, speech_start_at=10.5, speech_end_at=11.5)]
    assert fsm.state is T
    return fsm


def test_a_transcript_that_holds_still_is_drafted_and_nothing_plays():
    fsm = listening_fsm(now=10.0, **SPEC)
    fsm.handle(SpeechStarted(at=10.5))
    assert fsm.handle(Partial(at=11.0, text=WORDS, audio_end_at=11.0)) == []
    assert fsm.next_deadline() == approx(11.25)
    assert fsm.handle(Tick(at=11.24)) == []
    assert fsm.handle(Tick(at=11.25)) == [draft(1, WORDS, 10.5, 11.25)]  # still voiced: ends "now"
    assert fsm.state is L
    assert fsm.reply == 0  # nothing is being said or thought about for real
    assert fsm.spec_counts == counts(drafts=1)
    assert fsm.handle(ReplyAudioReady(at=11.4, reply=1)) == []  # its audio is kept, not played
    assert fsm.state is L
    assert fsm.next_deadline() == INF


def test_a_changing_transcript_restarts_the_stability_clock():
    fsm = listening_fsm(now=10.0, **SPEC)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Partial(at=11.0, text="what time do you", audio_end_at=11.0))
    assert fsm.next_deadline() == approx(11.25)
    fsm.handle(Partial(at=11.2, text=WORDS, audio_end_at=11.2))
    assert fsm.next_deadline() == approx(11.45)
    assert fsm.handle(Tick(at=11.25)) == []
    assert fsm.handle(Tick(at=11.45)) == [draft(1, WORDS, 10.5, 11.45)]


def test_the_same_words_again_do_not_restart_the_stability_clock():
    fsm = listening_fsm(now=10.0, **SPEC)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Partial(at=11.0, text=WORDS, audio_end_at=11.0))
    fsm.handle(Partial(at=11.2, text="What time, do you open", audio_end_at=11.2))  # same once normalized
    assert fsm.next_deadline() == approx(11.25)


def test_a_drafted_transcript_that_does_not_change_is_not_drafted_again():
    fsm = drafting_fsm()
    assert fsm.handle(Partial(at=11.4, text=WORDS, audio_end_at=11.4)) == []
    assert fsm.handle(Final(at=11.6, text=FINAL_WORDS, audio_end_at=11.5)) == []
    assert fsm.next_deadline() == INF  # the caller is still speaking; no new draft is coming
    assert fsm.handle(Tick(at=13.0)) == []
    assert fsm.spec_counts == counts(drafts=1)


@pytest.mark.parametrize("words", [
    "yes please",  # 10 chars
    "ok, ok, ok, ok!!",  # 16 chars, but only 11 once punctuation is dropped
])
def test_a_transcript_shorter_than_spec_min_chars_is_never_drafted(words):
    fsm = listening_fsm(now=10.0, **SPEC)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Partial(at=11.0, text=words, audio_end_at=11.0))
    assert fsm.next_deadline() == INF
    fsm.handle(SpeechEnded(at=11.5))
    fsm.handle(Final(at=11.6, text=words, audio_end_at=11.5))
    assert tick_until_quiet(fsm, until=13.0) == [
        StartReply(reply=1, text=words, speech_start_at=10.5, speech_end_at=11.5)
    ]
    assert fsm.spec_counts == counts()


def test_a_transcript_falling_under_spec_min_chars_stops_the_stability_clock():
    fsm = listening_fsm(now=10.0, **SPEC)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Partial(at=11.0, text=WORDS, audio_end_at=11.0))
    fsm.handle(Partial(at=11.1, text="what time", audio_end_at=11.1))  # the recogniser revised itself
    assert fsm.next_deadline() == INF


def test_with_speculation_disabled_nothing_is_ever_drafted():
    fsm = listening_fsm(now=10.0, **BASE)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Partial(at=11.0, text=WORDS, audio_end_at=11.0))
    assert fsm.next_deadline() == INF
    assert fsm.handle(Tick(at=11.4)) == []
    fsm.handle(SpeechEnded(at=11.5))
    fsm.handle(Final(at=11.6, text=FINAL_WORDS, audio_end_at=11.5))
    assert tick_until_quiet(fsm, until=13.0) == [
        StartReply(reply=1, text=FINAL_WORDS, speech_start_at=10.5, speech_end_at=11.5)
    ]
    assert fsm.spec_counts == counts()


# ---- hits


def test_a_hit_whose_draft_audio_is_already_ready_plays_it_once_the_hesitation_guard_has_passed():
    fsm = drafting_fsm()
    assert fsm.handle(ReplyAudioReady(at=11.4, reply=1)) == []
    fsm.handle(SpeechEnded(at=11.5))
    fsm.handle(Final(at=11.6, text=FINAL_WORDS, audio_end_at=11.5))
    # The caller stopped at 11.5: the draft is adopted, but a caller pausing mid-sentence
    # could still go on until 11.5 + hesitation_guard_s (0.7 shipped, plus the VAD onset: 0.78), so it plays then.
    assert fsm.handle(Tick(at=12.0)) == [
        AdoptDraft(reply=1, text=FINAL_WORDS, speech_start_at=10.5, speech_end_at=11.5)
    ]
    assert fsm.state is T
    assert fsm.next_deadline() == approx(11.5 + 0.78)
    assert at_deadline(fsm) == [BeginPlayback(reply=1)]
    assert fsm.reply == 1
    assert fsm.breath_s == approx(0.28)
    assert fsm.state is S
    assert fsm.spec_counts == counts(drafts=1, hits=1)
    assert fsm.handle(PlaybackDone(at=14.0, reply=1)) == [ReplyFinished(reply=1)]
    assert fsm.state is R


def test_a_hit_waits_up_to_spec_wait_s_for_the_draft_audio():
    fsm = adopted_fsm()
    assert fsm.next_deadline() == approx(12.4)
    assert fsm.handle(Tick(at=12.37)) == []
    assert fsm.handle(ReplyAudioReady(at=12.38, reply=1)) == []
    assert fsm.next_deadline() == approx(12.38)  # the wait is over; the breath (after 11.5) is past
    assert at_deadline(fsm) == [BeginPlayback(reply=1)]
    assert fsm.state is S
    assert fsm.handle(Tick(at=13.0)) == []  # no late-draft timer survived
    assert fsm.spec_counts == counts(drafts=1, hits=1)


def test_a_draft_later_than_spec_wait_s_is_cancelled_and_asked_for_afresh():
    fsm = adopted_fsm()
    assert fsm.handle(Tick(at=12.4)) == [
        CancelReply(reply=1, resumes_turn=True),  # the words were adopted: they move on to reply 2
        StartReply(reply=2, text=FINAL_WORDS, speech_start_at=10.5, speech_end_at=11.5),
    ]
    assert fsm.state is T
    assert fsm.reply == 2
    assert fsm.spec_counts == counts(drafts=1, hits=1, late=1)
    assert fsm.handle(ReplyAudioReady(at=12.5, reply=1)) == []  # the abandoned draft's audio
    assert fsm.next_deadline() == INF
    assert fsm.handle(ReplyAudioReady(at=13.0, reply=2)) == []
    assert at_deadline(fsm) == [BeginPlayback(reply=2)]


@pytest.mark.parametrize("drafted, final", [
    ("what time do you open", "What time do you open?"),
    ("what time do you open", "what  time, do you OPEN"),
    ("מה השעות שלכם מחר", "מה השעות שלכם מחר?"),
    ("אפשר להזמין בית־ספר", "אפשר להזמין בית ספר"),  # maqaf vs space
])
def test_a_final_matching_the_draft_up_to_case_punctuation_and_spacing_is_a_hit(drafted, final):
    fsm = listening_fsm(now=10.0, **SPEC)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Partial(at=11.0, text=drafted, audio_end_at=11.0))
    assert fsm.handle(Tick(at=11.25)) == [draft(1, drafted, 10.5, 11.25)]
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.handle(Final(at=11.6, text=final, audio_end_at=11.5)) == []
    assert at_deadline(fsm) == [AdoptDraft(reply=1, text=final, speech_start_at=10.5, speech_end_at=11.5)]


def test_a_draft_made_while_finalizing_can_still_be_adopted():
    fsm = listening_fsm(now=10.0, **SPEC)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(SpeechEnded(at=11.5))
    fsm.handle(Partial(at=11.9, text=WORDS, audio_end_at=11.5))  # stable at 12.15
    assert at_deadline(fsm) == []  # 12.0: end of turn, only a partial in
    assert fsm.state is F
    assert fsm.next_deadline() == approx(12.15)  # the stability clock outlived LISTENING
    assert at_deadline(fsm) == [draft(1, WORDS, 10.5, 11.5)]
    assert fsm.state is F
    assert fsm.handle(ReplyAudioReady(at=12.2, reply=1)) == []
    assert fsm.handle(Final(at=12.25, text=FINAL_WORDS, audio_end_at=11.5)) == [
        AdoptDraft(reply=1, text=FINAL_WORDS, speech_start_at=10.5, speech_end_at=11.5)
    ]
    assert fsm.next_deadline() == approx(11.5 + 0.78)  # its audio is ready: it plays once the hesitation guard is over


def test_the_stability_clock_keeps_running_when_the_caller_resumes_while_finalizing():
    fsm = listening_fsm(now=10.0, **SPEC)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(SpeechEnded(at=11.5))
    assert at_deadline(fsm) == []  # 12.0: nothing heard yet, wait for the final
    assert fsm.state is F
    assert fsm.handle(Partial(at=12.1, text=WORDS, audio_end_at=11.5)) == []  # stable at 12.35
    assert fsm.handle(SpeechStarted(at=12.2)) == []
    assert fsm.state is L
    assert fsm.next_deadline() == approx(12.35)
    assert at_deadline(fsm) == [draft(1, WORDS, 10.5, approx(12.35))]  # still voiced: ends "now"


def test_the_caller_resuming_while_finalizing_keeps_the_draft():
    fsm = drafting_fsm()
    fsm.handle(SpeechEnded(at=11.5))
    assert at_deadline(fsm) == []  # 12.0: only the partial is in
    assert fsm.state is F
    assert fsm.handle(SpeechStarted(at=12.1)) == []  # just a breath in the middle of the turn
    assert fsm.state is L
    fsm.handle(SpeechEnded(at=12.3))
    fsm.handle(Final(at=12.4, text=FINAL_WORDS, audio_end_at=12.3))
    assert tick_until_quiet(fsm, until=13.0) == [
        AdoptDraft(reply=1, text=FINAL_WORDS, speech_start_at=10.5, speech_end_at=12.3)
    ]


# ---- misses and replacements


def test_a_final_that_differs_from_the_draft_cancels_it_and_asks_afresh():
    fsm = drafting_fsm()
    fsm.handle(ReplyAudioReady(at=11.4, reply=1))  # ready, yet it must never play
    fsm.handle(SpeechEnded(at=11.5))
    assert at_deadline(fsm) == []  # 12.0: only the partial is in
    assert fsm.state is F
    assert fsm.handle(Final(at=12.1, text="what time does the shop open", audio_end_at=11.5)) == [
        CancelReply(reply=1),
        StartReply(reply=2, text="what time does the shop open", speech_start_at=10.5, speech_end_at=11.5),
    ]
    assert fsm.state is T
    assert fsm.reply == 2
    assert fsm.spec_counts == counts(drafts=1, misses=1)
    assert fsm.handle(ReplyAudioReady(at=12.2, reply=1)) == []
    assert fsm.next_deadline() == INF  # the draft's audio starts no breath
    assert fsm.handle(ReplyAudioReady(at=12.6, reply=2)) == []
    assert tick_until_quiet(fsm, until=14.0) == [BeginPlayback(reply=2)]


def test_a_newer_stable_transcript_replaces_the_draft():
    fsm = drafting_fsm()
    longer = "what time do you open on sunday"
    assert fsm.handle(Partial(at=11.4, text=longer, audio_end_at=11.4)) == []
    assert fsm.next_deadline() == approx(11.65)
    assert fsm.handle(Tick(at=11.65)) == [CancelReply(reply=1), draft(2, longer, 10.5, 11.65)]
    assert fsm.spec_counts == counts(drafts=2)
    fsm.handle(ReplyAudioReady(at=11.7, reply=1))  # the replaced draft's audio: no use now
    fsm.handle(SpeechEnded(at=11.8))
    fsm.handle(Final(at=11.9, text=longer, audio_end_at=11.8))
    assert at_deadline(fsm) == [AdoptDraft(reply=2, text=longer, speech_start_at=10.5, speech_end_at=11.8)]
    assert fsm.next_deadline() == approx(12.3 + 0.4)  # draft 2 is not ready; draft 1's audio did not count
    fsm.handle(ReplyAudioReady(at=12.5, reply=2))
    assert tick_until_quiet(fsm, until=13.0) == [BeginPlayback(reply=2)]
    assert fsm.spec_counts == counts(drafts=2, hits=1)


def test_the_same_words_in_the_next_turn_are_drafted_again():
    fsm = drafting_fsm()
    fsm.handle(SpeechEnded(at=11.5))
    fsm.handle(Final(at=11.6, text=FINAL_WORDS, audio_end_at=11.5))
    fsm.handle(ReplyAudioReady(at=11.7, reply=1))
    assert tick_until_quiet(fsm, until=12.5) == [
        AdoptDraft(reply=1, text=FINAL_WORDS, speech_start_at=10.5, speech_end_at=11.5), BeginPlayback(reply=1)]
    fsm.handle(PlaybackDone(at=14.0, reply=1))
    fsm.handle(Tick(at=15.1))
    assert fsm.state is L
    fsm.handle(SpeechStarted(at=16.0))  # "sorry, what time do you open?": the agent was not heard
    fsm.handle(Partial(at=16.5, text=WORDS, audio_end_at=16.5))
    assert fsm.next_deadline() == approx(16.75)
    assert at_deadline(fsm) == [draft(2, WORDS, 16.0, 16.75)]
    fsm.handle(SpeechEnded(at=17.0))
    fsm.handle(Final(at=17.1, text="What time do you open", audio_end_at=17.0))
    assert tick_until_quiet(fsm, until=17.5) == [
        AdoptDraft(reply=2, text="What time do you open", speech_start_at=16.0, speech_end_at=17.0)]
    assert fsm.spec_counts == counts(drafts=2, hits=2)


def test_the_counters_add_up_over_a_call():
    fsm = drafting_fsm()  # turn 1: a hit
    fsm.handle(ReplyAudioReady(at=11.3, reply=1))
    fsm.handle(SpeechEnded(at=11.5))
    fsm.handle(Final(at=11.6, text=FINAL_WORDS, audio_end_at=11.5))
    tick_until_quiet(fsm, until=12.5)
    fsm.handle(PlaybackDone(at=14.0, reply=1))
    fsm.handle(Tick(at=15.1))
    fsm.handle(SpeechStarted(at=16.0))  # turn 2: a miss
    fsm.handle(Partial(at=16.5, text="and do you deliver", audio_end_at=16.5))
    fsm.handle(Tick(at=16.75))
    fsm.handle(SpeechEnded(at=17.0))
    assert tick_until_quiet(fsm, until=17.5) == []
    assert fsm.handle(Final(at=17.6, text="and do you deliver today", audio_end_at=17.0)) == [
        CancelReply(reply=2),
        StartReply(reply=3, text="and do you deliver today", speech_start_at=16.0, speech_end_at=17.0),
    ]
    assert fsm.spec_counts == counts(drafts=2, hits=1, misses=1)


# ---- drafts that are abandoned


def test_a_draft_is_cancelled_when_its_utterance_turns_out_to_be_noise():
    fsm = listening_fsm(now=10.0, **SPEC)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Partial(at=10.6, text=WORDS, audio_end_at=10.6))
    assert fsm.handle(Tick(at=10.85)) == [draft(1, WORDS, 10.5, 10.85)]
    fsm.handle(Partial(at=10.9, text="", audio_end_at=10.9))  # the recogniser took its words back
    fsm.handle(SpeechEnded(at=11.0))  # 0.5 s without words: a blip
    assert at_deadline(fsm) == [CancelReply(reply=1)]
    assert fsm.state is L
    assert fsm.next_deadline() == INF
    assert fsm.spec_counts == counts(drafts=1)


def test_a_draft_is_cancelled_when_finalizing_gives_up_on_the_final_timeout():
    fsm = drafting_fsm()
    fsm.handle(Partial(at=11.4, text="", audio_end_at=11.4))
    fsm.handle(SpeechEnded(at=11.5))
    assert at_deadline(fsm) == []
    assert fsm.state is F
    assert fsm.handle(Tick(at=12.32)) == [CancelReply(reply=1)]
    assert fsm.state is L
    assert fsm.next_deadline() == INF


def test_a_draft_is_cancelled_when_finalizing_gives_up_on_an_empty_final():
    fsm = drafting_fsm()
    fsm.handle(Partial(at=11.4, text="", audio_end_at=11.4))
    fsm.handle(SpeechEnded(at=11.5))
    at_deadline(fsm)
    assert fsm.handle(Final(at=12.1, text="", audio_end_at=11.5)) == [CancelReply(reply=1)]
    assert fsm.state is L


def test_a_draft_is_cancelled_when_the_caller_hangs_up_while_talking():
    fsm = drafting_fsm()
    assert fsm.handle(Hangup(at=11.3)) == [CancelReply(reply=1)]
    assert fsm.state is E
    assert fsm.next_deadline() == INF


def test_a_draft_is_cancelled_when_the_caller_hangs_up_while_finalizing():
    fsm = drafting_fsm()
    fsm.handle(SpeechEnded(at=11.5))
    at_deadline(fsm)
    assert fsm.state is F
    assert fsm.handle(Hangup(at=12.1)) == [CancelReply(reply=1)]
    assert fsm.state is E


def test_an_adopted_draft_is_cancelled_once_when_the_caller_hangs_up():
    fsm = adopted_fsm()
    assert fsm.handle(Hangup(at=12.1)) == [CancelReply(reply=1)]
    assert fsm.state is E
    assert fsm.next_deadline() == INF


def test_sustained_speech_before_an_adopted_draft_plays_cancels_it_and_resumes_the_turn():
    fsm = adopted_fsm()
    fsm.handle(SpeechStarted(at=12.05))
    assert fsm.next_deadline() == approx(12.35)  # barge-in comes due before spec_wait (12.4)
    assert at_deadline(fsm) == [CancelReply(reply=1, resumes_turn=True)]
    assert fsm.state is L
    assert fsm.transcript == FINAL_WORDS
    assert fsm.handle(ReplyAudioReady(at=12.5, reply=1)) == []
    assert fsm.next_deadline() == approx(12.35 + 0.25)  # speculation restarts on the whole turn


def test_losing_streaming_stt_while_finalizing_stops_the_stability_clock():
    """The fallback transcribes the utterance again, so the words being watched are gone:
    a draft of nothing must not be asked for."""
    fsm = listening_fsm(now=10.0, **SPEC)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(SpeechEnded(at=11.5))
    assert at_deadline(fsm) == []
    assert fsm.state is F
    fsm.handle(Partial(at=12.1, text=WORDS, audio_end_at=11.5))
    assert fsm.next_deadline() == approx(12.32)  # the final timeout, then the stability clock (12.35)
    assert fsm.handle(SttLost(at=12.2)) == [TranscribeFallback(speech_start_at=10.5, speech_end_at=11.5)]
    assert fsm.next_deadline() == approx(17.2)
    assert fsm.handle(Final(at=13.0, text=FINAL_WORDS, audio_end_at=11.5)) == [
        StartReply(reply=1, text=FINAL_WORDS, speech_start_at=10.5, speech_end_at=11.5)
    ]
    assert fsm.spec_counts == counts()


def test_a_draft_survives_the_fallback_and_is_adopted_if_it_hears_the_same_words():
    fsm = drafting_fsm()
    fsm.handle(SpeechEnded(at=11.5))
    at_deadline(fsm)
    assert fsm.handle(SttLost(at=12.1)) == [TranscribeFallback(speech_start_at=10.5, speech_end_at=11.5)]
    assert fsm.handle(Final(at=13.0, text=FINAL_WORDS, audio_end_at=11.5)) == [
        AdoptDraft(reply=1, text=FINAL_WORDS, speech_start_at=10.5, speech_end_at=11.5)
    ]


# ====================================================== random conversations


class _DraftLedger:
    """What a driver can check about any run with speculation on, step by step.

    Reply ids are new and in order; a draft plays only once adopted, and only
    the words it was built on; at most one unadopted draft is in flight; and
    once the call ends, every reply ever started was played or cancelled.
    """

    def __init__(self) -> None:
        self.voiced = False
        self.started: dict[int, StartReply] = {}
        self.adopted: set[int] = set()
        self.cancelled: set[int] = set()
        self.played: set[int] = set()

    def check(self, fsm: CallFSM, event, actions: list) -> None:
        self.voiced = isinstance(event, SpeechStarted) or (self.voiced and not isinstance(event, SpeechEnded))
        if isinstance(event, Tick):
            assert fsm.next_deadline() > event.at, "a due timer survived the tick"
        for action in actions:
            self._check_action(action)
        in_flight = [r for r, a in self.started.items()
                     if a.draft and r not in self.adopted and r not in self.cancelled]
        assert len(in_flight) <= 1, f"drafts {in_flight} are all in flight"

    def _check_action(self, action) -> None:
        if isinstance(action, StartReply):
            assert action.reply == max(self.started, default=0) + 1
            assert action.text.strip(), "a reply to no words"
            assert action.speech_start_at <= action.speech_end_at
            self.started[action.reply] = action
        elif isinstance(action, AdoptDraft):
            drafted = self.started[action.reply]
            assert drafted.draft and action.reply not in self.cancelled | self.adopted
            assert normalize_for_match(action.text) == normalize_for_match(drafted.text)
            self.adopted.add(action.reply)
        elif isinstance(action, BeginPlayback):
            assert action.reply in self.started and action.reply not in self.cancelled | self.played
            assert not self.started[action.reply].draft or action.reply in self.adopted, "an unadopted draft played"
            self.played.add(action.reply)
        elif isinstance(action, CancelReply) and action.reply:
            assert action.reply in self.started and action.reply not in self.cancelled
            self.cancelled.add(action.reply)

    def check_ended(self) -> None:
        leaked = set(self.started) - self.cancelled - self.played
        assert not leaked, f"replies {leaked} were never played nor cancelled"


def _random_event(data, fsm: CallFSM, now: float, ledger: _DraftLedger):
    kind = data.draw(st.sampled_from(
        4 * ["tick_deadline"] + 3 * ["speech"] + 2 * ["partial", "final", "audio"]
        + ["done", "tick", "stt_lost", "stt_ready"]))
    words = st.sampled_from(["", "yes", "do you", WORDS, FINAL_WORDS, "what time do you open on sunday",
                             "אני רוצה להזמין שולחן לארבעה", "a table for the"])
    if kind == "tick_deadline" and fsm.next_deadline() < INF:
        return Tick(at=max(now, fsm.next_deadline()))
    if kind in ("tick", "tick_deadline"):
        return Tick(at=now)
    if kind == "speech":
        return SpeechEnded(at=now) if ledger.voiced else SpeechStarted(at=now)
    if kind in ("partial", "final"):
        cls = Partial if kind == "partial" else Final
        return cls(at=now, text=data.draw(words), audio_end_at=now - data.draw(st.sampled_from([0.0, 0.3, 3.0])))
    newest = max(ledger.started, default=0)
    reply = data.draw(st.sampled_from(sorted({newest, max(newest - 1, 0), fsm.reply})))
    if kind == "audio":
        return ReplyAudioReady(at=now, reply=reply)
    if kind == "done":
        return PlaybackDone(at=now, reply=reply)
    return {"stt_lost": SttLost, "stt_ready": SttReady}[kind](at=now)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans())
def test_any_conversation_with_speculation_keeps_the_draft_promises(data, early_finalize):
    fsm = new_fsm(**SPEC | dict(early_finalize=early_finalize))
    fsm.handle(CallStarted(at=0.0))
    ledger, now = _DraftLedger(), 0.0
    for _ in range(data.draw(st.integers(1, 80))):
        now += data.draw(st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5]))
        event = _random_event(data, fsm, now, ledger)
        now = max(now, event.at)
        ledger.check(fsm, event, fsm.handle(event))
    ledger.check(fsm, Hangup(at=now), fsm.handle(Hangup(at=now)))
    assert fsm.state is E and fsm.next_deadline() == INF
    ledger.check_ended()
    assert fsm.spec_counts["drafts"] == sum(a.draft for a in ledger.started.values())
    assert fsm.spec_counts["hits"] == len(ledger.adopted)


# ================================================== under a Trio MockClock


async def test_a_speculative_hit_runs_under_trio_mock_clock(autojump_clock):
    """A tiny driver like call.py's: the next event or the next deadline, whichever comes first."""
    fsm = new_fsm(**SPEC | dict(early_finalize=True))
    script = [
        CallStarted(at=0.0), PlaybackDone(at=3.0, reply=0),
        SpeechStarted(at=5.0), Partial(at=5.4, text=WORDS, audio_end_at=5.4),
        ReplyAudioReady(at=5.9, reply=1),  # the draft's first audio, while the caller still talks
        SpeechEnded(at=6.0), Final(at=6.1, text=FINAL_WORDS, audio_end_at=6.0),
        PlaybackDone(at=8.0, reply=1), Hangup(at=10.0),
    ]
    log = await drive_under_trio_clock(fsm, script)

    assert log == [
        (0.0, "CallStarted", [PlayGreeting()], G),
        (3.0, "PlaybackDone", [ReplyFinished(reply=0)], R),
        (approx(4.1), "Tick", [], L),
        (5.0, "SpeechStarted", [], L),
        (5.4, "Partial", [], L),
        (approx(5.65), "Tick", [draft(1, WORDS, 5.0, approx(5.65))], L),
        (5.9, "ReplyAudioReady", [], L),
        (6.0, "SpeechEnded", [], L),
        (6.1, "Final", [], L),
        (approx(6.22), "Tick",  # early finalize: strong words, one hangover of silence
         [AdoptDraft(reply=1, text=FINAL_WORDS, speech_start_at=5.0, speech_end_at=6.0)], T),
        (approx(6.78), "Tick", [BeginPlayback(reply=1)], S),  # audio ready; the hesitation guard has passed
        (8.0, "PlaybackDone", [ReplyFinished(reply=1)], R),
        (approx(9.1), "Tick", [], L),
        (10.0, "Hangup", [], E),
    ]
    assert fsm.spec_counts == counts(drafts=1, hits=1)
    assert fsm.required_silence_s == approx(0.22)


# -- echo guard and words-before-barge-in (issue 4) ---------------------------------------

def _speaking(**feature):
    """An FSM in SPEAKING since 14.4 (reply 1), built from real events, with one barge-in ``feature``."""
    fsm = new_fsm(**BASE | feature)
    fsm.handle(CallStarted(at=0.0))
    fsm.handle(PlaybackDone(at=1.0, reply=0))
    fsm.handle(Tick(at=2.1))
    fsm.handle(SpeechStarted(at=12.0))
    fsm.handle(Final(at=12.4, text="what time do you open", audio_end_at=12.3))
    fsm.handle(SpeechEnded(at=12.5))
    fsm.handle(Tick(at=fsm.next_deadline()))
    assert fsm.state is State.THINKING
    fsm.handle(ReplyAudioReady(at=14.3, reply=1))
    fsm.handle(Tick(at=fsm.next_deadline()))
    assert fsm.state is State.SPEAKING
    return fsm


def test_speech_inside_the_echo_guard_counts_only_from_the_guard_end():
    fsm = _speaking(barge_in_guard_s=0.25)
    started = fsm._audio_since  # noqa: SLF001 -- the instant playback began
    fsm.handle(SpeechStarted(at=started + 0.05))
    assert fsm.next_deadline() == pytest.approx(started + 0.25 + 0.3)
    assert fsm.handle(Tick(at=started + 0.35)) == []
    assert fsm.state is State.SPEAKING


def test_a_short_echo_inside_the_guard_never_interrupts():
    fsm = _speaking(barge_in_guard_s=0.25)
    started = fsm._audio_since  # noqa: SLF001
    fsm.handle(SpeechStarted(at=started + 0.05))
    fsm.handle(SpeechEnded(at=started + 0.4))
    assert fsm.handle(Tick(at=started + 1.0)) == []
    assert fsm.state is State.SPEAKING


def test_sustained_speech_without_words_waits_for_words_to_interrupt():
    fsm = _speaking(barge_in_requires_words=True)
    fsm.handle(SpeechStarted(at=15.0))
    assert fsm.handle(Tick(at=15.3)) == []  # loud, but no words yet: maybe noise
    assert fsm.state is State.SPEAKING
    actions = fsm.handle(Partial(at=15.6, text="wait", audio_end_at=15.5))
    assert actions == [StopPlayback(), CancelReply(reply=1)]
    assert fsm.state is State.LISTENING


def test_noise_that_never_carries_words_does_not_interrupt():
    fsm = _speaking(barge_in_requires_words=True)
    fsm.handle(SpeechStarted(at=15.0))
    fsm.handle(Tick(at=15.3))
    fsm.handle(SpeechEnded(at=15.8))
    assert fsm.handle(Partial(at=16.0, text="", audio_end_at=15.8)) == []
    assert fsm.state is State.SPEAKING


def test_words_already_heard_let_sustained_speech_interrupt_on_time():
    fsm = _speaking(barge_in_requires_words=True)
    fsm.handle(SpeechStarted(at=15.0))
    fsm.handle(Partial(at=15.2, text="excuse me", audio_end_at=15.2))
    assert fsm.handle(Tick(at=15.3)) == [StopPlayback(), CancelReply(reply=1)]


def test_barge_in_waits_for_the_vad_hangover_so_a_short_blip_cannot_interrupt():
    fsm = _speaking(barge_in_confirm_s=0.22)
    fsm.handle(SpeechStarted(at=15.0))
    assert fsm.next_deadline() == pytest.approx(15.52)
    fsm.handle(SpeechEnded(at=15.15))  # reported at 15.37, after the hangover: a 150 ms blip
    assert fsm.handle(Tick(at=15.6)) == []
    assert fsm.state is State.SPEAKING


def test_sustained_speech_still_interrupts_after_the_confirmation():
    fsm = _speaking(barge_in_confirm_s=0.22)
    fsm.handle(SpeechStarted(at=15.0))
    assert fsm.handle(Tick(at=15.5)) == []
    assert fsm.handle(Tick(at=fsm.next_deadline())) == [StopPlayback(), CancelReply(reply=1)]
