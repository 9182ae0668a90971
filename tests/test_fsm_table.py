"""Specification of the FSM's table itself, of the agent ending a call, and of the
timeouts and facts the FSM hands to the driver (agentd/fsm.py).

Every FSM here runs the shipped settings (etc/agentd.toml) unless a test says
otherwise: filler after 1.2 s, marks given 3 s beyond the queued audio.
"""

from __future__ import annotations

import random
import re
import typing
from pathlib import Path

import pytest
from pytest import approx

from agentd import fsm as fsm_module
from agentd.fsm import (
    GOODBYE, AdoptDraft, BeginPlayback, CallStarted, CancelReply, EndCall, Event, Final, FsmError, Partial,
    PlaybackDone, PlayGoodbye, ReplyAudioReady, ReplyFinished, ReplyQueued, SayFiller, SpeechEnded,
    SpeechStarted, StartReply, State, StopPlayback, SttLost, Tick, Timer, TranscribeFallback, WindDown,
)
from fsm_helpers import (
    BUILDERS, DEFAULTS, RNG_SEED, closing_fsm, listening_fsm, speaking_fsm, thinking_fsm,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "fsm.md"
TABLE = fsm_module._TABLE  # the specification under test
G, R, L, F, T, H, S, C, E = (State.GREETING, State.REFRACTORY, State.LISTENING, State.FINALIZING,
                             State.THINKING, State.HOLDING, State.SPEAKING, State.CLOSING, State.ENDED)
LIVE = [s for s in State if s is not E]


# ------------------------------------------------------------- the table ---


def test_every_row_is_keyed_by_a_state_and_an_event_type_or_a_timer_and_names_real_states():
    event_types = set(typing.get_args(Event))
    for (state, key), row in TABLE.items():
        assert isinstance(state, State)
        assert key in event_types or isinstance(key, Timer), key
        assert key is not Tick, "Tick is the clock: each timer it fires has its own row"
        assert all(isinstance(target, State) for target in row.targets)
        assert state not in row.targets, "a row that keeps the state names no target"


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.name)
def test_every_state_has_a_row_for_every_event_but_the_clock(state):
    for event_type in typing.get_args(Event):
        if event_type is Tick or (event_type is CallStarted and state is not G):
            continue
        assert (state, event_type) in TABLE, f"{state.name} x {event_type.__name__}"


def test_only_ended_is_final_and_every_live_state_can_reach_it():
    reach = {s: {t for (src, _), row in TABLE.items() if src is s for t in row.targets} for s in State}
    assert reach[E] == set()
    for state in LIVE:
        seen, todo = set(), [state]
        while todo:
            for nxt in reach[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert E in seen, state.name


def test_every_timer_has_a_row_somewhere():
    assert {key for (_, key) in TABLE if isinstance(key, Timer)} == set(Timer)


def test_an_event_with_no_row_names_the_driver_as_the_culprit():
    with pytest.raises(FsmError, match="CallStarted is not expected in SPEAKING .*driver"):
        speaking_fsm().handle(CallStarted(at=30.0))


# ------------------------------------------------------------ the diagram ---


def test_the_diagram_in_the_docs_is_the_table():
    block = re.search(r"```mermaid\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert block is not None, "docs/fsm.md has no mermaid block"
    assert block.group(1) == fsm_module.mermaid(), "regenerate with: python -m agentd.fsm --diagram"


def test_the_diagram_draws_every_row_that_changes_state(capsys):
    assert fsm_module.main(["--diagram"]) == 0
    drawn = capsys.readouterr().out
    assert drawn.startswith("stateDiagram-v2\n")
    for (state, key), row in TABLE.items():
        label = f"timer {key.name}" if isinstance(key, Timer) else key.__name__
        for target in row.targets:
            line = next(x for x in drawn.splitlines() if x.startswith(f"    {state.name} --> {target.name}:"))
            assert label in line


def test_the_diagram_command_wants_its_flag(capsys):
    assert fsm_module.main([]) == 2
    assert "usage" in capsys.readouterr().err


# ------------------------------------------------- the agent ends the call ---


@pytest.mark.parametrize("state, stops", [
    (G, [StopPlayback(), CancelReply(reply=0)]),
    (R, []), (L, []), (F, []),
    (T, [CancelReply(reply=1)]), (H, [CancelReply(reply=1)]),
    (S, [StopPlayback(), CancelReply(reply=1)]),
], ids=lambda x: getattr(x, "name", ""))
def test_winding_down_stops_what_the_agent_does_and_says_goodbye(state, stops):
    fsm = BUILDERS[state](spec_enabled=False)  # no draft to drop: the next test has one
    assert fsm.handle(WindDown(at=30.0, reason="idle caller")) == [*stops, PlayGoodbye()]
    assert fsm.state is C
    assert fsm.reply == GOODBYE


def test_winding_down_drops_a_draft_too():
    fsm = listening_fsm(now=10.0)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Partial(at=11.0, text="what time do you open", audio_end_at=11.0))
    [draft] = fsm.handle(Tick(at=fsm.next_deadline()))
    assert draft.draft
    assert fsm.handle(WindDown(at=11.5, reason="limit")) == [CancelReply(reply=draft.reply), PlayGoodbye()]


def test_the_caller_cannot_interrupt_the_goodbye():
    fsm = closing_fsm(now=18.0)
    for event in (SpeechStarted(at=18.1), Final(at=18.5, text="wait, one more thing", audio_end_at=18.4),
                  SpeechEnded(at=19.0), SttLost(at=19.1), WindDown(at=19.2, reason="again")):
        assert fsm.handle(event) == []
        assert fsm.state is C
    assert fsm.next_deadline() == float("inf")


def test_the_end_of_the_goodbye_ends_the_call_with_the_reason():
    fsm = closing_fsm(now=18.0)
    assert fsm.handle(PlaybackDone(at=19.0, reply=1)) == []  # a mark of the reply it cut off
    assert fsm.handle(PlaybackDone(at=20.0, reply=GOODBYE)) == [
        ReplyFinished(reply=GOODBYE), EndCall(reason="idle caller")]
    assert fsm.state is E


def test_a_goodbye_whose_marks_never_come_back_still_ends_the_call():
    fsm = closing_fsm(now=18.0)
    assert fsm.handle(ReplyQueued(at=18.1, reply=GOODBYE, playout_s=2.0)) == []
    assert fsm.next_deadline() == approx(18.1 + 2.0 + DEFAULTS.mark_timeout_s)
    assert fsm.handle(Tick(at=fsm.next_deadline())) == [
        ReplyFinished(reply=GOODBYE, marks_lost=True), EndCall(reason="idle caller")]
    assert fsm.state is E


# --------------------------------------------------- the call's timeouts ---
# thinking_fsm(now=14.0): reply 1 committed at 14.0 for speech 12.5 .. 13.5.


def test_a_reply_with_no_audio_by_filler_after_s_gets_a_filler():
    fsm = thinking_fsm(now=14.0)
    assert fsm.next_deadline() == approx(13.5 + DEFAULTS.filler_after_s)
    assert fsm.handle(Tick(at=fsm.next_deadline())) == [SayFiller(reply=1)]
    assert fsm.state is T
    assert fsm.next_deadline() == float("inf")
    fsm.handle(ReplyAudioReady(at=14.8, reply=1))  # the filler is the first audio
    assert fsm.handle(Tick(at=fsm.next_deadline())) == [BeginPlayback(reply=1)]


def test_audio_in_time_means_no_filler():
    fsm = thinking_fsm(now=14.0)
    fsm.handle(ReplyAudioReady(at=14.3, reply=1))
    actions = []
    while fsm.next_deadline() < 20.0:
        actions += fsm.handle(Tick(at=fsm.next_deadline()))
    assert actions == [BeginPlayback(reply=1)]


def test_with_filler_after_zero_no_filler_is_ever_due():
    fsm = thinking_fsm(now=14.0, filler_after_s=0.0)
    assert fsm.next_deadline() == float("inf")


def test_a_reply_whose_marks_never_come_back_ends_after_its_audio_and_the_mark_timeout():
    fsm = speaking_fsm(now=16.0)
    assert fsm.handle(ReplyQueued(at=16.2, reply=1, playout_s=1.5)) == []
    assert fsm.next_deadline() == approx(16.2 + 1.5 + DEFAULTS.mark_timeout_s)
    assert fsm.handle(Tick(at=fsm.next_deadline())) == [ReplyFinished(reply=1, marks_lost=True)]
    assert fsm.state is R


def test_the_queue_report_of_another_reply_arms_nothing():
    fsm = speaking_fsm(now=16.0)
    assert fsm.handle(ReplyQueued(at=16.2, reply=7, playout_s=1.5)) == []
    assert fsm.next_deadline() == float("inf")


# ------------------------------------------------------ facts in actions ---


def test_playback_carries_the_pause_the_breath_added():
    fsm = thinking_fsm(now=14.0, breath_min_s=0.8, breath_max_s=1.2)  # the caller stopped at 13.5
    fsm.handle(ReplyAudioReady(at=14.1, reply=1))
    [begin] = fsm.handle(Tick(at=fsm.next_deadline()))
    assert begin == BeginPlayback(reply=1)
    assert begin.breath_s == approx(13.5 + random.Random(RNG_SEED).uniform(0.8, 1.2) - 14.1)


def test_playback_of_a_reply_slower_than_a_breath_carries_no_pause():
    fsm = thinking_fsm(now=14.0)
    fsm.handle(ReplyAudioReady(at=14.3, reply=1))
    [begin] = fsm.handle(Tick(at=fsm.next_deadline()))
    assert begin.breath_s == 0.0


def test_a_reply_carries_the_silence_the_end_of_turn_rule_demanded():
    fsm = listening_fsm(now=10.0, early_finalize=False, spec_enabled=False)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Final(at=11.4, text="do you deliver", audio_end_at=11.4))
    fsm.handle(SpeechEnded(at=11.5))
    [start] = fsm.handle(Tick(at=fsm.next_deadline()))
    assert isinstance(start, StartReply)
    assert start.required_silence_s == approx(DEFAULTS.min_silence_short_s)
    assert start.speculation == "none" and start.fallbacks == ()


def test_an_adopted_draft_says_it_was_a_hit():
    fsm = listening_fsm(now=10.0)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(Partial(at=11.0, text="what time do you open", audio_end_at=11.0))
    fsm.handle(Tick(at=fsm.next_deadline()))  # drafted
    fsm.handle(SpeechEnded(at=11.5))
    fsm.handle(Final(at=11.6, text="What time do you open?", audio_end_at=11.5))
    [adopt] = fsm.handle(Tick(at=fsm.next_deadline()))
    assert isinstance(adopt, AdoptDraft)
    assert adopt.speculation == "hit"
    assert adopt.required_silence_s == approx(DEFAULTS.hangover_s)  # strong words: early finalize


def test_a_turn_heard_by_the_fallback_says_so():
    fsm = listening_fsm(now=10.0, streaming_stt=False)
    fsm.handle(SpeechStarted(at=10.5))
    fsm.handle(SpeechEnded(at=11.5))
    assert fsm.handle(Tick(at=fsm.next_deadline())) == [TranscribeFallback(speech_start_at=10.5, speech_end_at=11.5)]
    [start] = fsm.handle(Final(at=12.5, text="do you deliver", audio_end_at=11.5))
    assert start.fallbacks == ("stt_recognize",)

