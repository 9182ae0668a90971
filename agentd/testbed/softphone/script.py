"""The softphone's caller script: when to speak, when the agent has answered, what to report.

Theory of operation
-------------------
A call is a sequence of segments: the agent's greeting, then one segment per
caller turn. Time advances in 20 ms slots; at the start of every slot the
driver tells the script what the simulated Twilio is playing (`SlotFacts`) and
the script answers with what the caller sends in that slot (`SlotPlan`): one
frame of caller audio, line silence, a DTMF digit, or the hang-up.

    GREETING --settled / no greeting in time--> SPEAKING(turn 1)  [or GAP first]
    GAP      --gap_ms elapsed-----------------> SPEAKING
    SPEAKING --last frame sent----------------> AWAITING
    AWAITING --reply settled / timed out / cut-> SPEAKING(next) | HANGUP
    HANGUP   --stop sent----------------------> DONE

"Settled" means the agent has played something and has then been quiet
(nothing queued or playing, no new media) for `settle_ms`. A reply *starts* at
the first agent frame played at or after the turn began -- a reply that talks
over the caller's tail counts, and its voice-to-voice latency comes out
negative, which is worth seeing. The script does no I/O and reads no clock:
every time is an argument, in ms of media time since `start` was sent.
"""

import enum
from dataclasses import dataclass, field

from agentd.testbed.softphone.caller_audio import last_voiced_offset_ms, load_caller_wav
from agentd.codecs.mulaw import SAMPLE_RATE_HZ, silence, split_frames
from agentd.testbed.softphone.playback import SLOT_MS

DTMF_DIGITS = frozenset("0123456789*#ABCD")


@dataclass(frozen=True, slots=True, kw_only=True)
class CallerTurn:
    """One caller turn: optional DTMF digits (one per slot), then 8 kHz mu-law audio.

    With `expect_reply=False` the script moves on as soon as the turn is sent.
    """

    audio: bytes = b""
    label: str = ""
    dtmf: str = ""
    expect_reply: bool = True

    def __post_init__(self) -> None:
        if not self.audio and not self.dtmf:
            raise ValueError("CallerTurn: needs audio or dtmf")
        bad = set(self.dtmf) - DTMF_DIGITS
        if bad:
            raise ValueError(f"CallerTurn.dtmf: invalid digits {''.join(sorted(bad))!r}")

    @classmethod
    def from_wav(cls, path, *, dtmf: str = "", expect_reply: bool = True) -> "CallerTurn":
        """A turn speaking the WAV at `path` (any PCM16 WAV), labelled with the file name."""
        return cls(audio=load_caller_wav(path), label=str(path), dtmf=dtmf, expect_reply=expect_reply)

    @property
    def audio_ms(self) -> int:
        return len(self.audio) * 1000 // SAMPLE_RATE_HZ

    @property
    def speech_end_offset_ms(self) -> int:
        """When, from the turn's first slot, the caller has finished (last voice or last digit)."""
        dtmf_ms = len(self.dtmf) * SLOT_MS
        voiced = last_voiced_offset_ms(self.audio) if self.audio else 0
        if voiced or not self.audio:
            return dtmf_ms + voiced
        return dtmf_ms + self.audio_ms  # silent audio: the caller is done when it ends

    def frames(self) -> list[tuple[bytes, str | None]]:
        """(caller frame, DTMF digit or None) for each slot of the turn."""
        digits = [(silence(1), digit) for digit in self.dtmf]
        return digits + [(frame, None) for frame in split_frames(self.audio)]


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotFacts:
    """What the simulated Twilio is doing in the slot starting `at_ms`."""

    at_ms: int
    played_bytes: int  # agent audio bytes playing in this slot; 0 = nothing
    agent_quiet_ms: float  # see PlaybackBuffer.quiet_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotPlan:
    """What the caller sends in this slot: a media frame and/or a digit, or the hang-up."""

    caller_frame: bytes | None
    dtmf: str | None = None
    hang_up: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class GreetingReport:
    latency_ms: int | None  # `start` sent -> first agent frame played; None = no greeting
    audio_ms: int
    settled: bool  # False: timed out or cut at max_reply_ms
    clears: int
    marks_echoed: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnReport:
    index: int  # 1-based
    label: str
    dtmf: str
    caller_audio_ms: int
    started_ms: int  # media time of the turn's first slot
    speech_end_ms: int  # media time the caller finished speaking
    answered: bool
    v2v_ms: int | None  # speech_end_ms -> first agent frame of the reply played
    reply_audio_ms: int
    reply_frames: int
    settled: bool
    clears: int
    marks_echoed: tuple[str, ...]


class Phase(enum.Enum):
    GREETING = "greeting"
    GAP = "gap"
    SPEAKING = "speaking"
    AWAITING = "awaiting"
    HANGUP = "hangup"
    DONE = "done"


@dataclass(slots=True)
class _Segment:
    """Mutable tally for the greeting or one turn, frozen into a report at the end."""

    started_ms: int = 0
    first_agent_ms: int | None = None
    agent_bytes: int = 0
    agent_frames: int = 0
    settled: bool = False
    clears: int = 0
    marks: list[str] = field(default_factory=list)


class CallScript:
    """Decides, slot by slot, what the caller sends. See the module docstring."""

    def __init__(self, turns: list[CallerTurn], *, settle_ms: int = 700, gap_ms: int = 0,
                 reply_timeout_ms: int = 15_000, max_reply_ms: int = 60_000) -> None:
        self._turns = list(turns)
        self._settle_ms = settle_ms
        self._gap_ms = gap_ms
        self._reply_timeout_ms = reply_timeout_ms
        self._max_reply_ms = max_reply_ms
        self._segments = [_Segment()]  # [0] is the greeting
        self._phase = Phase.GREETING
        self._frames: list[tuple[bytes, str | None]] = []
        self._next_frame = 0
        self._phase_since_ms = 0

    def __repr__(self) -> str:
        return f"<CallScript {self._phase.name} turn={len(self._segments) - 1}/{len(self._turns)}>"

    @property
    def phase(self) -> Phase:
        return self._phase

    def on_slot(self, facts: SlotFacts) -> SlotPlan:
        """Account for what plays in this slot, then say what the caller sends in it.

        Agent audio counts toward the current segment: the greeting until turn 1
        starts, then each turn from its first slot (audio during a gap belongs
        to the reply before it).
        """
        if facts.played_bytes:
            self._hear(facts)
        return _PHASES[self._phase](self, facts)

    def note_clear(self) -> None:
        """The agent sent `clear` (counted against the current greeting/turn)."""
        self._segments[-1].clears += 1

    def note_mark_echoed(self, name: str) -> None:
        self._segments[-1].marks.append(name)

    def greeting_report(self) -> GreetingReport:
        seg = self._segments[0]
        return GreetingReport(latency_ms=seg.first_agent_ms, audio_ms=_ms(seg.agent_bytes), settled=seg.settled,
                              clears=seg.clears, marks_echoed=tuple(seg.marks))

    def turn_reports(self) -> tuple[TurnReport, ...]:
        """Reports for the turns that were started (all of them, unless the call ended early)."""
        return tuple(self._turn_report(i, seg) for i, seg in enumerate(self._segments[1:]))

    # -- phases: each takes the slot's facts and returns the caller's plan ------------

    def _greeting(self, facts: SlotFacts) -> SlotPlan:
        if self._segment_over(facts, since_ms=0):
            return self._next_turn(facts.at_ms)
        return _LINE_SILENCE

    def _gap(self, facts: SlotFacts) -> SlotPlan:
        if facts.at_ms - self._phase_since_ms >= self._gap_ms:
            return self._begin_turn(facts.at_ms)
        return _LINE_SILENCE

    def _speaking(self, facts: SlotFacts) -> SlotPlan:
        frame, digit = self._frames[self._next_frame]
        self._next_frame += 1
        if self._next_frame == len(self._frames):
            self._enter(Phase.AWAITING, facts.at_ms + SLOT_MS)
        return SlotPlan(caller_frame=frame, dtmf=digit)

    def _awaiting(self, facts: SlotFacts) -> SlotPlan:
        turn = self._turns[len(self._segments) - 2]
        if not turn.expect_reply or self._segment_over(facts, since_ms=self._phase_since_ms):
            return self._next_turn(facts.at_ms)
        return _LINE_SILENCE

    def _hangup(self, facts: SlotFacts) -> SlotPlan:
        self._enter(Phase.DONE, facts.at_ms)
        return SlotPlan(caller_frame=None, hang_up=True)

    def _done(self, facts: SlotFacts) -> SlotPlan:
        raise RuntimeError("CallScript.on_slot called after the hang-up")

    # -- helpers ----------------------------------------------------------------------

    def _hear(self, facts: SlotFacts) -> None:
        seg = self._segments[-1]
        if seg.first_agent_ms is None:
            seg.first_agent_ms = facts.at_ms
        seg.agent_bytes += facts.played_bytes
        seg.agent_frames += 1

    def _segment_over(self, facts: SlotFacts, *, since_ms: int) -> bool:
        """Has the agent finished (settled), failed to start in time, or run past the cap?"""
        seg = self._segments[-1]
        if seg.first_agent_ms is None:
            return facts.at_ms - since_ms >= self._reply_timeout_ms
        if facts.agent_quiet_ms >= self._settle_ms:
            seg.settled = True
            return True
        return facts.at_ms - seg.first_agent_ms >= self._max_reply_ms

    def _next_turn(self, at_ms: int) -> SlotPlan:
        if len(self._segments) - 1 == len(self._turns):
            self._enter(Phase.HANGUP, at_ms)
            return self._hangup(SlotFacts(at_ms=at_ms, played_bytes=0, agent_quiet_ms=0))
        if self._gap_ms > 0:
            self._enter(Phase.GAP, at_ms)
            return _LINE_SILENCE
        return self._begin_turn(at_ms)

    def _begin_turn(self, at_ms: int) -> SlotPlan:
        turn = self._turns[len(self._segments) - 1]
        self._segments.append(_Segment(started_ms=at_ms))
        self._frames = turn.frames()
        self._next_frame = 0
        self._enter(Phase.SPEAKING, at_ms)
        return self._speaking(SlotFacts(at_ms=at_ms, played_bytes=0, agent_quiet_ms=0))

    def _enter(self, phase: Phase, at_ms: int) -> None:
        self._phase = phase
        self._phase_since_ms = at_ms

    def _turn_report(self, index: int, seg: _Segment) -> TurnReport:
        turn = self._turns[index]
        speech_end = seg.started_ms + turn.speech_end_offset_ms
        first = seg.first_agent_ms
        return TurnReport(
            index=index + 1, label=turn.label, dtmf=turn.dtmf, caller_audio_ms=turn.audio_ms,
            started_ms=seg.started_ms, speech_end_ms=speech_end, answered=first is not None,
            v2v_ms=None if first is None else first - speech_end, reply_audio_ms=_ms(seg.agent_bytes),
            reply_frames=seg.agent_frames, settled=seg.settled, clears=seg.clears, marks_echoed=tuple(seg.marks),
        )


_LINE_SILENCE = SlotPlan(caller_frame=silence(1))

_PHASES = {
    Phase.GREETING: CallScript._greeting,
    Phase.GAP: CallScript._gap,
    Phase.SPEAKING: CallScript._speaking,
    Phase.AWAITING: CallScript._awaiting,
    Phase.HANGUP: CallScript._hangup,
    Phase.DONE: CallScript._done,
}


def _ms(mulaw_bytes: int) -> int:
    return mulaw_bytes * 1000 // SAMPLE_RATE_HZ
