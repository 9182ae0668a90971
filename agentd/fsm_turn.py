"""The FSM's rules for the caller's turn: from their first sound to the committed words.

A turn is collected from two sources (see ``agentd.fsm``): the VAD's speech
and silence, and the recogniser's interim and final results. These rules keep
the open utterance and its transcript in every state, drop results of a turn
already answered (or let a late final revise it), open LISTENING after the
REFRACTORY window, decide when the caller's silence ends the turn (the silence
rule, or earlier for strong words), wait in FINALIZING for the final or the
unary fallback, and commit the turn: a fresh reply, or the draft built on the
same words. A caller who goes on before the reply plays resumes the same turn,
with the answered words back in front of the new ones. They belong together
because they alone decide what the caller said and when they finished.

``TurnRules`` is a mixin of ``agentd.fsm.CallFSM``: its methods are rows of the
FSM's table (or helpers of them) and use the call's facts the FSM keeps.
"""

from __future__ import annotations

import math
from dataclasses import replace

from agentd import text as textrules
from agentd.fsm_events import (
    Action, AdoptDraft, CancelReply, Final, Partial, ReviseTurn, SpeechEnded, SpeechStarted, StartReply, State,
    SttLost, SttReady, Timer, TranscribeFallback,
)
from agentd.fsm_memory import Turn, Utterance


class TurnRules:
    """The caller's turn: speech, results, end of turn, FINALIZING, commit, resumption."""

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
            self._utt = Utterance(start_at=event.at)
        else:
            self._utt.voiced, self._utt.end_at = True, None

    def _release_speech(self, event: SpeechEnded) -> None:
        if self._utt is not None:
            self._utt.voiced, self._utt.end_at = False, event.at

    def _silence_needed(self, utt: Utterance) -> float:
        s = self.settings
        spoken = (utt.end_at or utt.start_at) - utt.start_at
        return s.min_silence_long_s if spoken >= s.long_utterance_s else s.min_silence_short_s

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

    # -- REFRACTORY --------------------------------------------------------

    def _refractory_result(self, event: Partial | Final) -> list[Action]:
        if self._is_late(event):
            return self._late_result(event)
        self._record_result(event)
        if not event.text.strip():
            return []  # no words (Google's empty finals): keep the window
        if self._utt is None:
            self._utt = Utterance(start_at=event.at, voiced=False, end_at=event.at)
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
            self._utt = Utterance(start_at=event.at, voiced=False, end_at=event.at)
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
        self._turn = Turn(at=now, text=self._transcript.text(), start_at=utt.start_at,
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

    # -- the caller goes on before the reply plays (THINKING, HOLDING) -----

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
            self._utt = Utterance(start_at=turn.start_at, voiced=False, end_at=now)
        self._utt.start_at = turn.start_at
        self._turn = Turn(at=turn.start_at)  # its late final now belongs to the open turn
        self._listen_again()
        self._watch_for_draft(now)
        self._arm_end_of_turn(now)
        return [CancelReply(reply=reply, resumes_turn=True)]


def _repeats(fresh: str, answered: str) -> bool:
    """Do the new words start with the answered interim (the same segment, grown)?"""
    return textrules.normalize_for_match(fresh).startswith(textrules.normalize_for_match(answered))
