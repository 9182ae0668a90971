"""The FSM's rules for speculative drafts: replies thought up before the turn ends.

A transcript that holds still for ``spec_stable_s`` starts a draft reply
(``StartReply(draft=True)``) while the caller may still be talking; nothing of
it plays. At the end of the turn the caller's turn rules (``agentd.fsm_turn``)
adopt a draft built on the same words or cancel it. These rules own the rest of
a draft's life -- the stability clock, starting and replacing a draft, its
audio arriving early, dropping it, and giving up on an adopted draft that is
late -- with the bookkeeping itself in ``agentd.speculation``.

``DraftRules`` is a mixin of ``agentd.fsm.CallFSM``: its methods are rows of the
FSM's table (or helpers of them) and use the call's facts the FSM keeps.
"""

from __future__ import annotations

from agentd.fsm_events import Action, CancelReply, ReplyAudioReady, StartReply, Timer


class DraftRules:
    """Speculation: drafting a reply to words that held still, and dropping it."""

    def _watch_for_draft(self, now: float) -> None:
        """(Re)start the stability clock when the transcript changes."""
        if not self.settings.spec_enabled:
            return
        watch = self.spec.watch(self._transcript.text())
        if watch is False:
            self._timers.pop(Timer.SPEC_STABLE, None)
        elif watch:
            self._timers[Timer.SPEC_STABLE] = now + self.settings.spec_stable_s

    def _draft_now(self, when: float) -> list[Action]:
        """The transcript held still: draft a reply to it (replacing an older draft)."""
        if self.spec.already_drafted():
            return []
        text = self._transcript.text()
        self._replies_started += 1
        old = self.spec.start(self._replies_started, text)
        utt = self._utt
        start = utt.start_at if utt is not None else when
        end = utt.end_at if utt is not None and utt.end_at is not None else when
        cancel = [CancelReply(reply=old.reply)] if old is not None else []
        return [*cancel, StartReply(reply=self._replies_started, text=text, speech_start_at=start,
                                    speech_end_at=end, draft=True, voice_draft=self.settings.spec_voice_draft)]

    def _discard_draft(self) -> list[Action]:
        draft = self.spec.discard()
        return [CancelReply(reply=draft.reply)] if draft is not None else []

    def _draft_audio_ready(self, event: ReplyAudioReady) -> None:
        self.spec.mark_ready(event.reply)

    def _draft_too_late(self, when: float) -> list[Action]:
        """The adopted draft is late: drop it and ask afresh with the final words."""
        self.spec.late()
        # resumes_turn: the adopted words move on to the fresh reply, so they must leave history.
        return [CancelReply(reply=self._reply, resumes_turn=True), *self._fresh_reply(when, "late")]
