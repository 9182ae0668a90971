"""One phone call: the Trio glue around the sans-I/O ``CallFSM``.

Every task of a call lives in the call's one nursery (TX pacer, recognizer,
timers, line watchdog, stats, replies, fallback transcriptions); when the
caller hangs up, the socket drops or the agent ends the call (the line went
quiet, or the call reached its length limit), the nursery is cancelled and
everything ends with it. The call record says which (``end_reason``).

Events reach the FSM through ``_dispatch``, a synchronous function called by
whichever task learnt the fact (reader, recognizer, reply, timer). Trio runs
one task at a time, so the FSM needs no lock, and actions are carried out
before the next event is taken.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
import trio_websocket

from agentd import fsm, telemetry
from agentd.audio_cache import AudioCache
from agentd.codecs import twilio
from agentd.config import Business, Config
from agentd.errors import CallProtocolError, UpstreamUnavailable
from agentd.grpc_bridge import Channel
from agentd.llm_openai import build_messages
from agentd.metronome import Metronome
from agentd.reply import ReplyJob, chat_thinker
from agentd.stt_google import SttSettings, StreamingRecognizer
from agentd.tts_google import Synthesizer, Voice
from agentd.tx import FRAME_S, TxQueue
from agentd.vad import VadSettings, VoiceActivity, VoiceEnded, VoiceStarted

log = logging.getLogger(__name__)

_FALLBACK_MARGIN_S = 0.3  # audio kept either side of a fallback utterance
_PLAYOUT_MARGIN_S = 0.5  # beyond the TX lead: how long a sent frame may wait in Twilio's buffer
_CALLER_ENDS = ("stop", "socket closed")  # end reasons that need no explanation in the close frame


@dataclass
class Services:
    """What every call shares: one of each per process."""

    config: Config
    chat: object  # llm_openai.ChatModel
    tts: Synthesizer
    stt_channel: Channel
    cache: AudioCache
    sink: telemetry.JsonlSink
    metronome: Metronome
    observers: list[Callable[[dict], None]] = field(default_factory=list)

    def voice(self, business: Business) -> Voice:
        return Voice(language=business.language, name=business.voice,
                     speaking_rate=self.config.tts.speaking_rate)


def turn_settings(config: Config) -> fsm.TurnSettings:
    t = config.turn
    return fsm.TurnSettings(
        min_utt_s=t.min_utt_s, min_silence_short_s=t.min_silence_short_s,
        min_silence_long_s=t.min_silence_long_s, long_utterance_s=t.long_utterance_s,
        hangover_s=config.vad.hangover_ms / 1000, final_timeout_s=config.stt.final_timeout_ms / 1000,
        fallback_timeout_s=config.stt.fallback_timeout_ms / 1000, refractory_s=t.refractory_ms / 1000,
        breath_min_s=t.breath_min_ms / 1000, breath_max_s=t.breath_max_ms / 1000,
        barge_in_enabled=t.barge_in_enabled, barge_in_min_s=t.barge_in_min_ms / 1000,
        barge_in_guard_s=t.barge_in_guard_ms / 1000, barge_in_requires_words=t.barge_in_requires_words,
        barge_in_confirm_s=config.vad.hangover_ms / 1000,
        greeting_barge_in=t.greeting_barge_in, early_finalize=t.early_finalize_enabled,
        strong_punct_min_chars=t.strong_punct_min_chars, strong_bare_min_chars=t.strong_bare_min_chars,
        spec_enabled=config.spec.enabled, spec_min_chars=config.spec.min_chars,
        spec_stable_s=config.spec.stable_ms / 1000, spec_wait_s=config.spec.wait_ms / 1000,
    )


def stt_settings(config: Config, business: Business) -> SttSettings:
    s = config.stt
    return SttSettings(
        language=business.language, model=s.model, use_enhanced=s.use_enhanced,
        automatic_punctuation=s.automatic_punctuation, batch_ms=s.batch_ms,
        partial_debounce_ms=s.partial_debounce_ms, open_attempts=s.open_attempts,
        open_timeout_s=s.open_timeout_ms / 1000, fallback_timeout_s=s.fallback_timeout_ms / 1000,
        rotate_after_s=s.rotate_after_s,
    )


class Call:
    """One Twilio Media Stream, from ``start`` to hang-up."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, services: Services, *,
                 on_start: Callable[[twilio.Start], None] | None = None):
        self._ws = ws
        self._on_start = on_start  # the server's admission check; may raise CallProtocolError
        self._svc = services
        self._max_bytes = services.config.server.max_message_bytes
        self.t0 = trio.current_time()
        self.call_sid = "?"
        self.states: list[str] = []
        self.history: list[tuple[str, str]] = []
        self._timelines: dict[int, telemetry.TurnTimeline] = {0: telemetry.TurnTimeline()}
        self._timelines[0].stamp("ws_connected", self.t0)
        # Transcript results arrive between turns too (a late final for the last turn's audio, noise):
        # the first partial and the first final after each start of speech, and when each came.
        # A turn takes the first of each that came after its speech began.
        self._results_at: list[tuple[str, float]] = []
        self._results_seen: set[str] = set()
        self._jobs: dict[int, ReplyJob] = {}
        self._turn_facts: dict[int, dict] = {}
        self._turns_taken = 0
        self._user_text: dict[int, str] = {}
        self._rearm = trio.Event()
        self._warned_unknown = False
        self._nursery: trio.Nursery | None = None
        # Why the call ended, for its record; stays "aborted" on an internal error or a daemon shutdown.
        self.end_reason = "aborted"
        self._heard_at = self.t0  # when the peer last sent anything: what the line watchdog checks

    # -- lifecycle ---------------------------------------------------------

    async def run(self) -> str:
        """Serve the call until it ends; returns the reason for the close frame.

        The caller ends it with ``stop`` or by closing the socket (reason "bye");
        the agent ends it when nothing has come in for ``server.media_timeout_ms``
        or at ``server.max_call_duration_s`` (the reason says which).
        Raises CallProtocolError.
        """
        start = await self._await_start()
        if self._on_start is not None:
            self._on_start(start)
        self._setup(start)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.tx.run)
                if self._svc.config.stt.streaming_enabled:
                    await nursery.start(self.stt.run)
                else:
                    self._dispatch(fsm.SttLost(at=trio.current_time()))  # every turn via Recognize
                nursery.start_soon(self._run_timers)
                nursery.start_soon(self._watch_line)
                nursery.start_soon(self._report_stats)
                self._dispatch(fsm.CallStarted(at=trio.current_time()))
                try:
                    self.end_reason = await self._read_until_stop()
                except CallProtocolError:
                    self.end_reason = "protocol error"  # what it was is logged at the per-call boundary
                    raise
                nursery.cancel_scope.cancel()
        finally:
            self._finish()
        return "bye" if self.end_reason in _CALLER_ENDS else self.end_reason

    async def _await_start(self) -> twilio.Start:
        while True:
            event = self._parse(await self._ws.get_message())
            if isinstance(event, twilio.Start):
                return event
            if event is not None and not isinstance(event, twilio.Connected):
                raise CallProtocolError(f"{type(event).__name__.lower()} before start")

    def _setup(self, start: twilio.Start) -> None:
        cfg = self._svc.config
        self.call_sid, self.stream_sid = start.call_sid, start.stream_sid
        self.business = cfg.business(start.parameter("business"))
        self.voice = self._svc.voice(self.business)
        self.fsm = fsm.CallFSM(turn_settings(cfg))
        self.vad = VoiceActivity(VadSettings(
            aggressiveness=cfg.vad.aggressiveness, speech_start_ms=cfg.vad.speech_start_ms,
            hangover_ms=cfg.vad.hangover_ms))
        self.stt = StreamingRecognizer(self._svc.stt_channel, stt_settings(cfg, self.business),
                                       self._dispatch, is_quiet=lambda: not self.vad.speaking)
        self.stt.on_stream_open = lambda at: self._timelines[0].stamp("stt_stream_opened", at)
        self.tx = TxQueue(self._ws.send_message, lambda f: twilio.render_media(self.stream_sid, f),
                          metronome=self._svc.metronome, capacity_frames=cfg.audio.tx_queue_frames,
                          lead_frames=cfg.audio.tx_lead_frames)
        log.info("call=%s start business=%s", self.call_sid, self.business.name)

    async def _read_until_stop(self) -> str:
        """Carry inbound messages into the call; returns how the caller ended it."""
        while True:
            try:
                message = await self._ws.get_message()
            except trio_websocket.ConnectionClosed:
                return "socket closed"
            # 50 messages a second: the watchdog only needs this stamp, never a scope or a task.
            self._heard_at = at = trio.current_time()
            event = self._parse(message)
            if isinstance(event, twilio.Media):
                self._on_media(event.payload, at)
            elif isinstance(event, twilio.Mark):
                self._on_mark(event.name)
            elif isinstance(event, twilio.Stop):
                return "stop"
            elif isinstance(event, (twilio.Start, twilio.Connected)):
                raise CallProtocolError(f"unexpected {type(event).__name__.lower()} mid-call")

    def _parse(self, message: str | bytes) -> twilio.InboundEvent | None:
        """One inbound message; an event type Twilio added after us is skipped, not fatal."""
        try:
            return twilio.parse_inbound(message, max_bytes=self._max_bytes)
        except twilio.UnknownEventError as exc:
            if not self._warned_unknown:
                self._warned_unknown = True
                log.warning("call=%s skipping unknown Twilio event: %s", self.call_sid, exc)
            return None

    async def _watch_line(self) -> None:
        """End the call once nothing has come in for server.media_timeout_ms, or at
        server.max_call_duration_s.

        Twilio streams media every 20 ms for the whole call (line silence and agent
        speech included), so a quiet line is a peer that vanished without closing
        the socket: a half-open TCP connection, which would otherwise hold the call
        and a max_calls slot until the length limit. The reader only stamps
        ``_heard_at``; this task wakes about once per timeout, not per message.
        """
        server = self._svc.config.server
        quiet_s, limit_at = server.media_timeout_ms / 1000, self.t0 + server.max_call_duration_s
        self._heard_at = trio.current_time()  # setup (opening STT) may have left messages waiting unread
        while (now := trio.current_time()) < (end_at := min(self._heard_at + quiet_s, limit_at)):
            await trio.sleep_until(end_at)
        if now >= limit_at:
            self.end_reason = "call duration limit"
            log.warning("call=%s ended: server.max_call_duration_s (%gs) reached", self.call_sid,
                        server.max_call_duration_s)
        else:
            self.end_reason = f"no media for {server.media_timeout_ms} ms"
            log.warning("call=%s ended: no message from Twilio for %d ms (server.media_timeout_ms); "
                        "the peer is gone", self.call_sid, server.media_timeout_ms)
        self._nursery.cancel_scope.cancel()

    def _finish(self) -> None:
        now = trio.current_time()
        if hasattr(self, "fsm"):
            self._dispatch(fsm.Hangup(at=now))
        for reply in list(self._jobs):
            self._close_turn(reply, interrupted=True)
        record = {"call_sid": self.call_sid, "duration_ms": round((now - self.t0) * 1000, 1),
                  "end_reason": self.end_reason,
                  "turns": self._turns_taken, "states": self.states,
                  "tx_drops": getattr(getattr(self, "tx", None), "drops", 0),
                  "frames_sent": getattr(getattr(self, "tx", None), "frames_sent", 0),
                  "tx_lateness_ms": self.tx.lateness_summary() if hasattr(self, "tx") else {},
                  "speculation": dict(self.fsm.spec_counts) if hasattr(self, "fsm") else {},
                  "greeting": self._timelines[0].to_record(self.call_sid, 0, self.t0, {})}
        self._svc.sink.emit_call(record)
        for observer in self._svc.observers:
            observer(record | {"kind": "call"})
        log.info("call=%s ended after %.1fs: %s", self.call_sid, now - self.t0, self.end_reason)

    # -- inbound -----------------------------------------------------------

    def _on_media(self, payload: bytes, at: float) -> None:
        for fact in self.vad.feed(payload, at):
            if isinstance(fact, VoiceStarted):
                self._dispatch(fsm.SpeechStarted(at=fact.at))
            elif isinstance(fact, VoiceEnded):
                self._dispatch(fsm.SpeechEnded(at=fact.at))
        self.stt.push_audio(payload, at)

    def _on_mark(self, name: str) -> None:
        for job in self._jobs.values():
            if job.owns_mark(name):
                job.mark_echoed(name, trio.current_time())
                return

    # -- the FSM -----------------------------------------------------------

    def _dispatch(self, event: fsm.Event) -> None:
        """Feed one event to the FSM and carry out its actions (synchronously)."""
        if isinstance(event, fsm.SpeechStarted):
            self._results_seen.clear()
        elif isinstance(event, (fsm.Partial, fsm.Final)):
            name = "first_partial" if isinstance(event, fsm.Partial) else "final_text"
            if name not in self._results_seen:
                self._results_seen.add(name)
                self._results_at.append((name, event.at))
        before, spec_before = self.fsm.state, dict(self.fsm.spec_counts)
        actions = self.fsm.handle(event)
        self._note_speculation(spec_before)
        for state in self.fsm.path:
            self.states.append(state.name)
            log.info("call=%s %s->%s on %s +%dms", self.call_sid, before.name, state.name,
                     type(event).__name__, (event.at - self.t0) * 1000)
            before = state
        for action in actions:
            self._carry_out(action)
        if isinstance(event, fsm.PlaybackDone) and event.reply in self._jobs:
            self._close_turn(event.reply)
        self._rearm.set()

    def _note_speculation(self, before: dict[str, int]) -> None:
        for count, outcome in (("hits", "hit"), ("misses", "miss"), ("late", "late")):
            if self.fsm.spec_counts[count] > before[count]:
                self._facts(self.fsm.reply)["speculation"] = outcome

    def _carry_out(self, action: fsm.Action) -> None:
        if isinstance(action, fsm.PlayGreeting):
            self._play_greeting()
        elif isinstance(action, fsm.StartReply):
            self._start_reply(action)
        elif isinstance(action, fsm.AdoptDraft):
            self._adopt_draft(action)
        elif isinstance(action, fsm.BeginPlayback):
            self._facts(action.reply)["breath_ms"] = round(self.fsm.breath_s * 1000, 1)
            self._jobs[action.reply].begin.set()
        elif isinstance(action, fsm.StopPlayback):
            self.tx.clear(twilio.render_clear(self.stream_sid))
        elif isinstance(action, fsm.CancelReply):
            self._cancel_reply(action.reply, resumes_turn=action.resumes_turn)
        elif isinstance(action, fsm.TranscribeFallback):
            self._nursery.start_soon(self._transcribe_fallback, action)

    async def _run_timers(self) -> None:
        while True:
            self._rearm = trio.Event()
            with trio.move_on_at(self.fsm.next_deadline()):
                await self._rearm.wait()
                continue
            self._dispatch(fsm.Tick(at=trio.current_time()))

    # -- replies -------------------------------------------------------------

    def _new_job(self, reply: int, **stamps: str) -> ReplyJob:
        timeline = self._timelines.setdefault(reply, telemetry.TurnTimeline())
        cfg, cache = self._svc.config, self._svc.cache
        fillers = self.business.fillers
        filler = cache.get(self.voice, fillers[reply % len(fillers)]) if fillers else None
        job = ReplyJob(reply, tx=self.tx, stream_sid=self.stream_sid, emit=self._dispatch,
                       stamp=lambda name: timeline.stamp(name, trio.current_time()),
                       apology=cache.get(self.voice, self.business.apology), tts=self._svc.tts,
                       voice=self.voice, filler=filler if cfg.llm.filler_after_ms > 0 else None,
                       mark_timeout_s=cfg.audio.mark_timeout_ms / 1000, **stamps)
        self._jobs[reply] = job
        return job

    def _play_greeting(self) -> None:
        job = self._new_job(0, first_frame_stamp="greeting_started",
                            last_frame_stamp="greeting_last_frame_sent")
        greeting = self._svc.cache.get(self.voice, self.business.greeting)
        self._nursery.start_soon(lambda: job.run(canned=[greeting] if greeting else []))
        job.begin.set()

    def _start_reply(self, action: fsm.StartReply) -> None:
        job = self._new_job(action.reply)
        timeline = self._timelines[action.reply]
        messages = build_messages(self.business.system_prompt, self._recent_history(), action.text)
        think = chat_thinker(self._svc.chat, messages,
                             first_clause_min_chars=self._svc.config.llm.first_clause_min_chars,
                             stamp=lambda name: timeline.stamp(name, trio.current_time()))
        self._nursery.start_soon(lambda: job.run(think=think))
        if action.draft:
            job.draft = True  # think now; speak only if the turn ends on these words
            if self._svc.config.spec.synthesize_draft:
                job.gate.set()
        else:
            self._take_turn(action.reply, action.text, action.speech_start_at, action.speech_end_at)

    def _adopt_draft(self, action: fsm.AdoptDraft) -> None:
        job = self._jobs[action.reply]
        job.draft = False
        self._take_turn(action.reply, action.text, action.speech_start_at, action.speech_end_at)

    def _take_turn(self, reply: int, text: str, speech_start_at: float, speech_end_at: float) -> None:
        """Reply ``reply`` answers the caller's turn: telemetry, history, and let it speak."""
        timeline = self._timelines[reply]
        timeline.stamp("speech_start", speech_start_at)
        timeline.stamp("speech_end", speech_end_at)
        for name, at in self._results_at:
            if at >= speech_start_at:
                timeline.stamp(name, at)  # the first of each kind wins
        self._results_at.clear()
        self._turns_taken += 1
        self._facts(reply).update(turn=self._turns_taken, reply=reply,
                                  required_silence_ms=round(self.fsm.required_silence_s * 1000, 1))
        self.history.append(("user", text))
        self._user_text[reply] = text
        job = self._jobs[reply]
        job.filler_at = speech_end_at + self._svc.config.llm.filler_after_ms / 1000
        job.gate.set()
        if self.business.log_transcripts:
            log.info("call=%s turn=%d caller: %s", self.call_sid, reply, text)

    def _facts(self, reply: int) -> dict:
        return self._turn_facts.setdefault(reply, {})

    def _recent_history(self) -> list[tuple[str, str]]:
        return self.history[-2 * self._svc.config.llm.history_turns:]

    def _cancel_reply(self, reply: int, *, resumes_turn: bool = False) -> None:
        if reply in self._jobs:
            self._close_turn(reply, interrupted=True, resumes_turn=resumes_turn)

    def _close_turn(self, reply: int, *, interrupted: bool = False, resumes_turn: bool = False) -> None:
        """Record what the caller actually heard and emit the turn's telemetry."""
        job = self._jobs.pop(reply)
        job.scope.cancel()
        if interrupted:  # marks are the proof of playback; the clock covers a Twilio that never echoes
            lead_s = self.tx.lead_frames * FRAME_S + _PLAYOUT_MARGIN_S
            said = " ".join(job.heard_by(trio.current_time(), playout_margin_s=lead_s))
        else:
            said = " ".join(job.spoken)
        if reply > 0 and not job.draft:
            if resumes_turn and self.history and self.history[-1] == ("user", self._user_text.get(reply)):
                self.history.pop()  # the FSM puts these words back into the turn still going on
            elif said:
                self.history.append(("assistant", said))
            facts = self._turn_facts.pop(reply, {})
            record = self._timelines[reply].to_record(
                self.call_sid, facts.pop("turn", 0), self.t0,
                {"interrupted": interrupted, "failed": job.failed, "reply_text": " ".join(job.spoken),
                 "caller_text": self._user_text.get(reply, "") if self.business.log_transcripts else None,
                 "speculation": "none", **facts})
            self._svc.sink.emit_turn(record)
            for observer in self._svc.observers:
                observer(record | {"kind": "turn", "caller_text": self._user_text.get(reply, ""),
                                   "reply_text": " ".join(job.spoken)})

    async def _transcribe_fallback(self, action: fsm.TranscribeFallback) -> None:
        audio = self.stt.audio_between(action.speech_start_at - _FALLBACK_MARGIN_S,
                                       action.speech_end_at + _FALLBACK_MARGIN_S)
        try:
            text = await self.stt.recognize(audio)
        except UpstreamUnavailable as exc:
            log.warning("call=%s fallback transcription failed: %s", self.call_sid, exc)
            text = ""
        self._dispatch(fsm.Final(at=trio.current_time(), text=text, audio_end_at=action.speech_end_at))

    # -- telemetry -----------------------------------------------------------

    async def _report_stats(self) -> None:
        interval = self._svc.config.server.stats_interval_s
        if interval <= 0:
            return
        sent = 0
        while True:
            await trio.sleep(interval)
            fps = (self.tx.frames_sent - sent) / interval
            sent = self.tx.frames_sent
            stages = self._timelines[max(self._timelines)].stages()
            log.info("call=%s %s", self.call_sid, telemetry.format_stats_line(
                fps=fps, queue=self.tx.queued_frames, drops=self.tx.drops,
                stt_partial_s=_s(stages.get("stt_partial")), stt_final_s=_s(stages.get("stt_final")),
                ai_s=_s(stages.get("ai_ttft")), tts_s=_s(stages.get("tts_ttfb")), total_s=_s(stages.get("v2v"))))


def _s(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000
