"""Keypad digits into the caller's turn: a pure collector with time passed in.

Twilio reports each key press as a `dtmf` event (`agentd.codecs.twilio.Dtmf`).
Digits are collected until the caller presses `#` (which ends the entry and
is not part of it) or stops pressing for `timeout_s` (the inter-digit
timeout, `turn.dtmf_digit_timeout_ms`). The entry then becomes the caller's
turn, a user message containing the digits (`digits_message`).

The collector never sleeps and reads no clock: `press(digit, now)` takes the
event's time, `deadline()` says when pending digits will complete, and
`expire(now)` completes them once that time has come. The FSM owns the timer:
it answers `next_deadline()` with this deadline and calls `expire` on the
`Tick`. A business's single-digit actions (`call_tools.dtmf_decision`) are
checked by the caller before a digit is pressed into an empty collector.
"""

from __future__ import annotations

__all__ = ["DigitCollector", "digits_message"]

END_KEY = "#"


class DigitCollector:
    """Collects one keypad entry at a time."""

    __slots__ = ("_digits", "_last_at", "_timeout_s")

    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._timeout_s = timeout_s
        self._digits = ""
        self._last_at = 0.0

    def __repr__(self) -> str:
        return f"DigitCollector(pending={self._digits!r}, deadline={self.deadline()})"

    @property
    def pending(self) -> str:
        """The digits of the entry in progress ("" when none)."""
        return self._digits

    def press(self, digit: str, now: float) -> str | None:
        """Add one key press; the completed entry when it is `#` ending a non-empty entry, else None.

        A `#` with nothing pending completes nothing (a stray end key).
        """
        if digit == END_KEY:
            return self._take()
        self._digits += digit
        self._last_at = now
        return None

    def deadline(self) -> float | None:
        """When the pending entry completes for lack of another digit; None when nothing is pending."""
        return self._last_at + self._timeout_s if self._digits else None

    def expire(self, now: float) -> str | None:
        """The pending entry if its deadline has come by `now` (it is then cleared), else None."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return None
        return self._take()

    def clear(self) -> None:
        """Forget the entry in progress (the call ended, or the caller started speaking instead)."""
        self._digits = ""

    def _take(self) -> str | None:
        digits, self._digits = self._digits, ""
        return digits or None


def digits_message(digits: str) -> str:
    """The user turn for a keypad entry: says plainly what was typed, so the model reads it as keys."""
    return f"[The caller typed on the keypad: {digits}]"
