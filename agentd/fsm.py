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

Facts the rules keep between events (not states): the open utterance, the
transcript, the last committed turn (to drop late results and to resume it),
whether streaming STT is up, whether a sustained interruption only waits for
words, and the speculation bookkeeping (``agentd.speculation``).

The FSM is sans-I/O: it imports no Trio, sockets or clocks. ``handle(event)``
returns the actions for the driver to carry out; actions carry the facts the
driver records. Every timeout of the call is here, including the filler and
the wait for Twilio's last mark.

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

import math
import random
import sys
import typing
from dataclasses import dataclass, field, replace

from agentd import text as textrules
from agentd.dtmf import DigitCollector, digits_message
from agentd.fsm_events import (
    GOODBYE, Action, AdoptDraft, AgentEnds, BeginPlayback, CallStarted, CancelReply, EndCall, Event, Final,
    FsmError, Hangup, KeyPressed, Partial, PlaybackDone, PlayGoodbye, PlayGreeting, PlayLine, ReplyAudioReady,
    ReplyFinished, ReplyQueued, ReviseTurn, SayFiller, SpeechEnded, SpeechStarted, StartReply, State, StopPlayback,
    SttLost, SttReady, Tick, Timer, TranscribeFallback, TurnSettings, WindDown,
)
from agentd.speculation import Speculation

__all__ = [
    "GOODBYE", "HUNG_UP", "SILENT", "TRANSFERRED", "Action", "AdoptDraft", "AgentEnds", "BeginPlayback",
    "CallFSM", "CallStarted", "CancelReply", "EndCall", "Ending", "Event", "Final", "FsmError", "Hangup",
    "KeyPressed", "Partial", "PlayGoodbye", "PlayGreeting", "PlayLine", "PlaybackDone",
    "ReplyAudioReady", "ReplyFinished", "ReplyQueued", "ReviseTurn", "SayFiller", "SpeechEnded", "SpeechStarted",
    "StartReply", "State", "StopPlayback", "SttLost", "SttReady", "Tick", "Timer", "TranscribeFallback",
    "TurnSettings", "WindDown", "mermaid",
]


# ----------------------------------------------------------- call memory ---


@dataclass(slots=True)
class _Utterance:
    """The caller speech being collected into the next turn."""

    start_at: float
    voiced: bool = True
    end_at: float | None = None  # last voiced instant, None while voiced


@dataclass(slots=True)
class _Transcript:
    """Closed segments plus the latest interim of the open one."""

    finals: list[str] = field(default_factory=list)
    partial: str = ""

    def text(self) -> str:
        return " ".join(t for t in [*self.finals, self.partial] if t).strip()

    def clear(self) -> None:
        self.finals.clear()
        self.partial = ""


@dataclass(frozen=True, slots=True)
class _Turn:
    """The caller's last committed turn."""

    at: float = float("-inf")  # when it was committed
    text: str = ""
    start_at: float = 0.0
    end_at: float = 0.0
    silence_s: float = 0.0  # the silence the end-of-turn rule demanded
    fallbacks: tuple[str, ...] = ()
    finals: tuple[str, ...] = ()  # the closed segments among ``text``
    partial: str = ""  # its last words, still an interim of a segment the recogniser keeps open


@dataclass(frozen=True, slots=True)
class Ending:
    """How the agent ends the call: the record's reason, the cached line said last
    ("" = none), and the number the caller is transferred to ("" = none)."""

    reason: str
    line: str = "goodbye"
    transfer_to: str = ""


HUNG_UP = "agent hung up"
TRANSFERRED = "agent transferred"
SILENT = "caller silent"


def model_ending(event: AgentEnds) -> Ending:
    """``end_call`` finishes what is said (the goodbye line if nothing was); a transfer says the handoff."""
    if event.transfer_to:
        return Ending(TRANSFERRED, "handoff", event.transfer_to)
    return Ending(HUNG_UP, "" if event.spoke else "goodbye")


# ------------------------------------------------------------------- FSM ---


class CallFSM:
    """One call's decisions. Feed events with ``handle``; honour the actions."""

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
        self._utt: _Utterance | None = None
        self._transcript = _Transcript()
        self._reply = 0  # the reply being thought about or spoken (0 = greeting)
        self._replies_started = 0
        self._turn = _Turn()
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

    def _silence_needed(self, utt: _Utterance) -> float:
        s = self.settings
        spoken = (utt.end_at or utt.start_at) - utt.start_at
        return s.min_silence_long_s if spoken >= s.long_utterance_s else s.min_silence_short_s

    # -- GREETING ----------------------------------------------------------

    def _start(self, event: CallStarted) -> list[Action]:
        self._audio_since = event.at
        return [PlayGreeting()]

    def _greeting_speech(self, event: SpeechStarted) -> None:
        if self.settings.greeting_barge_in:
            self._speech_over_audio(event)
        else:
            self._hold_speech(event)

    # -- caller speech, in every state -------------------------------------

    def _hold_speech(self, event: SpeechStarted) -> None:
        """Remember caller speech without acting on it yet.

        Held speech followed by a whole end-of-turn silence is over (LISTENING
        would have ended it): new speech opens a new utterance, so a cough
        during the reply does not stretch the next one. Its words are kept.
        """
        utt = self._utt
        if utt is not None and not utt.voiced and event.at - utt.end_at >= self._silence_needed(utt):
            self._utt = None
        self._continue_speech(event)

    def _continue_speech(self, event: SpeechStarted) -> None:
        """Caller speech (re)starts: open an utterance, or extend the open one."""
        if self._utt is None:
            self._utt = _Utterance(start_at=event.at)
        else:
            self._utt.voiced, self._utt.end_at = True, None

    def _release_speech(self, event: SpeechEnded) -> None:
        if self._utt is not None:
            self._utt.voiced, self._utt.end_at = False, event.at

    def _speech_over_audio(self, event: SpeechStarted) -> None:
        """Agent audio is playing: count towards a barge-in only after the echo guard."""
        guard_ends = self._audio_since + self.settings.barge_in_guard_s
        self._arm_barge_in(event, counted_from=max(event.at, guard_ends))

    def _speech_while_thinking(self, event: SpeechStarted) -> None:
        """Nothing plays, so there is no echo: count from the first voiced instant."""
        self._arm_barge_in(event, counted_from=event.at)

    def _arm_barge_in(self, event: SpeechStarted, *, counted_from: float) -> None:
        self._hold_speech(event)
        s = self.settings
        if s.barge_in_enabled:
            self._timers[Timer.BARGE_IN] = counted_from + s.barge_in_min_s + s.barge_in_confirm_s

    def _disarm_barge_in(self, event: SpeechEnded) -> None:
        self._release_speech(event)
        self._timers.pop(Timer.BARGE_IN, None)
        self._awaiting_words = False

    def _record_result(self, event: Partial | Final) -> None:
        """Add a transcript result of the open turn (callers check ``_is_late`` first)."""
        if event.text.strip():
            self._last_words_at = event.at
            self._caller_answered()
        if isinstance(event, Final):
            if event.text.strip():
                self._transcript.finals.append(event.text.strip())
            self._transcript.partial = ""
        else:
            self._transcript.partial = event.text.strip()

    def _is_late(self, event: Partial | Final) -> bool:
        """The result's audio ended before the last commit: it belongs to a turn already answered."""
        return event.audio_end_at <= self._turn.at

    def _late_result(self, event: Partial | Final) -> list[Action]:
        """A result of the answered turn. Its final replaces the interim words that were
        answered (history must say what the caller said); it never asks for a second answer."""
        turn = self._turn
        if not isinstance(event, Final) or not turn.partial:
            return []
        words = event.text.strip()
        finals = (*turn.finals, words) if words else turn.finals
        self._turn = replace(turn, text=" ".join(finals), finals=finals, partial="")
        if self._turn.text == turn.text:
            return []
        return [ReviseTurn(reply=self._reply, was=turn.text, text=self._turn.text)]

    def _heard_words_since_speech(self) -> bool:
        return self._utt is not None and self._last_words_at >= self._utt.start_at

    def _interrupt_confirmed(self) -> bool:
        """Sustained speech interrupts, unless words are required and none came yet (noise, echo)."""
        if self.settings.barge_in_requires_words and not self._heard_words_since_speech():
            self._awaiting_words = True
            return False
        self._awaiting_words = False
        return True

    def _listen_again(self) -> None:
        """Barge-in: back to collecting the caller's turn, keeping their open utterance."""
        self._endings.pop(self._reply, None)  # the caller spoke on: what the model decided is moot
        utt = self._utt
        self._enter(State.LISTENING)
        self._utt = utt

    # -- barge-in over agent audio (GREETING, SPEAKING) ---------------------

    def _interrupt_playback(self, when: float) -> list[Action]:
        """Caller speech lasted barge_in_min over our audio: stop talking and listen."""
        if not self._interrupt_confirmed():
            return []
        reply = self._reply
        self._listen_again()
        return [StopPlayback(), CancelReply(reply=reply)]

    def _words_over_audio(self, event: Partial | Final) -> list[Action]:
        """Words may be what a sustained interruption was waiting for."""
        if self._is_late(event):
            return self._late_result(event)
        self._record_result(event)
        if self._awaiting_words and self._heard_words_since_speech():
            return self._interrupt_playback(event.at)
        return []

    # -- barge-in before we speak (THINKING, HOLDING) -----------------------

    def _interrupt_thinking(self, when: float) -> list[Action]:
        """Sustained speech before we spoke: the caller is taking the turn back."""
        if not self._interrupt_confirmed():
            return []
        return self._resume_turn(when)

    def _words_while_thinking(self, event: Partial | Final) -> list[Action]:
        """New words before the reply plays: the caller only paused, so the turn goes on
        at once (a reply built on half a turn must never play)."""
        if self._is_late(event):
            return self._late_result(event)
        self._record_result(event)
        return self._resume_turn(event.at) if event.text.strip() else []

    def _resume_turn(self, now: float) -> list[Action]:
        """Back to LISTENING with the answered words in front of the new ones.

        Answered words that were still an interim of an open segment are not
        put back when the new words repeat them: that is the recogniser's next
        result for the same segment. Speculation restarts on the whole transcript.
        """
        turn, reply = self._turn, self._reply
        fresh = self._transcript.text()
        kept = turn.finals
        if not fresh:
            self._transcript.partial = turn.partial  # the next result of its segment replaces it
        elif turn.partial and not _repeats(fresh, turn.partial):
            kept = (*kept, turn.partial)
        self._transcript.finals[:0] = kept
        if self._utt is None:  # words the VAD missed
            self._utt = _Utterance(start_at=turn.start_at, voiced=False, end_at=now)
        self._utt.start_at = turn.start_at
        self._turn = _Turn(at=turn.start_at)  # its late final now belongs to the open turn
        self._listen_again()
        self._watch_for_draft(now)
        self._arm_end_of_turn(now)
        return [CancelReply(reply=reply, resumes_turn=True)]

    # -- end of a playback (GREETING, SPEAKING, CLOSING) --------------------

    def _arm_mark_wait(self, event: ReplyQueued) -> None:
        """Twilio echoes a mark when playback reaches it; one that never comes back
        must not leave the call speaking forever."""
        if event.reply == self._reply:
            self._timers[Timer.MARK_WAIT] = event.at + event.playout_s + self.settings.mark_timeout_s

    def _playback_done(self, event: PlaybackDone) -> list[Action]:
        if event.reply != self._reply:
            return []  # a stale mark from a reply we already abandoned
        return self._after_playback(event.at, ReplyFinished(reply=event.reply))

    def _marks_lost(self, when: float) -> list[Action]:
        return self._after_playback(when, ReplyFinished(reply=self._reply, marks_lost=True))

    def _after_playback(self, now: float, finished: ReplyFinished) -> list[Action]:
        held = self._utt
        if self._idle_reprompt:
            self._idle_due = now + self.settings.idle_reprompt_s
        self._enter(State.REFRACTORY)
        self._timers[Timer.REFRACTORY] = now + self.settings.refractory_s
        self._utt = held
        if held is None:
            self._transcript.clear()
        return [finished]

    # -- REFRACTORY --------------------------------------------------------

    def _refractory_result(self, event: Partial | Final) -> list[Action]:
        if self._is_late(event):
            return self._late_result(event)
        self._record_result(event)
        if not event.text.strip():
            return []  # no words (Google's empty finals): keep the window
        if self._utt is None:
            self._utt = _Utterance(start_at=event.at, voiced=False, end_at=event.at)
        return self._open_listening(event.at)

    def _open_listening(self, now: float) -> list[Action]:
        utt = self._utt
        self._enter(State.LISTENING)
        self._utt = utt
        if utt is not None and not utt.voiced:
            self._arm_end_of_turn(now)
        return []

    # -- LISTENING ---------------------------------------------------------

    def _listening_speech(self, event: SpeechStarted) -> None:
        self._continue_speech(event)
        self._timers.pop(Timer.END_OF_TURN, None)

    def _listening_silence(self, event: SpeechEnded) -> None:
        self._release_speech(event)
        self._arm_end_of_turn(event.at)

    def _listening_result(self, event: Partial | Final) -> list[Action]:
        if self._is_late(event):
            return self._late_result(event)
        self._record_result(event)
        if self._utt is None:  # words the VAD missed: a quiet caller
            self._utt = _Utterance(start_at=event.at, voiced=False, end_at=event.at)
        self._watch_for_draft(event.at)
        if not self._utt.voiced:
            self._arm_end_of_turn(event.at)  # strong words may pull it in, but never before they came
        return []

    def _arm_end_of_turn(self, now: float) -> None:
        utt = self._utt
        if utt is None or utt.voiced or utt.end_at is None:
            return
        silence = self._silence_needed(utt)
        early = self._strong_silence(self._transcript.text())
        self._eot_strong = math.isfinite(early)  # the words look complete: no need to wait for their final
        self._eot_silence = min(silence, early)
        self._timers[Timer.END_OF_TURN] = max(utt.end_at + self._eot_silence, now)

    def _strong_silence(self, text: str) -> float:
        """The silence that ends a turn on these words by their look alone (inf: none does).

        A punctuated sentence needs only the VAD hangover; a long unpunctuated one
        waits ``strong_bare_silence_s``, because a caller who hesitates mid-sentence
        leaves exactly such a partial behind; one that stops mid-phrase never counts.
        """
        s = self.settings
        if not s.early_finalize:
            return float("inf")
        strength = textrules.partial_strength(
            text, punct_min_chars=s.strong_punct_min_chars, bare_min_chars=s.strong_bare_min_chars)
        if strength is textrules.Strength.PUNCTUATED:
            return s.hangover_s
        if strength is textrules.Strength.BARE:
            return max(s.hangover_s, s.strong_bare_silence_s)
        return float("inf")

    def _end_of_turn(self, when: float) -> list[Action]:
        utt = self._utt
        assert utt is not None and utt.end_at is not None
        if not self._transcript.text() and utt.end_at - utt.start_at < self.settings.min_utt_s:
            self._drop_utterance()  # a blip with no words: noise, not a turn
            return self._discard_draft()
        self._enter(State.FINALIZING, keep=(Timer.SPEC_STABLE,))
        self._utt = utt
        return self._await_transcript(when)

    def _drop_utterance(self) -> None:
        self._utt = None
        self._via_fallback = False
        self._transcript.clear()

    # -- FINALIZING --------------------------------------------------------

    def _await_transcript(self, now: float) -> list[Action]:
        """Commit now if the transcript is settled; else wait for it, bounded."""
        utt = self._utt
        assert utt is not None
        if not self.streaming_stt:
            self._transcript.clear()  # the fallback transcribes the whole utterance again
            self._timers.pop(Timer.SPEC_STABLE, None)  # the words it watched are gone: no draft of nothing
            self.spec.candidate = ""
            self._via_fallback = True
            self._timers[Timer.FINAL_WAIT] = now + self.settings.fallback_timeout_s
            return [TranscribeFallback(speech_start_at=utt.start_at, speech_end_at=utt.end_at or now)]
        if self._transcript.finals and not self._transcript.partial:
            return self._commit(now)
        if self._eot_strong and self._transcript.text():
            return self._commit(now)  # the words ended the turn: their final only revises history
        self._timers[Timer.FINAL_WAIT] = now + self.settings.final_timeout_s
        return []

    def _finalizing_result(self, event: Partial | Final) -> list[Action]:
        if self._is_late(event):
            return self._late_result(event)
        self._record_result(event)
        self._watch_for_draft(event.at)
        if isinstance(event, Final) and not self._transcript.partial:
            if not self._transcript.text():
                return self._give_up()
            return self._commit(event.at)
        return []

    def _finalizing_resumed(self, event: SpeechStarted) -> None:
        """The caller was only pausing: the same turn goes on."""
        utt = self._utt
        self._enter(State.LISTENING, keep=(Timer.SPEC_STABLE,))
        self._utt = utt
        self._continue_speech(event)

    def _final_wait_over(self, when: float) -> list[Action]:
        if not self._transcript.text():
            return self._give_up()
        return self._commit(when)

    def _give_up(self) -> list[Action]:
        self._enter(State.LISTENING)
        self._drop_utterance()
        return self._discard_draft()

    def _finalizing_stt_lost(self, event: SttLost) -> list[Action]:
        """Streaming died while we waited for its final: transcribe the turn the other way."""
        was_streaming, self.streaming_stt = self.streaming_stt, False
        return self._await_transcript(event.at) if was_streaming else []

    def _stt_lost(self, event: SttLost) -> None:
        self.streaming_stt = False

    def _stt_ready(self, event: SttReady) -> None:
        self.streaming_stt = True

    def _commit(self, now: float) -> list[Action]:
        """The caller's turn is over: answer it (adopting a draft built on the same words)."""
        utt = self._utt
        assert utt is not None
        self._turn = _Turn(at=now, text=self._transcript.text(), start_at=utt.start_at,
                           end_at=utt.end_at if utt.end_at is not None else now, silence_s=self._eot_silence,
                           fallbacks=("stt_recognize",) if self._via_fallback else (),
                           finals=tuple(self._transcript.finals), partial=self._transcript.partial)
        self._caller_answered()
        outcome, draft = self.spec.settle(self._turn.text)
        self._enter(State.THINKING)
        self._drop_utterance()
        if outcome == "none":
            return self._fresh_reply(now, "none")
        if outcome == "miss":
            return [CancelReply(reply=draft.reply), *self._fresh_reply(now, "miss")]
        self._reply = draft.reply
        if draft.ready:
            self._arm_breath(now)
        else:
            self._timers[Timer.SPEC_WAIT] = now + self.settings.spec_wait_s
            self._arm_filler()
        turn = self._turn
        return [AdoptDraft(reply=draft.reply, text=turn.text, speech_start_at=turn.start_at,
                           speech_end_at=turn.end_at, required_silence_s=turn.silence_s,
                           fallbacks=turn.fallbacks)]

    def _fresh_reply(self, now: float, speculation: str) -> list[Action]:
        self._replies_started += 1
        self._reply = self._replies_started
        self._arm_filler()
        turn = self._turn
        return [StartReply(reply=self._reply, text=turn.text, speech_start_at=turn.start_at,
                           speech_end_at=turn.end_at, required_silence_s=turn.silence_s,
                           speculation=speculation, fallbacks=turn.fallbacks)]

    def _arm_filler(self) -> None:
        if self.settings.filler_after_s > 0 and Timer.FILLER not in self._timers:
            self._timers[Timer.FILLER] = self._turn.end_at + self.settings.filler_after_s

    # -- speculation -------------------------------------------------------

    def _watch_for_draft(self, now: float) -> None:
        """(Re)start the stability clock when the transcript changes."""
        if not self.settings.spec_enabled:
            return
        watch = self.spec.watch(self._transcript.text())
        if watch is False:
            self._timers.pop(Timer.SPEC_STABLE, None)
        elif watch:
            self._timers[Timer.SPEC_STABLE] = now + self.settings.spec_stable_s

    def _draft_now(self, when: float) -> list[Action]:
        """The transcript held still: draft a reply to it (replacing an older draft)."""
        if self.spec.already_drafted():
            return []
        text = self._transcript.text()
        self._replies_started += 1
        old = self.spec.start(self._replies_started, text)
        utt = self._utt
        start = utt.start_at if utt is not None else when
        end = utt.end_at if utt is not None and utt.end_at is not None else when
        cancel = [CancelReply(reply=old.reply)] if old is not None else []
        return [*cancel, StartReply(reply=self._replies_started, text=text, speech_start_at=start,
                                    speech_end_at=end, draft=True, voice_draft=self.settings.spec_voice_draft)]

    def _discard_draft(self) -> list[Action]:
        draft = self.spec.discard()
        return [CancelReply(reply=draft.reply)] if draft is not None else []

    def _draft_audio_ready(self, event: ReplyAudioReady) -> None:
        self.spec.mark_ready(event.reply)

    def _draft_too_late(self, when: float) -> list[Action]:
        """The adopted draft is late: drop it and ask afresh with the final words."""
        self.spec.late()
        # resumes_turn: the adopted words move on to the fresh reply, so they must leave history.
        return [CancelReply(reply=self._reply, resumes_turn=True), *self._fresh_reply(when, "late")]

    # -- THINKING, HOLDING -------------------------------------------------

    def _reply_audio_ready(self, event: ReplyAudioReady) -> None:
        if event.reply != self._reply or Timer.BREATH in self._timers:
            return None
        self._timers.pop(Timer.SPEC_WAIT, None)
        self._timers.pop(Timer.FILLER, None)
        self._arm_breath(event.at)
        return None

    def _arm_breath(self, now: float) -> None:
        """Speak once the gap since the caller's last voiced frame is a breath long.

        The breath keeps the agent from answering inhumanly fast; as a floor on
        the gap (not a pause added after the audio is ready) it costs nothing
        when the reply took longer than a breath anyway, which is almost always.
        The hesitation guard is a second floor: a caller who pauses mid-sentence
        for up to that long is back before the agent speaks, and the resumed turn
        cancels the reply (no answer to half a question ever plays).
        """
        s = self.settings
        gap = max(s.hesitation_guard_s, self._rng.uniform(s.breath_min_s, s.breath_max_s))
        due = max(now, self._turn.end_at + gap)
        self.breath_s = due - now
        self._timers[Timer.BREATH] = due

    def _say_filler(self, when: float) -> list[Action]:
        return [SayFiller(reply=self._reply)]

    def _breath_taken(self, when: float) -> list[Action]:
        if Timer.BARGE_IN in self._timers:
            self._enter(State.HOLDING, keep=(Timer.BARGE_IN,))  # never start talking over the caller
            return []
        if self._reply in self._endings:  # the model's last words: nothing interrupts them
            self._ending = self._endings[self._reply]
            self._enter(State.CLOSING)
        else:
            self._enter(State.SPEAKING)
        self._audio_since = when
        return [BeginPlayback(reply=self._reply, breath_s=self.breath_s)]

    def _caller_yields(self, event: SpeechEnded) -> None:
        """A short interjection ended without taking the turn: speak now."""
        self._disarm_barge_in(event)
        self._enter(State.THINKING)
        self._timers[Timer.BREATH] = event.at

    # -- the end -----------------------------------------------------------

    def _wind_down(self, event: WindDown) -> list[Action]:
        """Nothing is playing: say goodbye (dropping any draft)."""
        return [*self._stop_quiet(), *self._close(Ending(event.reason))]

    def _wind_down_thinking(self, event: WindDown) -> list[Action]:
        return [*self._stop_thinking(), *self._close(Ending(event.reason))]

    def _wind_down_playing(self, event: WindDown) -> list[Action]:
        return [*self._stop_playing(), *self._close(Ending(event.reason))]

    def _stop_quiet(self) -> list[Action]:
        return self._discard_draft()

    def _stop_thinking(self) -> list[Action]:
        return [*self._discard_draft(), CancelReply(reply=self._reply)]

    def _stop_playing(self) -> list[Action]:
        return [StopPlayback(), CancelReply(reply=self._reply)]

    def _close(self, ending: Ending) -> list[Action]:
        """Stop listening and say the closing line (CLOSING); the call ends after it."""
        self._ending = ending
        self._utt = None
        self._idle_due = None
        self._keys.clear()
        self._enter(State.CLOSING)
        return self._closing_line()

    def _closing_line(self) -> list[Action]:
        if not self._ending.line:
            return self._end_call()
        self._reply = GOODBYE
        self._timers.clear()
        return [PlayGoodbye(line=self._ending.line)]

    def _end_call(self) -> list[Action]:
        self._enter(State.ENDED)
        return [EndCall(reason=self._ending.reason, transfer_to=self._ending.transfer_to)]

    def _goodbye_done(self, event: PlaybackDone) -> list[Action]:
        if event.reply != self._reply:
            return []  # a mark of a reply the wind-down cut off
        if event.reply != GOODBYE:  # the model's last words were said: now its closing line
            return [ReplyFinished(reply=event.reply), *self._closing_line()]
        return [ReplyFinished(reply=GOODBYE), *self._end_call()]

    def _goodbye_marks_lost(self, when: float) -> list[Action]:
        finished = ReplyFinished(reply=self._reply, marks_lost=True)
        if self._reply != GOODBYE:
            return [finished, *self._closing_line()]
        return [finished, *self._end_call()]

    # -- the model ends the call (AgentEnds) --------------------------------

    def _note_ending(self, event: AgentEnds) -> None:
        """Remember it for when the reply plays (a draft's counts once adopted)."""
        self._endings[event.reply] = model_ending(event)

    def _ending_while_speaking(self, event: AgentEnds) -> None:
        """The reply playing now is the model's last: finish it uninterrupted in CLOSING."""
        self._note_ending(event)
        if event.reply == self._reply:
            self._ending = self._endings[event.reply]
            self._utt = None
            self._enter(State.CLOSING, keep=(Timer.MARK_WAIT,))

    # -- the idle caller (IDLE) ----------------------------------------------

    def _caller_answered(self) -> None:
        """Words from the caller: they are there, so the idle count starts over."""
        self._idle_due = None
        self._reprompts = 0
        self._timers.pop(Timer.IDLE, None)

    def _idle_timeout(self, when: float) -> list[Action]:
        """No words since the agent stopped: reprompt, or after the last reprompt, say goodbye."""
        self._idle_due = None
        if self._reprompts >= self.settings.idle_max_reprompts:
            return [*self._stop_quiet(), *self._close(Ending(SILENT))]
        self._reprompts += 1
        self._replies_started += 1
        self._reply = self._replies_started
        actions = self._stop_quiet()
        self._drop_utterance()  # sound without words (noise, echo) is not the caller's turn
        self._enter(State.SPEAKING)
        self._audio_since = when
        return [*actions, PlayLine(reply=self._reply, line="reprompt")]

    # -- keypad (KeyPressed, DTMF) -------------------------------------------

    def _key_quiet(self, event: KeyPressed) -> list[Action]:
        return self._key(event, self._stop_quiet, resumes=False)

    def _key_thinking(self, event: KeyPressed) -> list[Action]:
        return self._key(event, self._stop_thinking, resumes=True)

    def _key_playing(self, event: KeyPressed) -> list[Action]:
        return self._key(event, self._stop_playing, resumes=False)

    def _key(self, event: KeyPressed, stop: typing.Callable[[], list[Action]], *, resumes: bool) -> list[Action]:
        """A single mapped digit acts at once; other keys collect into an entry (``#`` ends it)."""
        if not self._keys.pending and event.digit in self._keypad:
            return [*stop(), *self._close(self._keypad[event.digit])]
        digits = self._keys.press(event.digit, event.at)
        deadline = self._keys.deadline()
        if deadline is not None:
            self._timers[Timer.DTMF] = deadline
        if digits is None:
            return []
        return self._digits_turn(event.at, digits, stop, resumes=resumes)

    def _keys_done_quiet(self, when: float) -> list[Action]:
        return self._digits_turn(when, self._keys.expire(when) or "", self._stop_quiet, resumes=False)

    def _keys_done_thinking(self, when: float) -> list[Action]:
        return self._digits_turn(when, self._keys.expire(when) or "", self._stop_thinking, resumes=True)

    def _keys_done_playing(self, when: float) -> list[Action]:
        return self._digits_turn(when, self._keys.expire(when) or "", self._stop_playing, resumes=False)

    def _digits_turn(self, now: float, digits: str, stop: typing.Callable[[], list[Action]], *,
                     resumes: bool) -> list[Action]:
        """A complete keypad entry is the caller's turn, with any words they said around it.

        While a reply to their last turn is being prepared (``resumes``), that turn's
        words come back and the entry joins them, as when the caller keeps talking."""
        self._timers.pop(Timer.DTMF, None)
        if not digits:
            return []
        actions = stop()
        if resumes:
            actions = [a if not isinstance(a, CancelReply) else CancelReply(reply=a.reply, resumes_turn=True)
                       for a in actions]
        words = [self._turn.text] if resumes and self._turn.text else []
        text = " ".join(part for part in (*words, self._transcript.text(), digits_message(digits)) if part)
        self._drop_utterance()
        self._turn = _Turn(at=now, text=text, start_at=now, end_at=now)
        self._caller_answered()
        self.spec.settle("")
        self._enter(State.THINKING)
        return [*actions, *self._fresh_reply(now, "none")]

    def _hangup(self, event: Hangup) -> list[Action]:
        actions = self._discard_draft()
        self._enter(State.ENDED)
        return actions

    def _hangup_busy(self, event: Hangup) -> list[Action]:
        """The caller left while a reply was being prepared or spoken."""
        return [*self._hangup(event), CancelReply(reply=self._reply)]


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


def _repeats(fresh: str, answered: str) -> bool:
    """Do the new words start with the answered interim (the same segment, grown)?"""
    return textrules.normalize_for_match(fresh).startswith(textrules.normalize_for_match(answered))


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
