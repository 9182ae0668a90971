"""Speculative replies: the bookkeeping behind the FSM's drafts (pure, no clock).

While the caller is still talking, a transcript that holds still for a moment
is worth answering in advance: the LLM thinks while the caller finishes. Such
a *draft* is only ever heard if the turn ends on the very words it was built
on. This module remembers which words the stability clock watches, which draft
exists, and how each turn's speculation ended; the FSM owns the clock and
decides when to ask it.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentd import text as textrules


@dataclass(slots=True)
class Draft:
    """A speculative reply built on a stable partial transcript."""

    reply: int
    text: str
    ready: bool = False  # its first audio exists


class Speculation:
    """One call's drafts: the watched words, the live draft, and a tally of outcomes."""

    def __init__(self, *, min_chars: int) -> None:
        self._min_chars = min_chars
        self.draft: Draft | None = None
        self.candidate = ""  # normalized transcript the stability clock is watching
        self.counts = {"drafts": 0, "hits": 0, "misses": 0, "late": 0}

    def watch(self, transcript: str) -> bool | None:
        """The transcript changed: True restarts the stability clock, False stops it,
        None leaves it running (the same words again)."""
        text = textrules.normalize_for_match(transcript)
        if len(text) < self._min_chars:
            self.candidate = ""
            return False
        if text == self.candidate:
            return None
        self.candidate = text
        return True

    def already_drafted(self) -> bool:
        """The live draft was built on exactly the watched words."""
        return self.draft is not None and textrules.normalize_for_match(self.draft.text) == self.candidate

    def start(self, reply: int, transcript: str) -> Draft | None:
        """Draft reply ``reply`` on ``transcript``; returns the draft it replaces, if any."""
        old, self.draft = self.draft, Draft(reply=reply, text=transcript)
        self.counts["drafts"] += 1
        return old

    def discard(self) -> Draft | None:
        """Forget the draft and the watched words; returns the draft to cancel, if any."""
        draft, self.draft = self.draft, None
        self.candidate = ""
        return draft

    def mark_ready(self, reply: int) -> None:
        if self.draft is not None and self.draft.reply == reply:
            self.draft.ready = True

    def settle(self, committed: str) -> tuple[str, Draft | None]:
        """The turn ended on ``committed``: ("none" | "hit" | "miss", the draft).

        A hit is adopted; a miss is cancelled (never speak words the caller did
        not end with). Either way the next turn's words are new, even if they
        repeat these.
        """
        draft = self.discard()
        if draft is None:
            return "none", None
        if textrules.normalize_for_match(draft.text) != textrules.normalize_for_match(committed):
            self.counts["misses"] += 1
            return "miss", draft
        self.counts["hits"] += 1
        return "hit", draft

    def late(self) -> None:
        """An adopted draft had no audio in time and was replaced by a fresh reply."""
        self.counts["late"] += 1
