"""The turn-taking benchmark's corpus and its verdicts on a caller turn (pure parts, no calls placed)."""

import numpy as np
import pytest

from agentd.testbed.softphone.caller_audio import last_voiced_offset_ms
from agentd.codecs.mulaw import ulaw_encode
from agentd.testbed.softphone.script import TurnReport
from bench.hesitations import CORPUS, MAX_PAUSE_MS, MIN_PAUSE_MS, first_voiced_offset_ms, join_with_pause, script_lines
from bench.turn_taking import heard_the_end, owner, verdict

BOOK = CORPUS[0]  # "I'd like to book a table ... for four people tomorrow", one recognizer result
OPEN = CORPUS[1]  # "What time do you open ... on Saturday morning", a final after each half


def tone_ms(ms: int) -> bytes:
    t = np.arange(ms * 8) / 8000
    return ulaw_encode((np.sin(2 * np.pi * 300 * t) * 8000).astype(np.int16))


def quiet_ms(ms: int) -> bytes:
    return ulaw_encode(np.zeros(ms * 8, dtype=np.int16))


def spoken(v2v_ms: int | None) -> TurnReport:
    return TurnReport(index=1, label="", dtmf="", caller_audio_ms=4000, started_ms=0, speech_end_ms=3600,
                      answered=v2v_ms is not None, v2v_ms=v2v_ms, reply_audio_ms=2000, reply_frames=100,
                      settled=True, clears=0, marks_echoed=())


def test_the_pause_is_exactly_the_silence_between_the_voiced_parts():
    joined = join_with_pause(quiet_ms(200) + tone_ms(600) + quiet_ms(300), quiet_ms(160) + tone_ms(400), 520)
    assert last_voiced_offset_ms(joined) == 200 + 600 + 520 + 400
    assert first_voiced_offset_ms(joined[(200 + 600) * 8:]) == 520


def test_the_corpus_has_both_languages_both_recognizer_behaviours_and_hesitations_in_range():
    assert {turn.language for turn in CORPUS} == {"en-us", "he"}
    assert {turn.closes_result for turn in CORPUS} == {True, False}
    assert all(MIN_PAUSE_MS <= turn.pause_ms <= MAX_PAUSE_MS for turn in CORPUS)
    assert script_lines(CORPUS)[:4] == ["I'd like to book a table", "+ for four people tomorrow.",
                                        "What time do you open?", "On Saturday morning?"]


@pytest.mark.parametrize(
    ("caller_text", "turn"),
    [
        ("I'd like to book a table", 0),
        ("I'd like to book a table I'd like to book a table for four people tomorrow.", 0),
        ("for four people tomorrow. What time do you open? On Saturday morning?", 1),  # a late final before it
        ("מתי אתם פותחים?", 5),
        ("something else entirely", None),
    ],
)
def test_a_transcript_belongs_to_the_turn_it_shares_most_words_with(caller_text, turn):
    assert owner(caller_text, CORPUS) == turn


def test_a_reply_hears_the_end_only_with_the_last_two_words_in_order():
    assert heard_the_end("I'd like to book a table for four people tomorrow.", BOOK)
    assert heard_the_end("What time do you open? On Saturday morning?", OPEN)
    assert not heard_the_end("I'd like to book a table", BOOK)
    assert not heard_the_end("tomorrow people", BOOK)


def test_verdicts_on_one_caller_turn():
    whole = {"caller_text": "I'd like to book a table for four people tomorrow."}
    half = {"caller_text": "I'd like to book a table"}
    doubled = {"caller_text": "I'd like to book a table I'd like to book a table for four people tomorrow."}
    clean = verdict(0, spoken(720), [whole], BOOK)
    assert clean.complete and (clean.talk_over, clean.half_answers, clean.garbled) == (False, 0, 0)
    over = verdict(0, spoken(-1200), [half, whole], BOOK)
    assert not over.complete and over.talk_over and over.half_answers == 1
    late_half = verdict(0, spoken(900), [half], BOOK)
    assert not late_half.complete and not late_half.talk_over and late_half.half_answers == 1
    repeated = verdict(0, spoken(900), [doubled], BOOK)
    assert repeated.complete and repeated.garbled == 1  # all words heard, some twice: answered, but noted
    assert not verdict(0, spoken(None), [], BOOK).complete
