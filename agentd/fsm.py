"""The per-call state machine: every rule that decides what a call does next.

Theory of operation
-------------------
A call is a conversation of turns. The caller's voice is reported by two
independent sources: the VAD (fast, says *when* the caller speaks) and the
recogniser (slow, says *what* was said). Neither alone ends a turn: Google's
``is_final`` closes a transcript *segment* (one sentence with a pause gives
several), and VAD silence may be a breath. The FSM combines them:

    GREETING --PlaybackDone--> REFRACTORY --window closes--> LISTENING
    LISTENING --enough silence after enough speech--> FINALIZING
    FINALIZING --final arrives / final timeout--> THINKING   (nothing heard -> LISTENING)
    FINALIZING --caller resumes--> LISTENING (same turn)
    THINKING --first reply audio + breath delay--> SPEAKING
    SPEAKING --last mark back--> REFRACTORY
    GREETING/THINKING/SPEAKING --sustained caller speech--> LISTENING (barge-in)
    any --Hangup--> ENDED

The FSM is sans-I/O (STYLE.md rule 1): it imports no Trio, sockets or clocks.
Events carry ``at`` (seconds on the call's clock); timers are answered by
``next_deadline()`` and fired by ``Tick(at=now)``. A timer fires *as of its
deadline*, so decisions do not depend on how late the driver ticked.
``handle(event)`` returns the actions for the driver to carry out.

Every (state, event type) pair is in ``_TRANSITIONS``: a transition or an
explicit ignore. A missing pair raises ``FsmError`` -- that is a driver bug.

Transcripts: results whose audio ends before the last commit belong to a turn
already answered (Google's late final for a partial we committed on); they are
dropped by comparing ``audio_end_at`` with the commit time.

Latency: a "strong" transcript (long enough, or punctuated; never ending on a
dangling particle) ends the turn after the VAD hangover instead of the full
silence rule (early finalize). A transcript that holds still for
``spec_stable_s`` starts a *draft* reply (``StartReply(draft=True)``): the LLM
thinks while the caller may still be talking, nothing plays. At the end of the
turn a draft built on the same words is adopted (``AdoptDraft``), any other is
cancelled -- a draft is never heard unless the caller ended with its words.

Barge-in needs sustained speech (``barge_in_min_s``), counted only after the
echo guard at the start of agent audio, and optionally recognized words, so
line noise and the agent's own echo do not interrupt it.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from agentd import text as textrules


class State(enum.Enum):
    GREETING = "GREETING"
    LISTENING = "LISTENING"
    FINALIZING = "FINALIZING"
    THINKING = "THINKING"
    SPEAKING = "SPEAKING"
    REFRACTORY = "REFRACTORY"
    ENDED = "ENDED"


class FsmError(Exception):
    """The driver fed an event the FSM cannot take in this state (our bug)."""


# ---------------------------------------------------------------- events ---

_EV = dict(frozen=True, slots=True, kw_only=True)


@dataclass(**_EV)
class CallStarted:
    at: float


@dataclass(**_EV)
class SpeechStarted:
    """VAD: the caller's voice began at ``at``."""

    at: float


@dataclass(**_EV)
class SpeechEnded:
    """VAD: the last voiced audio ended at ``at`` (reported after the hangover)."""

    at: float


@dataclass(**_EV)
class Partial:
    """Interim transcript of the open segment; ``audio_end_at`` maps the
    recogniser's result_end_time onto the call clock."""

    at: float
    text: str
    audio_end_at: float


@dataclass(**_EV)
class Final:
    """A closed transcript segment (not the end of the caller's turn)."""

    at: float
    text: str
    audio_end_at: float


@dataclass(**_EV)
class SttReady:
    """The streaming recogniser is open (again)."""

    at: float


@dataclass(**_EV)
class SttLost:
    """Streaming recognition gave up; turns are transcribed by the fallback."""

    at: float


@dataclass(**_EV)
class ReplyAudioReady:
    """The first audio of reply ``reply`` is synthesized and waiting."""

    at: float
    reply: int


@dataclass(**_EV)
class PlaybackDone:
    """Twilio echoed the last mark of reply ``reply`` (0 = the greeting)."""

    at: float
    reply: int


@dataclass(**_EV)
class Tick:
    at: float


@dataclass(**_EV)
class Hangup:
    at: float


Event = (
    CallStarted | SpeechStarted | SpeechEnded | Partial | Final | SttReady | SttLost
    | ReplyAudioReady | PlaybackDone | Tick | Hangup
)

# --------------------------------------------------------------- actions ---


@dataclass(**_EV)
class PlayGreeting:
    """Queue the business's pre-synthesized greeting (reply 0)."""


@dataclass(**_EV)
class StartReply:
    """Ask the LLM for reply ``reply`` to ``text`` and synthesize it; do not play yet."""

    reply: int
    text: str
    speech_start_at: float
    speech_end_at: float
    draft: bool = False  # speculative: think (and maybe synthesize) but never play unless adopted


@dataclass(**_EV)
class AdoptDraft:
    """The turn ended on the words draft ``reply`` was built on: it becomes the reply."""

    reply: int
    text: str
    speech_start_at: float
    speech_end_at: float


@dataclass(**_EV)
class BeginPlayback:
    """Release reply ``reply``'s audio to the TX queue."""

    reply: int


@dataclass(**_EV)
class StopPlayback:
    """Barge-in: send Twilio ``clear`` and drop queued agent audio."""


@dataclass(**_EV)
class CancelReply:
    """Abandon reply ``reply``'s LLM/TTS work. ``resumes_turn``: the caller's
    answered words rejoin the turn being spoken (so drop them from history)."""

    reply: int
    resumes_turn: bool = False


@dataclass(**_EV)
class TranscribeFallback:
    """Streaming STT is down: transcribe this stretch of buffered audio."""

    speech_start_at: float
    speech_end_at: float


Action = PlayGreeting | StartReply | AdoptDraft | BeginPlayback | StopPlayback | CancelReply | TranscribeFallback


# -------------------------------------------------------------- settings ---


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnSettings:
    """The FSM's numbers, in seconds (built from config by the driver)."""

    min_utt_s: float = 0.6
    min_silence_short_s: float = 0.5
    min_silence_long_s: float = 1.8
    long_utterance_s: float = 2.0
    hangover_s: float = 0.22
    final_timeout_s: float = 0.32
    fallback_timeout_s: float = 5.0
    refractory_s: float = 1.1
    breath_min_s: float = 0.05
    breath_max_s: float = 0.12
    barge_in_enabled: bool = True
    barge_in_min_s: float = 0.3
    barge_in_guard_s: float = 0.0  # speech in the first moments of agent audio never interrupts
    # The VAD reports the end of speech only after its hangover: wait that long too, so
    # speech shorter than barge_in_min_s is known to have ended before it could interrupt.
    barge_in_confirm_s: float = 0.0
    barge_in_requires_words: bool = False  # noise and echo carry no words
    greeting_barge_in: bool = True
    early_finalize: bool = False
    strong_punct_min_chars: int = 12
    strong_bare_min_chars: int = 18
    spec_enabled: bool = False
    spec_min_chars: int = 14
    spec_stable_s: float = 0.25
    spec_wait_s: float = 0.4


# ----------------------------------------------------------- call memory ---


@dataclass(slots=True)
class _Utterance:
    """The caller speech being collected into the next turn."""

    start_at: float
    voiced: bool = True
    end_at: float | None = None  # last voiced instant, None while voiced


@dataclass(slots=True)
class _Draft:
    """A speculative reply built on a stable partial transcript."""

    reply: int
    text: str
    ready: bool = False  # its first audio exists


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


# ------------------------------------------------------------------- FSM ---


class CallFSM:
    """One call's decisions. Feed events with ``handle``; honour the actions."""

    def __init__(self, settings: TurnSettings | None = None, *, rng: random.Random | None = None):
        self.settings = settings or TurnSettings()
        self.state = State.GREETING
        self.path: tuple[State, ...] = ()  # states entered by the last handle(), in order
        self.streaming_stt = True
        self._rng = rng or random.Random()
        self._timers: dict[str, float] = {}
        self._utt: _Utterance | None = None
        self._transcript = _Transcript()
        self._reply = 0  # the reply being thought about or spoken (0 = greeting)
        self._replies_started = 0
        self._committed_at = float("-inf")
        self._committed_text = ""
        self._committed_start = 0.0
        self._speak_when_quiet = False  # the reply is ready but the caller is talking
        self._audio_since = 0.0  # when the agent's current playback began
        self._last_words_at = float("-inf")  # when the recognizer last heard words
        self._barge_wants_words = False  # sustained speech, waiting for words to interrupt
        self._committed_end = 0.0
        self._eot_silence = 0.0
        self._draft: _Draft | None = None
        self._spec_candidate = ""  # normalized transcript the "spec" timer is watching
        # Facts for telemetry, read by the driver after a commit / BeginPlayback.
        self.required_silence_s = 0.0  # silence the end-of-turn rule demanded
        self.breath_s = 0.0  # breath delay before the last playback
        self.spec_counts = {"drafts": 0, "hits": 0, "misses": 0, "late": 0}

    def __repr__(self) -> str:
        timers = ", ".join(f"{k}@{v:.3f}" for k, v in sorted(self._timers.items()))
        return f"<CallFSM {self.state.name} reply={self._reply} text={self.transcript!r} timers=[{timers}]>"

    # -- public queries ----------------------------------------------------

    @property
    def transcript(self) -> str:
        return self._transcript.text()

    @property
    def reply(self) -> int:
        return self._reply

    def next_deadline(self) -> float:
        """When the driver must send the next ``Tick`` (inf: no timer armed)."""
        return min(self._timers.values(), default=float("inf"))

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; return the actions the driver must carry out, in order."""
        try:
            rule = _TRANSITIONS[self.state, type(event)]
        except KeyError:
            raise FsmError(f"{type(event).__name__} is not expected in {self.state.name}") from None
        self.path = ()
        return rule(self, event) or []

    # -- plumbing ----------------------------------------------------------

    def _ignore(self, event: Event) -> None:
        return None

    def _enter(self, state: State, *, keep: tuple[str, ...] = ()) -> None:
        if state is not self.state:
            self.path += (state,)
        self.state = state
        kept = {name: self._timers[name] for name in keep if name in self._timers}
        self._timers.clear()
        self._timers.update(kept)

    def _on_tick(self, event: Tick) -> list[Action]:
        actions: list[Action] = []
        while self._timers:
            name, when = min(self._timers.items(), key=lambda kv: kv[1])
            if when > event.at:
                break
            del self._timers[name]
            actions += _TIMERS[name](self, when)
        return actions

    def _silence_needed(self, utt: _Utterance) -> float:
        s = self.settings
        spoken = (utt.end_at or utt.start_at) - utt.start_at
        return s.min_silence_long_s if spoken >= s.long_utterance_s else s.min_silence_short_s

    # -- GREETING ----------------------------------------------------------

    def _start(self, event: CallStarted) -> list[Action]:
        self._audio_since = event.at
        return [PlayGreeting()]

    def _greeting_speech(self, event: SpeechStarted) -> list[Action]:
        if self.settings.greeting_barge_in:
            return self._arm_barge_in(event)
        return self._hold_speech(event)

    # -- speech bookkeeping shared by several states -----------------------

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

    def _arm_barge_in(self, event: SpeechStarted) -> None:
        self._hold_speech(event)
        s = self.settings
        if s.barge_in_enabled:
            counted_from = event.at
            if self.state is not State.THINKING:  # echo guard: agent audio is playing
                counted_from = max(event.at, self._audio_since + s.barge_in_guard_s)
            self._timers["barge"] = counted_from + s.barge_in_min_s + s.barge_in_confirm_s

    def _disarm_barge_in(self, event: SpeechEnded) -> None:
        self._release_speech(event)
        self._timers.pop("barge", None)
        self._barge_wants_words = False

    def _result_while_talking(self, event: Partial | Final) -> list[Action]:
        """Words may be what a sustained interruption was waiting for."""
        self._record_result(event)
        if self._barge_wants_words and self._heard_words_since_speech():
            return self._barge_timer(event.at)
        return []

    def _heard_words_since_speech(self) -> bool:
        return self._utt is not None and self._last_words_at >= self._utt.start_at

    def _record_result(self, event: Partial | Final) -> bool:
        """Add a transcript result unless it belongs to a turn already answered."""
        if event.audio_end_at <= self._committed_at:
            return False
        if event.text.strip():
            self._last_words_at = event.at
        if isinstance(event, Final):
            if event.text.strip():
                self._transcript.finals.append(event.text.strip())
            self._transcript.partial = ""
        else:
            self._transcript.partial = event.text.strip()
        return True

    def _barge_timer(self, when: float) -> list[Action]:
        """Caller speech lasted barge_in_min: stop talking and listen."""
        if self.settings.barge_in_requires_words and not self._heard_words_since_speech():
            self._barge_wants_words = True  # noise or echo so far: wait for words
            return []
        self._barge_wants_words = False
        actions: list[Action] = []
        if self.state in (State.GREETING, State.SPEAKING):
            actions.append(StopPlayback())
        resumes = self.state is State.THINKING
        actions.append(CancelReply(reply=self._reply, resumes_turn=resumes))
        if resumes:
            self._resume_committed_turn()
        utt = self._utt
        self._enter(State.LISTENING)
        self._utt = utt
        return actions

    def _resume_committed_turn(self) -> None:
        """The caller kept talking before we spoke: the answered words rejoin the turn."""
        if self._committed_text:
            self._transcript.finals.insert(0, self._committed_text)
        if self._utt is not None:
            self._utt.start_at = self._committed_start

    # -- REFRACTORY --------------------------------------------------------

    def _playback_done(self, event: PlaybackDone) -> None:
        if event.reply != self._reply:
            return None  # a stale mark from a reply we already abandoned
        held = self._utt
        self._enter(State.REFRACTORY)
        self._timers["refractory"] = event.at + self.settings.refractory_s
        self._utt = held
        if held is None:
            self._transcript.clear()
        return None

    def _refractory_result(self, event: Partial | Final) -> list[Action]:
        if not self._record_result(event) or not event.text.strip():
            return []  # stale, or no words (Google's empty finals): keep the window
        if self._utt is None:
            self._utt = _Utterance(start_at=event.at, voiced=False, end_at=event.at)
        return self._open_listening(event.at)

    def _refractory_timer(self, when: float) -> list[Action]:
        return self._open_listening(when)

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
        self._timers.pop("eot", None)

    def _listening_silence(self, event: SpeechEnded) -> None:
        self._release_speech(event)
        self._arm_end_of_turn(event.at)

    def _listening_result(self, event: Partial | Final) -> None:
        if not self._record_result(event):
            return None
        if self._utt is None:  # words the VAD missed: a quiet caller
            self._utt = _Utterance(start_at=event.at, voiced=False, end_at=event.at)
        self._watch_for_draft(event.at)
        if not self._utt.voiced:
            self._arm_end_of_turn(event.at)  # strong words may pull it in, but never before they came
        return None

    def _arm_end_of_turn(self, now: float) -> None:
        utt = self._utt
        if utt is None or utt.voiced or utt.end_at is None:
            return
        deadline = utt.end_at + self._silence_needed(utt)
        if self.settings.early_finalize and self._is_strong(self._transcript.text()):
            deadline = min(deadline, utt.end_at + self.settings.hangover_s)
        self._eot_silence = deadline - utt.end_at
        self._timers["eot"] = max(deadline, now)

    def _is_strong(self, text: str) -> bool:
        s = self.settings
        return textrules.is_strong_partial(
            text, punct_min_chars=s.strong_punct_min_chars, bare_min_chars=s.strong_bare_min_chars
        )

    def _eot_timer(self, when: float) -> list[Action]:
        utt = self._utt
        assert utt is not None and utt.end_at is not None
        heard = bool(self._transcript.text())
        if not heard and utt.end_at - utt.start_at < self.settings.min_utt_s:
            self._drop_utterance()  # a blip with no words: noise, not a turn
            return self._discard_draft()
        self._enter(State.FINALIZING, keep=("spec",))
        self._utt = utt
        return self._await_transcript(when)

    def _drop_utterance(self) -> None:
        self._utt = None
        self._transcript.clear()

    # -- FINALIZING --------------------------------------------------------

    def _await_transcript(self, now: float) -> list[Action]:
        """Commit now if the transcript is settled; else wait for it, bounded."""
        utt = self._utt
        assert utt is not None
        if not self.streaming_stt:
            self._transcript.clear()  # the fallback transcribes the whole utterance again
            self._timers.pop("spec", None)  # the words it watched are gone: no draft of nothing
            self._spec_candidate = ""
            self._timers["final"] = now + self.settings.fallback_timeout_s
            return [TranscribeFallback(speech_start_at=utt.start_at, speech_end_at=utt.end_at or now)]
        if self._transcript.finals and not self._transcript.partial:
            return self._commit(now)
        self._timers["final"] = now + self.settings.final_timeout_s
        return []

    def _finalizing_result(self, event: Partial | Final) -> list[Action]:
        if not self._record_result(event):
            return []
        self._watch_for_draft(event.at)
        if isinstance(event, Final) and not self._transcript.partial:
            if not self._transcript.text():
                return self._give_up()
            return self._commit(event.at)
        return []

    def _finalizing_resumed(self, event: SpeechStarted) -> None:
        """The caller was only pausing: the same turn goes on."""
        utt = self._utt
        self._enter(State.LISTENING, keep=("spec",))
        self._utt = utt
        self._continue_speech(event)

    def _final_timer(self, when: float) -> list[Action]:
        if not self._transcript.text():
            return self._give_up()
        return self._commit(when)

    def _give_up(self) -> list[Action]:
        self._enter(State.LISTENING)
        self._drop_utterance()
        return self._discard_draft()

    def _stt_lost(self, event: SttLost) -> list[Action]:
        was_streaming, self.streaming_stt = self.streaming_stt, False
        if was_streaming and self.state is State.FINALIZING and "final" in self._timers:
            return self._await_transcript(event.at)
        return []

    def _stt_ready(self, event: SttReady) -> None:
        self.streaming_stt = True

    def _commit(self, now: float) -> list[Action]:
        utt = self._utt
        assert utt is not None
        self._committed_at = now
        self._committed_text = self._transcript.text()
        self._committed_start = utt.start_at
        self._committed_end = utt.end_at if utt.end_at is not None else now
        self.required_silence_s = self._eot_silence
        draft, self._draft = self._draft, None
        self._spec_candidate = ""  # the next turn's words are new, even if they repeat these
        self._enter(State.THINKING)
        self._speak_when_quiet = False
        self._drop_utterance()
        if draft is None:
            return self._fresh_reply()
        if textrules.normalize_for_match(draft.text) != textrules.normalize_for_match(self._committed_text):
            self.spec_counts["misses"] += 1  # never speak words the caller did not end with
            return [CancelReply(reply=draft.reply), *self._fresh_reply()]
        self.spec_counts["hits"] += 1
        self._reply = draft.reply
        if draft.ready:
            self._arm_breath(now)
        else:
            self._timers["spec_wait"] = now + self.settings.spec_wait_s
        return [AdoptDraft(reply=draft.reply, text=self._committed_text,
                           speech_start_at=self._committed_start, speech_end_at=self._committed_end)]

    def _fresh_reply(self) -> list[Action]:
        self._replies_started += 1
        self._reply = self._replies_started
        return [StartReply(reply=self._reply, text=self._committed_text,
                           speech_start_at=self._committed_start, speech_end_at=self._committed_end)]

    # -- speculation -------------------------------------------------------

    def _watch_for_draft(self, now: float) -> None:
        """(Re)start the stability clock when the transcript changes."""
        s = self.settings
        if not s.spec_enabled:
            return
        text = textrules.normalize_for_match(self._transcript.text())
        if len(text) < s.spec_min_chars:
            self._timers.pop("spec", None)
            self._spec_candidate = ""
        elif text != self._spec_candidate:
            self._spec_candidate = text
            self._timers["spec"] = now + s.spec_stable_s

    def _spec_timer(self, when: float) -> list[Action]:
        """The transcript held still: draft a reply to it (replacing an older draft)."""
        text = self._transcript.text()
        if self._draft is not None and textrules.normalize_for_match(self._draft.text) == self._spec_candidate:
            return []
        candidate = self._spec_candidate
        actions = self._discard_draft()
        self._spec_candidate = candidate  # still watched: the same words must not re-arm the clock
        self._replies_started += 1
        self._draft = _Draft(reply=self._replies_started, text=text)
        self.spec_counts["drafts"] += 1
        utt = self._utt
        start = utt.start_at if utt is not None else when
        end = utt.end_at if utt is not None and utt.end_at is not None else when
        return [*actions, StartReply(reply=self._draft.reply, text=text, speech_start_at=start,
                                     speech_end_at=end, draft=True)]

    def _discard_draft(self) -> list[Action]:
        draft, self._draft = self._draft, None
        self._spec_candidate = ""
        return [CancelReply(reply=draft.reply)] if draft is not None else []

    def _draft_audio_ready(self, event: ReplyAudioReady) -> None:
        if self._draft is not None and event.reply == self._draft.reply:
            self._draft.ready = True

    def _spec_wait_timer(self, when: float) -> list[Action]:
        """The adopted draft is late: drop it and ask afresh with the final words."""
        self.spec_counts["late"] += 1
        # resumes_turn: the adopted words move on to the fresh reply, so they must leave history.
        return [CancelReply(reply=self._reply, resumes_turn=True), *self._fresh_reply()]

    # -- THINKING ----------------------------------------------------------

    def _reply_audio_ready(self, event: ReplyAudioReady) -> None:
        if event.reply != self._reply or "breath" in self._timers or self._speak_when_quiet:
            return None
        self._timers.pop("spec_wait", None)
        self._arm_breath(event.at)
        return None

    def _arm_breath(self, now: float) -> None:
        s = self.settings
        self.breath_s = self._rng.uniform(s.breath_min_s, s.breath_max_s)
        self._timers["breath"] = now + self.breath_s

    def _breath_timer(self, when: float) -> list[Action]:
        if "barge" in self._timers:
            self._speak_when_quiet = True  # never start talking over the caller
            return []
        self._enter(State.SPEAKING)
        self._audio_since = when
        return [BeginPlayback(reply=self._reply)]

    def _thinking_silence(self, event: SpeechEnded) -> None:
        """A short interjection ended without taking the turn: speak now if we were ready."""
        self._disarm_barge_in(event)
        if self._speak_when_quiet:
            self._speak_when_quiet = False
            self._timers["breath"] = event.at

    # -- ENDED -------------------------------------------------------------

    def _hangup(self, event: Hangup) -> list[Action]:
        busy = self.state in (State.THINKING, State.SPEAKING)
        actions = self._discard_draft()
        self._enter(State.ENDED)
        return [*actions, CancelReply(reply=self._reply)] if busy else actions


_TIMERS = {
    "barge": CallFSM._barge_timer,
    "refractory": CallFSM._refractory_timer,
    "eot": CallFSM._eot_timer,
    "final": CallFSM._final_timer,
    "breath": CallFSM._breath_timer,
    "spec": CallFSM._spec_timer,
    "spec_wait": CallFSM._spec_wait_timer,
}

G, L, F, T, S, R, E = (
    State.GREETING, State.LISTENING, State.FINALIZING, State.THINKING,
    State.SPEAKING, State.REFRACTORY, State.ENDED,
)
_ = CallFSM

# The specification. Read a row as: in STATE, on EVENT, do HANDLER.
_TRANSITIONS = {
    (G, CallStarted): _._start,
    (G, SpeechStarted): _._greeting_speech,
    (G, SpeechEnded): _._disarm_barge_in,
    (G, Partial): _._result_while_talking,
    (G, Final): _._result_while_talking,
    (G, PlaybackDone): _._playback_done,
    (G, ReplyAudioReady): _._ignore,

    (R, SpeechStarted): _._hold_speech,
    (R, SpeechEnded): _._release_speech,
    (R, Partial): _._refractory_result,
    (R, Final): _._refractory_result,
    (R, PlaybackDone): _._ignore,          # stale echo of a finished reply
    (R, ReplyAudioReady): _._ignore,

    (L, SpeechStarted): _._listening_speech,
    (L, SpeechEnded): _._listening_silence,
    (L, Partial): _._listening_result,
    (L, Final): _._listening_result,
    (L, PlaybackDone): _._ignore,          # marks echoed by our own `clear`
    (L, ReplyAudioReady): _._draft_audio_ready,  # a draft's, or an abandoned reply's

    (F, SpeechStarted): _._finalizing_resumed,
    (F, SpeechEnded): _._release_speech,
    (F, Partial): _._finalizing_result,
    (F, Final): _._finalizing_result,
    (F, PlaybackDone): _._ignore,
    (F, ReplyAudioReady): _._draft_audio_ready,

    (T, SpeechStarted): _._arm_barge_in,
    (T, SpeechEnded): _._thinking_silence,
    (T, Partial): _._result_while_talking,
    (T, Final): _._result_while_talking,
    (T, ReplyAudioReady): _._reply_audio_ready,
    (T, PlaybackDone): _._ignore,

    (S, SpeechStarted): _._arm_barge_in,
    (S, SpeechEnded): _._disarm_barge_in,
    (S, Partial): _._result_while_talking,
    (S, Final): _._result_while_talking,
    (S, PlaybackDone): _._playback_done,
    (S, ReplyAudioReady): _._ignore,       # later sentences of the reply playing now
}
for _state in (G, L, F, T, S, R):
    _TRANSITIONS[_state, Tick] = _._on_tick
    _TRANSITIONS[_state, Hangup] = _._hangup
    _TRANSITIONS[_state, SttReady] = _._stt_ready
    _TRANSITIONS[_state, SttLost] = _._stt_lost
for _event in (SpeechStarted, SpeechEnded, Partial, Final, SttReady, SttLost,
               ReplyAudioReady, PlaybackDone, Tick, Hangup):
    _TRANSITIONS[E, _event] = _._ignore   # the call is over; stragglers are harmless
del _, _state, _event
