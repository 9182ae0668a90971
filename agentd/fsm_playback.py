"""The FSM's rules for the agent's voice: when it starts, and when the caller stops it.

Everything between the caller's committed turn and the floor going back to
them: the greeting; THINKING and HOLDING, where the reply's first audio waits
for a breath (and for a caller who is talking) and a filler covers a slow
reply; barge-in, sustained caller speech over the agent (after the echo guard)
or before it spoke, which needs ``barge_in_min_s`` and optionally words; and
the end of a playback (Twilio's last mark, or the wait for it) that opens the
REFRACTORY window. They belong together because they share the barge-in and
playback timers (``BARGE_IN``, ``BREATH``, ``FILLER``, ``MARK_WAIT``) and the
one fact of when agent audio began.

``PlaybackRules`` is a mixin of ``agentd.fsm.CallFSM``: its methods are rows of
the FSM's table (or helpers of them) and use the call's facts the FSM keeps.
"""

from __future__ import annotations

from agentd.fsm_events import (
    Action, BeginPlayback, CallStarted, CancelReply, Final, Partial, PlaybackDone, PlayGreeting, ReplyAudioReady,
    ReplyFinished, ReplyQueued, SayFiller, SpeechEnded, SpeechStarted, State, StopPlayback, Timer,
)


class PlaybackRules:
    """The agent speaking: greeting, breath and filler, barge-in, the end of a playback."""

    # -- GREETING ----------------------------------------------------------

    def _start(self, event: CallStarted) -> list[Action]:
        self._audio_since = event.at
        return [PlayGreeting()]

    def _greeting_speech(self, event: SpeechStarted) -> None:
        if self.settings.greeting_barge_in:
            self._speech_over_audio(event)
        else:
            self._hold_speech(event)

    # -- THINKING, HOLDING: the reply's first audio ------------------------

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

    # -- sustained caller speech while the agent has the floor -------------

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
