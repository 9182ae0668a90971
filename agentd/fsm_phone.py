"""The FSM's rules for what makes this a phone call: how it ends, and the keypad.

A conversation of turns (``agentd.fsm_turn``, ``agentd.fsm_playback``) needs a few
more rules on a telephone line, and they share one shape: each stops what the
agent is doing (``_stop_quiet``, ``_stop_thinking``, ``_stop_playing``, one per
kind of state) and then either closes the call or takes a turn for the caller.
Here are the agent winding the call down (``WindDown``) and its goodbye in
CLOSING, which the caller cannot interrupt; the model ending or transferring the
call (``AgentEnds``); the silent caller's reprompts and goodbye (timer ``IDLE``);
keypad entries (``KeyPressed``, timer ``DTMF``), which are turns or the
business's single-digit actions; and the caller hanging up.

``PhoneRules`` is a mixin of ``agentd.fsm.CallFSM``: its methods are rows of the
FSM's table (or helpers of them) and use the call's facts the FSM keeps.
"""

from __future__ import annotations

import typing

from agentd.dtmf import digits_message
from agentd.fsm_events import (
    GOODBYE, Action, AgentEnds, CancelReply, EndCall, Hangup, KeyPressed, PlaybackDone, PlayGoodbye, PlayLine,
    ReplyFinished, State, StopPlayback, Timer, WindDown,
)
from agentd.fsm_memory import SILENT, Ending, Turn, model_ending


class PhoneRules:
    """Ending the call (wind-down, goodbye, the model's end or transfer, the idle caller), keys, hang-up."""

    # -- winding down, and the goodbye (WindDown, CLOSING) -----------------

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
        self._turn = Turn(at=now, text=text, start_at=now, end_at=now)
        self._caller_answered()
        self.spec.settle("")
        self._enter(State.THINKING)
        return [*actions, *self._fresh_reply(now, "none")]

    # -- the caller hangs up (Hangup) ---------------------------------------

    def _hangup(self, event: Hangup) -> list[Action]:
        actions = self._discard_draft()
        self._enter(State.ENDED)
        return actions

    def _hangup_busy(self, event: Hangup) -> list[Action]:
        """The caller left while a reply was being prepared or spoken."""
        return [*self._hangup(event), CancelReply(reply=self._reply)]
