"""The conversation so far, as the LLM will see it (pure, immutable).

Messages are OpenAI-format dicts (``{"role": ..., "content": ...}``), so other
kinds of message (tool calls and their results) can join later without a new
shape. The call driver replaces its ``History`` as actions happen: a turn taken
adds the caller's words (revised when the recogniser's final for words
answered early comes in), a reply that ends adds what the caller actually
heard of it, and a reply cancelled because the caller kept talking takes the
caller's words back out (they rejoin the turn still going on).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class History:
    """The messages of one call, oldest first."""

    messages: tuple[Mapping[str, str], ...] = ()

    def said_by_caller(self, text: str) -> History:
        """The caller's turn ``text`` was answered."""
        return History((*self.messages, {"role": "user", "content": text}))

    def heard_by_caller(self, text: str) -> History:
        """The caller heard ``text`` of the agent's reply ("" = nothing: no message)."""
        if not text:
            return self
        return History((*self.messages, {"role": "assistant", "content": text}))

    def with_messages(self, messages) -> History:
        """Whole OpenAI messages (a tool round: the assistant's calls, then each result) join the history."""
        return History((*self.messages, *messages)) if messages else self

    def turn_resumed(self, text: str) -> History:
        """The caller kept talking before the reply to ``text`` was heard: take ``text`` back."""
        if self.messages and self.messages[-1] == {"role": "user", "content": text}:
            return History(self.messages[:-1])
        return self

    def turn_revised(self, was: str, text: str) -> History:
        """The caller's latest turn ``was`` turned out to be ``text`` (the recogniser's final)."""
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i].get("role") == "user":
                if self.messages[i] != {"role": "user", "content": was}:
                    return self
                revised = {"role": "user", "content": text}
                return History((*self.messages[:i], revised, *self.messages[i + 1:]))
        return self

    def recent(self, turns: int) -> tuple[Mapping[str, str], ...]:
        """The last ``turns`` exchanges (two messages each) to send with the next request."""
        recent = self.messages[-2 * turns:] if turns > 0 else ()
        while recent and recent[0]["role"] == "tool":  # never a tool result without the call it answers
            recent = recent[1:]
        return recent
