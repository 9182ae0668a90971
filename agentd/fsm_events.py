"""The call FSM's vocabulary: states, timers, events in, actions out, and its numbers.

Everything here is a frozen value with no behaviour; the rules that connect
them live in ``agentd.fsm`` (its table) and the handler modules it inherits
(``agentd.fsm_turn``, ``fsm_playback``, ``fsm_drafts``, ``fsm_phone``). Events
carry ``at``, seconds on the call's clock.
Actions carry the facts the driver records (``compare=False`` fields: the
breath taken, the silence the end-of-turn rule demanded, how speculation
went), so the driver never has to ask the FSM what happened.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agentd.config import Config

GOODBYE = -1  # the reply id of the business's goodbye line (0 is the greeting)


class State(enum.Enum):
    GREETING = "GREETING"  # the greeting plays
    REFRACTORY = "REFRACTORY"  # a reply just ended: the caller's first words may be a reaction to it
    LISTENING = "LISTENING"  # collecting the caller's turn
    FINALIZING = "FINALIZING"  # the caller went quiet: waiting for the transcript to settle
    THINKING = "THINKING"  # the reply is being written and synthesized
    HOLDING = "HOLDING"  # the reply is ready, but the caller is talking: speak when they stop
    SPEAKING = "SPEAKING"  # the reply plays
    CLOSING = "CLOSING"  # the agent ends the call: the goodbye plays, nothing interrupts it
    ENDED = "ENDED"


class Timer(enum.Enum):
    """Every timeout a call has; each expiry is a row of the table, like an event."""

    END_OF_TURN = "eot"  # enough silence after enough speech
    FINAL_WAIT = "final"  # how long the final transcript may take
    BREATH = "breath"  # the short pause before the agent answers
    BARGE_IN = "barge"  # caller speech has lasted long enough to interrupt
    REFRACTORY = "refractory"  # the window after a reply closes
    SPEC_STABLE = "spec"  # the transcript held still long enough to draft a reply
    SPEC_WAIT = "spec_wait"  # how long an adopted draft may take to have audio
    FILLER = "filler"  # the reply has no audio yet: say a filler
    MARK_WAIT = "mark_wait"  # the last mark should have come back by now
    IDLE = "idle"  # the agent finished speaking and the caller has said nothing since
    DTMF = "dtmf"  # no further key press: the keypad entry is complete


class FsmError(Exception):
    """An event the FSM cannot take in this state; the message says whose bug it is."""


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
    """The first audio of reply ``reply`` (or its filler) is synthesized and waiting."""

    at: float
    reply: int


@dataclass(**_EV)
class ReplyQueued:
    """Every piece of reply ``reply`` is queued; playing them takes ``playout_s`` more."""

    at: float
    reply: int
    playout_s: float


@dataclass(**_EV)
class PlaybackDone:
    """Twilio echoed the last mark of reply ``reply`` (0 = the greeting)."""

    at: float
    reply: int


@dataclass(**_EV)
class Tick:
    """The call clock reached ``at``: timers due by then fire (as of their deadlines)."""

    at: float


@dataclass(**_EV)
class WindDown:
    """End the call politely: stop, say the goodbye, hang up (``reason`` goes in the record)."""

    at: float
    reason: str


@dataclass(**_EV)
class Hangup:
    at: float


@dataclass(**_EV)
class KeyPressed:
    """Twilio reported a keypad press (``0``-``9``, ``*``, ``#``, ``A``-``D``)."""

    at: float
    digit: str


@dataclass(**_EV)
class AgentEnds:
    """The model ended the call from reply ``reply``: ``end_call``, or ``transfer_call``
    when ``transfer_to`` (an E.164 number) is set. ``spoke``: the reply had words
    before the tool call (then an ``end_call`` needs no goodbye line)."""

    at: float
    reply: int
    transfer_to: str = ""
    spoke: bool = False


Event = (
    CallStarted | SpeechStarted | SpeechEnded | Partial | Final | SttReady | SttLost
    | ReplyAudioReady | ReplyQueued | PlaybackDone | Tick | WindDown | Hangup | KeyPressed | AgentEnds
)

# --------------------------------------------------------------- actions ---


@dataclass(**_EV)
class PlayGreeting:
    """Queue the business's pre-synthesized greeting (reply 0)."""


@dataclass(**_EV)
class StartReply:
    """Ask the LLM for reply ``reply`` to ``text`` and synthesize it; do not play yet.

    A draft (speculative) reply thinks but is never heard unless adopted; its
    audio is synthesized ahead only when ``voice_draft``.
    """

    reply: int
    text: str
    speech_start_at: float
    speech_end_at: float
    draft: bool = False
    voice_draft: bool = False
    required_silence_s: float = field(default=0.0, compare=False)  # the end-of-turn rule's silence
    speculation: str = field(default="none", compare=False)  # "none", "miss" or "late" (a draft lost)
    fallbacks: tuple[str, ...] = field(default=(), compare=False)  # "stt_recognize": unary transcript


@dataclass(**_EV)
class AdoptDraft:
    """The turn ended on the words draft ``reply`` was built on: it becomes the reply."""

    reply: int
    text: str
    speech_start_at: float
    speech_end_at: float
    required_silence_s: float = field(default=0.0, compare=False)
    speculation: str = field(default="hit", compare=False)
    fallbacks: tuple[str, ...] = field(default=(), compare=False)


@dataclass(**_EV)
class BeginPlayback:
    """Release reply ``reply``'s audio to the TX queue, ``breath_s`` after it was ready."""

    reply: int
    breath_s: float = field(default=0.0, compare=False)


@dataclass(**_EV)
class SayFiller:
    """Reply ``reply`` has no audio yet: put a filler line ahead of it."""

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
class ReviseTurn:
    """The recogniser's late final for a turn answered on its interim words: the
    caller said ``text`` where history has ``was`` (no second answer follows)."""

    reply: int
    was: str
    text: str


@dataclass(**_EV)
class ReplyFinished:
    """Reply ``reply`` has played to the end (``marks_lost``: assumed so, its marks never came back)."""

    reply: int
    marks_lost: bool = False


@dataclass(**_EV)
class TranscribeFallback:
    """Streaming STT is down: transcribe this stretch of buffered audio."""

    speech_start_at: float
    speech_end_at: float


@dataclass(**_EV)
class PlayGoodbye:
    """Queue the business's pre-synthesized closing line (reply ``GOODBYE``):
    its ``goodbye``, or its ``handoff`` before a transfer."""

    line: str = "goodbye"


@dataclass(**_EV)
class PlayLine:
    """Say the business's cached ``line`` (``reprompt``) as reply ``reply``; it plays at once."""

    reply: int
    line: str


@dataclass(**_EV)
class EndCall:
    """Hang up now; ``reason`` is the call record's ``end_reason``. ``transfer_to``:
    the caller goes on to this number (``/twilio/after`` answers ``<Dial>``)."""

    reason: str
    transfer_to: str = ""


Action = (
    PlayGreeting | StartReply | AdoptDraft | BeginPlayback | SayFiller | StopPlayback | CancelReply
    | ReviseTurn | ReplyFinished | TranscribeFallback | PlayGoodbye | PlayLine | EndCall
)


# -------------------------------------------------------------- settings ---


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnSettings:
    """The FSM's numbers, in seconds. Built from the loaded config (``from_config``),
    which is their only home: there are no defaults here."""

    min_utt_s: float
    min_silence_short_s: float
    min_silence_long_s: float
    long_utterance_s: float
    hangover_s: float
    final_timeout_s: float
    fallback_timeout_s: float
    refractory_s: float
    breath_min_s: float
    breath_max_s: float
    hesitation_guard_s: float  # the agent never speaks sooner than this after the caller's last voiced frame
    barge_in_enabled: bool
    barge_in_min_s: float
    barge_in_guard_s: float  # speech in the first moments of agent audio never interrupts
    # The VAD reports the end of speech only after its hangover: wait that long too, so
    # speech shorter than barge_in_min_s is known to have ended before it could interrupt.
    barge_in_confirm_s: float
    barge_in_requires_words: bool  # noise and echo carry no words
    greeting_barge_in: bool
    early_finalize: bool
    strong_punct_min_chars: int
    strong_bare_min_chars: int
    strong_bare_silence_s: float  # the silence that ends a turn on a long transcript without punctuation
    spec_enabled: bool
    spec_min_chars: int
    spec_stable_s: float
    spec_wait_s: float
    spec_voice_draft: bool  # synthesize a draft's audio before it is adopted
    streaming_stt: bool  # False: every turn is transcribed by the unary fallback
    filler_after_s: float  # after the end of speech, say a filler if no audio is ready (0 = never)
    mark_timeout_s: float  # beyond the queued audio, how long the last mark may take to come back
    dtmf_digit_timeout_s: float  # a keypad entry is complete after this long without a press
    idle_reprompt_s: float  # after the agent finished speaking, silence this long gets the reprompt
    idle_max_reprompts: int  # unanswered reprompts before the agent says goodbye and ends the call

    @classmethod
    def from_config(cls, config: Config) -> TurnSettings:
        """The FSM's view of ``[turn]``, ``[vad]``, ``[stt]``, ``[spec]``, ``[llm]`` and ``[audio]``."""
        t, vad, stt, spec = config.turn, config.vad, config.stt, config.spec
        return cls(
            min_utt_s=t.min_utt_s, min_silence_short_s=t.min_silence_short_s,
            min_silence_long_s=t.min_silence_long_s, long_utterance_s=t.long_utterance_s,
            hangover_s=vad.hangover_ms / 1000, final_timeout_s=stt.final_timeout_ms / 1000,
            fallback_timeout_s=stt.fallback_timeout_ms / 1000, refractory_s=t.refractory_ms / 1000,
            breath_min_s=t.breath_min_ms / 1000, breath_max_s=t.breath_max_ms / 1000,
            # The caller's resumed speech is known only after the VAD's onset (and its frame):
            # a pause of hesitation_guard_ms must be over before that news could come too late.
            hesitation_guard_s=(t.hesitation_guard_ms + vad.speech_start_ms + vad.frame_ms) / 1000,
            barge_in_enabled=t.barge_in_enabled, barge_in_min_s=t.barge_in_min_ms / 1000,
            barge_in_guard_s=t.barge_in_guard_ms / 1000, barge_in_confirm_s=vad.hangover_ms / 1000,
            barge_in_requires_words=t.barge_in_requires_words, greeting_barge_in=t.greeting_barge_in,
            early_finalize=t.early_finalize_enabled, strong_punct_min_chars=t.strong_punct_min_chars,
            strong_bare_min_chars=t.strong_bare_min_chars, strong_bare_silence_s=t.strong_bare_silence_s,
            spec_enabled=spec.enabled,
            spec_min_chars=spec.min_chars, spec_stable_s=spec.stable_ms / 1000, spec_wait_s=spec.wait_ms / 1000,
            spec_voice_draft=spec.synthesize_draft, streaming_stt=stt.streaming_enabled,
            filler_after_s=config.llm.filler_after_ms / 1000, mark_timeout_s=config.audio.mark_timeout_ms / 1000,
            dtmf_digit_timeout_s=t.dtmf_digit_timeout_ms / 1000, idle_reprompt_s=t.idle_reprompt_s,
            idle_max_reprompts=t.idle_max_reprompts,
        )
