"""The per-call state machine: every rule that decides what a call does next.

Theory of operation
-------------------
A call is a conversation of turns. The caller's voice is reported by two
independent sources: the VAD (fast, says *when* the caller speaks) and the
recogniser (slow, says *what* was said). Neither alone ends a turn: Google's
``is_final`` closes a transcript *segment* (one sentence with a pause gives
several), and VAD silence may be a breath. The FSM combines them.

``_TABLE`` is the whole machine. Each row is keyed by (state, event type) or
(state, timer kind) and names its handler and every state it may lead to
(none: it never leaves the state). Timers are events like any other: the
driver asks ``next_deadline()`` and sends ``Tick(at=now)``; each timer due by
then fires *as of its deadline*, through its own row, so decisions do not
depend on how late the driver ticked. A pair missing from the table raises
``FsmError`` naming the culprit (the driver for an event, this module for a
timer); harmless stragglers have explicit ignore rows. No handler looks at
the current state: where two states behave differently they have different
handlers. ``python -m agentd.fsm --diagram`` draws the table (docs/fsm.md).

The handlers live by topic in mixins that ``CallFSM`` inherits:
``agentd.fsm_turn`` (the caller's turn), ``agentd.fsm_playback`` (the agent's
voice and barge-in), ``agentd.fsm_drafts`` (speculative drafts) and
``agentd.fsm_phone`` (ending the call, the keypad, hanging up); the facts they
share are in ``agentd.fsm_memory``. Which handler runs, and which states it may
enter, is decided here alone, by the table.

Facts the rules keep between events (not states): the open utterance, the
transcript, the last committed turn (to drop late results and to resume it),
whether streaming STT is up, whether a sustained interruption only waits for
words, and the speculation bookkeeping (``agentd.speculation``).

The FSM is sans-I/O: it imports no Trio, sockets or clocks. ``handle(event)``
returns the actions for the driver to carry out; actions carry the facts the
driver records. Every timeout of the call is one of its timers, including the
filler and the wait for Twilio's last mark.

Transcripts: results whose audio ends before the last commit belong to a turn
already answered (found by comparing ``audio_end_at`` with the commit time).
Only one matters: Google's late final for words answered on an interim result,
which revises them in history (``ReviseTurn``); it is never answered again.

Latency: a "strong" transcript ends the turn before the full silence rule
(early finalize): a punctuated sentence after the VAD hangover, long words
without punctuation after ``strong_bare_silence_s``, words that stop
mid-phrase never. A turn its words ended is answered at once, without waiting
for the final. A caller who goes on before the reply plays continues the same
turn: the reply is cancelled at their first new words, so no answer to half a
turn is ever heard. A transcript that holds still for
``spec_stable_s`` starts a *draft* reply (``StartReply(draft=True)``): the LLM
thinks while the caller may still be talking, nothing plays. At the end of the
turn a draft built on the same words is adopted (``AdoptDraft``), any other is
cancelled -- a draft is never heard unless the caller ended with its words.

Barge-in needs sustained speech (``barge_in_min_s``), counted only after the
echo guard at the start of agent audio, and optionally recognized words, so
line noise and the agent's own echo do not interrupt it. ``WindDown`` (the
agent ends the call) stops everything, plays the goodbye in CLOSING, which
the caller cannot interrupt, and ends the call with ``EndCall``.
"""

from __future__ import annotations

import random
import sys
import typing
from dataclasses import dataclass

from agentd.dtmf import DigitCollector
from agentd.fsm_drafts import DraftRules
from agentd.fsm_events import (
    GOODBYE, Action, AdoptDraft, AgentEnds, BeginPlayback, CallStarted, CancelReply, EndCall, Event, Final,
    FsmError, Hangup, KeyPressed, Partial, PlaybackDone, PlayGoodbye, PlayGreeting, PlayLine, ReplyAudioReady,
    ReplyFinished, ReplyQueued, ReviseTurn, SayFiller, SpeechEnded, SpeechStarted, StartReply, State, StopPlayback,
    SttLost, SttReady, Tick, Timer, TranscribeFallback, TurnSettings, WindDown,
)
from agentd.fsm_memory import HUNG_UP, SILENT, TRANSFERRED, Ending, Transcript, Turn, Utterance
from agentd.fsm_memory import model_ending  # noqa: F401 -- a name of agentd.fsm, used with Ending
from agentd.fsm_phone import PhoneRules
from agentd.fsm_playback import PlaybackRules
from agentd.fsm_turn import TurnRules
from agentd.speculation import Speculation

__all__ = [
    "GOODBYE", "HUNG_UP", "SILENT", "TRANSFERRED", "Action", "AdoptDraft", "AgentEnds", "BeginPlayback",
    "CallFSM", "CallStarted", "CancelReply", "EndCall", "Ending", "Event", "Final", "FsmError", "Hangup",
    "KeyPressed", "Partial", "PlayGoodbye", "PlayGreeting", "PlayLine", "PlaybackDone",
    "ReplyAudioReady", "ReplyFinished", "ReplyQueued", "ReviseTurn", "SayFiller", "SpeechEnded", "SpeechStarted",
    "StartReply", "State", "StopPlayback", "SttLost", "SttReady", "Tick", "Timer", "TranscribeFallback",
    "TurnSettings", "WindDown", "mermaid",
]


# ------------------------------------------------------------------- FSM ---


class CallFSM(TurnRules, PlaybackRules, DraftRules, PhoneRules):
    """One call's decisions. Feed events with ``handle``; honour the actions.

    The core is here: the call's facts, ``handle`` and the timers, and entering
    a state. The handlers the table names are inherited, one mixin per group of
    rules (see the module docstring).
    """

    def __init__(self, settings: TurnSettings, *, rng: random.Random | None = None,
                 keypad: typing.Mapping[str, Ending] | None = None, reprompt: bool = False):
        """``keypad``: the business's single-digit actions; ``reprompt``: it has a reprompt line (else a silent caller is left be)."""
        self.settings = settings
        self.state = State.GREETING
        self.path: tuple[State, ...] = ()  # states entered by the last handle(), in order
        self.streaming_stt = settings.streaming_stt
        self.spec = Speculation(min_chars=settings.spec_min_chars)
        self.breath_s = 0.0  # the pause the breath added before the last playback (also in BeginPlayback)
        self._rng = rng or random.Random()
        self._timers: dict[Timer, float] = {}
        self._utt: Utterance | None = None
        self._transcript = Transcript()
        self._reply = 0  # the reply being thought about or spoken (0 = greeting)
        self._replies_started = 0
        self._turn = Turn()
        self._via_fallback = False  # the open turn is transcribed by the unary fallback
        self._audio_since = 0.0  # when the agent's current playback began
        self._last_words_at = float("-inf")  # when the recognizer last heard words
        self._awaiting_words = False  # sustained speech that may interrupt once words are heard
        self._eot_silence = 0.0
        self._eot_strong = False  # the strong-transcript rule set the end of turn: commit at once
        self._ending = Ending("")  # set when the agent starts ending the call
        self._endings: dict[int, Ending] = {}  # replies whose model ended the call
        self._keypad = dict(keypad or {})
        self._keys = DigitCollector(settings.dtmf_digit_timeout_s)
        self._idle_reprompt = reprompt and settings.idle_reprompt_s > 0
        self._idle_due: float | None = None  # when the silent caller is reprompted (while the floor is theirs)
        self._reprompts = 0  # reprompts said since the caller last spoke words

    def __repr__(self) -> str:
        armed = sorted((timer.value, at) for timer, at in self._timers.items())
        timers = ", ".join(f"{name}@{at:.3f}" for name, at in armed)
        return f"<CallFSM {self.state.name} reply={self._reply} text={self.transcript!r} timers=[{timers}]>"

    # -- public queries ----------------------------------------------------

    @property
    def transcript(self) -> str:
        return self._transcript.text()

    @property
    def reply(self) -> int:
        return self._reply

    @property
    def required_silence_s(self) -> float:
        """The silence the end-of-turn rule demanded of the last committed turn."""
        return self._turn.silence_s

    @property
    def spec_counts(self) -> dict[str, int]:
        return dict(self.spec.counts)

    def next_deadline(self) -> float:
        """When the driver must send the next ``Tick`` (inf: no timer armed)."""
        return min(self._timers.values(), default=float("inf"))

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; return the actions the driver must carry out, in order."""
        self.path = ()
        if isinstance(event, Tick):
            return self._on_tick(event.at)
        if (self.state, type(event)) not in _TABLE:
            raise FsmError(f"{type(event).__name__} is not expected in {self.state.name} "
                           "(the driver fed an event this state has no rule for)")
        return self._apply((self.state, type(event)), event)

    # -- plumbing ----------------------------------------------------------

    def _on_tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        while self._timers:
            timer, when = min(self._timers.items(), key=lambda kv: kv[1])
            if when > now:
                break
            del self._timers[timer]
            if (self.state, timer) not in _TABLE:
                raise FsmError(f"timer {timer.name} fired in {self.state.name}, which has no rule for it "
                               "(an FSM bug: a state kept a timer it cannot handle)")
            actions += self._apply((self.state, timer), when)
        return actions

    def _apply(self, key: tuple[State, type | Timer], arg: Event | float) -> list[Action]:
        row = _TABLE[key]
        entered = len(self.path)
        actions = row.handler(self, arg) or []
        for state in self.path[entered:]:
            if state not in row.targets:
                raise FsmError(f"row {key[0].name} x {_name(key[1])} entered {state.name}, "
                               "which the table does not list (an FSM bug)")
        return actions

    def _ignore(self, event: Event | float) -> None:
        return None

    def _enter(self, state: State, *, keep: tuple[Timer, ...] = ()) -> None:
        """Move to ``state``; timers belong to the state they were armed in, except ``keep``."""
        if state is not self.state:
            self.path += (state,)
        self.state = state
        if state not in (State.CLOSING, State.ENDED):
            keep = (*keep, Timer.DTMF)  # a keypad entry goes on whatever the agent does
        kept = {timer: self._timers[timer] for timer in keep if timer in self._timers}
        self._timers.clear()
        self._timers.update(kept)
        if state in (State.REFRACTORY, State.LISTENING) and self._idle_due is not None:
            self._timers[Timer.IDLE] = self._idle_due  # the floor is still the silent caller's


# ------------------------------------------------------------- the table ---


@dataclass(frozen=True, slots=True)
class _Row:
    handler: typing.Callable[..., list[Action] | None]
    targets: tuple[State, ...] = ()  # every state the row may lead to; () = it stays


G, R, L, F, T, H, S, C, E = (
    State.GREETING, State.REFRACTORY, State.LISTENING, State.FINALIZING, State.THINKING,
    State.HOLDING, State.SPEAKING, State.CLOSING, State.ENDED,
)
_ = CallFSM


def _rows(handler, *keys, to: tuple[State, ...] = ()) -> dict:
    return {key: _Row(handler, to) for key in keys}


# The specification. Read a row as: in STATE, on EVENT or TIMER, do HANDLER, possibly moving to TARGETS.
_TABLE: dict[tuple[State, type | Timer], _Row] = {
    (G, CallStarted): _Row(_._start),
    (G, SpeechStarted): _Row(_._greeting_speech),
    (G, SpeechEnded): _Row(_._disarm_barge_in),
    **_rows(_._words_over_audio, (G, Partial), (G, Final), to=(L,)),
    (G, ReplyAudioReady): _Row(_._ignore),
    (G, ReplyQueued): _Row(_._arm_mark_wait),
    (G, PlaybackDone): _Row(_._playback_done, (R,)),
    (G, Timer.BARGE_IN): _Row(_._interrupt_playback, (L,)),
    (G, Timer.MARK_WAIT): _Row(_._marks_lost, (R,)),
    (G, WindDown): _Row(_._wind_down_playing, (C,)),
    (G, KeyPressed): _Row(_._key_playing, (T, C)),
    (G, Timer.DTMF): _Row(_._keys_done_playing, (T,)),

    (R, SpeechStarted): _Row(_._hold_speech),
    (R, SpeechEnded): _Row(_._release_speech),
    **_rows(_._refractory_result, (R, Partial), (R, Final), to=(L,)),
    (R, ReplyAudioReady): _Row(_._ignore),
    (R, ReplyQueued): _Row(_._ignore),
    (R, PlaybackDone): _Row(_._ignore),  # stale echo of a finished reply
    (R, Timer.REFRACTORY): _Row(_._open_listening, (L,)),
    (R, WindDown): _Row(_._wind_down, (C,)),
    (R, Timer.IDLE): _Row(_._idle_timeout, (S, C)),

    (L, SpeechStarted): _Row(_._listening_speech),
    (L, SpeechEnded): _Row(_._listening_silence),
    **_rows(_._listening_result, (L, Partial), (L, Final)),
    (L, ReplyAudioReady): _Row(_._draft_audio_ready),  # a draft's, or an abandoned reply's
    (L, ReplyQueued): _Row(_._ignore),
    (L, PlaybackDone): _Row(_._ignore),  # marks echoed by our own `clear`
    (L, Timer.END_OF_TURN): _Row(_._end_of_turn, (F, T)),  # THINKING at once if the transcript is in
    (L, Timer.SPEC_STABLE): _Row(_._draft_now),
    (L, WindDown): _Row(_._wind_down, (C,)),
    (L, Timer.IDLE): _Row(_._idle_timeout, (S, C)),

    (F, SpeechStarted): _Row(_._finalizing_resumed, (L,)),
    (F, SpeechEnded): _Row(_._release_speech),
    **_rows(_._finalizing_result, (F, Partial), (F, Final), to=(T, L)),
    (F, ReplyAudioReady): _Row(_._draft_audio_ready),
    (F, ReplyQueued): _Row(_._ignore),
    (F, PlaybackDone): _Row(_._ignore),
    (F, SttLost): _Row(_._finalizing_stt_lost),
    (F, Timer.FINAL_WAIT): _Row(_._final_wait_over, (T, L)),
    (F, Timer.SPEC_STABLE): _Row(_._draft_now),
    (F, WindDown): _Row(_._wind_down, (C,)),

    (T, SpeechStarted): _Row(_._speech_while_thinking),
    (T, SpeechEnded): _Row(_._disarm_barge_in),
    **_rows(_._words_while_thinking, (T, Partial), (T, Final), to=(L,)),
    (T, ReplyAudioReady): _Row(_._reply_audio_ready),
    (T, ReplyQueued): _Row(_._ignore),
    (T, PlaybackDone): _Row(_._ignore),
    (T, Timer.BREATH): _Row(_._breath_taken, (S, H, C)),  # CLOSING: the model's last words
    (T, Timer.BARGE_IN): _Row(_._interrupt_thinking, (L,)),
    (T, Timer.SPEC_WAIT): _Row(_._draft_too_late),
    (T, Timer.FILLER): _Row(_._say_filler),
    (T, WindDown): _Row(_._wind_down_thinking, (C,)),

    (H, SpeechStarted): _Row(_._speech_while_thinking),
    (H, SpeechEnded): _Row(_._caller_yields, (T,)),
    **_rows(_._words_while_thinking, (H, Partial), (H, Final), to=(L,)),
    (H, ReplyAudioReady): _Row(_._ignore),
    (H, ReplyQueued): _Row(_._ignore),
    (H, PlaybackDone): _Row(_._ignore),
    (H, Timer.BARGE_IN): _Row(_._interrupt_thinking, (L,)),
    (H, WindDown): _Row(_._wind_down_thinking, (C,)),

    (S, SpeechStarted): _Row(_._speech_over_audio),
    (S, SpeechEnded): _Row(_._disarm_barge_in),
    **_rows(_._words_over_audio, (S, Partial), (S, Final), to=(L,)),
    (S, ReplyAudioReady): _Row(_._ignore),  # later sentences of the reply playing now
    (S, ReplyQueued): _Row(_._arm_mark_wait),
    (S, PlaybackDone): _Row(_._playback_done, (R,)),
    (S, Timer.BARGE_IN): _Row(_._interrupt_playback, (L,)),
    (S, Timer.MARK_WAIT): _Row(_._marks_lost, (R,)),
    (S, WindDown): _Row(_._wind_down_playing, (C,)),
    (S, KeyPressed): _Row(_._key_playing, (T, C)),
    (S, Timer.DTMF): _Row(_._keys_done_playing, (T,)),
    (S, AgentEnds): _Row(_._ending_while_speaking, (C,)),

    # The goodbye is not interrupted: the caller's voice, words and STT changes are ignored.
    **_rows(_._ignore, *((C, t) for t in (SpeechStarted, SpeechEnded, Partial, Final, SttReady, SttLost,
                                            ReplyAudioReady, WindDown, KeyPressed, AgentEnds))),
    (C, ReplyQueued): _Row(_._arm_mark_wait),
    (C, PlaybackDone): _Row(_._goodbye_done, (E,)),
    (C, Timer.MARK_WAIT): _Row(_._goodbye_marks_lost, (E,)),
}
for _state in (G, R, L, T, H, S):
    _TABLE.setdefault((_state, SttLost), _Row(_._stt_lost))
for _state in (G, R, L, F, T, H, S):
    _TABLE[_state, SttReady] = _Row(_._stt_ready)
for _state in (G, R, L, F, C):
    _TABLE[_state, Hangup] = _Row(_._hangup, (E,))
for _state in (T, H, S):
    _TABLE[_state, Hangup] = _Row(_._hangup_busy, (E,))
for _state in (R, L, F):
    _TABLE[_state, KeyPressed] = _Row(_._key_quiet, (T, C))
    _TABLE[_state, Timer.DTMF] = _Row(_._keys_done_quiet, (T,))
for _state in (T, H):
    _TABLE[_state, KeyPressed] = _Row(_._key_thinking, (T, C) if _state is H else (C,))
    _TABLE[_state, Timer.DTMF] = _Row(_._keys_done_thinking, (T,) if _state is H else ())
for _state in (G, R, L, F, T, H):
    _TABLE[_state, AgentEnds] = _Row(_._note_ending)
for _event in typing.get_args(Event):
    if _event not in (CallStarted, Tick):
        _TABLE[E, _event] = _Row(_._ignore)  # the call is over; stragglers are harmless
del _, _state, _event


def _name(key: type | Timer) -> str:
    return key.name if isinstance(key, Timer) else key.__name__


# ------------------------------------------------------------- diagram ---


def mermaid() -> str:
    """The table as a Mermaid ``stateDiagram-v2``: one arrow per (row, target state).

    Rows that keep the state are listed in a note per state rather than drawn,
    so the arrows show how a call moves and the notes show what each state absorbs.
    """
    lines = ["stateDiagram-v2", f"    [*] --> {State.GREETING.name}"]
    arrows: dict[tuple[State, State], list[str]] = {}
    staying: dict[State, list[str]] = {}
    for (state, key), row in _TABLE.items():
        for target in row.targets:
            arrows.setdefault((state, target), []).append(_label(key))
        if not row.targets and row.handler is not CallFSM._ignore:
            staying.setdefault(state, []).append(_label(key))
    for (state, target), labels in arrows.items():
        lines.append(f"    {state.name} --> {target.name}: {', '.join(labels)}")
    lines.append(f"    {State.ENDED.name} --> [*]")
    for state, labels in staying.items():
        lines.append(f"    note right of {state.name}: stays on {', '.join(labels)}")
    return "\n".join(lines) + "\n"


def _label(key: type | Timer) -> str:
    return f"timer {key.name}" if isinstance(key, Timer) else key.__name__


def main(argv: list[str]) -> int:
    """``python -m agentd.fsm --diagram``: print the machine as Mermaid."""
    if argv != ["--diagram"]:
        print("usage: python -m agentd.fsm --diagram", file=sys.stderr)
        return 2
    print(mermaid(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
