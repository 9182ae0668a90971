"""What a call's FSM remembers between events, and how the agent ends a call.

These are facts, not states (see ``agentd.fsm``): the utterance being collected,
its transcript, the caller's last committed turn, and the ending the agent chose.
Every group of rules (``agentd.fsm_turn``, ``fsm_playback``, ``fsm_drafts``,
``fsm_phone``) reads and writes them, so they live apart from all of those; the
FSM's own constructor is the only place that creates the call's copies.
``Ending``, its reasons and ``model_ending`` are re-exported by ``agentd.fsm``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agentd.fsm_events import AgentEnds


@dataclass(slots=True)
class Utterance:
    """The caller speech being collected into the next turn."""

    start_at: float
    voiced: bool = True
    end_at: float | None = None  # last voiced instant, None while voiced


@dataclass(slots=True)
class Transcript:
    """Closed segments plus the latest interim of the open one."""

    finals: list[str] = field(default_factory=list)
    partial: str = ""

    def text(self) -> str:
        return " ".join(t for t in [*self.finals, self.partial] if t).strip()

    def clear(self) -> None:
        self.finals.clear()
        self.partial = ""


@dataclass(frozen=True, slots=True)
class Turn:
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
