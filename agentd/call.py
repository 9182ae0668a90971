"""One phone call: the Trio glue around the sans-I/O ``CallFSM``.

A ``Call`` is built once Twilio's ``start`` is in hand (the server waits for
it), so it is whole from birth. Every task of a call lives in the call's one
nursery (TX pacer, recognizer, timers, line watchdog, stats, replies, fallback
transcriptions); when the caller hangs up, the socket drops or the agent ends
the call (the line went quiet, the call reached its length limit, or
``wind_down`` / ``end_now``), the nursery is cancelled and everything ends
with it. The call record says which (``end_reason``).

Events reach the FSM through ``_dispatch``, a synchronous function called by
whichever task learnt the fact (reader, recognizer, reply, timer). Trio runs
one task at a time, so the FSM needs no lock, and actions are carried out
before the next event is taken. The driver decides nothing the FSM could: it
carries out actions and records the facts they carry.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import trio
import trio_websocket

from agentd import call_tools, fsm, telemetry
from agentd.audio_cache import AudioCache
from agentd.adapters.business_tools import BusinessTools
from agentd.codecs import twilio
from agentd.config import Business, Config
from agentd.errors import CallProtocolError, UpstreamUnavailable
from agentd.adapters.grpc_bridge import Channel
from agentd.history import History
from agentd.adapters.llm_openai import build_messages
from agentd.media_socket import MediaSocket
from agentd.metronome import Metronome
from agentd.reply import Outlet, Piece, ReplyJob, Voicing, chat_thinker
from agentd.adapters.stt_google import SttSettings, StreamingRecognizer
from agentd.tool_round import run_tool_calls
from agentd.adapters.tts_google import Synthesizer, Voice
from agentd.tx import FRAME_S, TxQueue
from agentd.vad import VadSettings, VoiceActivity, VoiceEnded, VoiceStarted
from agentd.webhook import CallOutcomes

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
    # Business tools, on an HTTP client of their own so slow tools never hold the LLM's connections.
    tools: BusinessTools
    observers: list[Callable[[dict], None]] = field(default_factory=list)
    # What each call decided for after its stream (a transfer), read by POST server.after_path.
    outcomes: CallOutcomes = field(default_factory=CallOutcomes)

    def voice(self, business: Business) -> Voice:
        return Voice(language=business.language, name=business.voice,
                     speaking_rate=self.config.tts.speaking_rate)

    def voicing(self, business: Business) -> Voicing:
        """``tts.streaming`` picks the TTS that hands over audio chunk by chunk."""
        voice = self.voice(business)
        if self.config.tts.streaming:
            return Voicing(voice=voice, chunked=self.tts)
        return Voicing(voice=voice, whole=self.tts)


@dataclass
class _Turn:
    """What the call records about one reply while it lives."""

    job: ReplyJob
    timeline: telemetry.TurnTimeline
    draft: bool = False  # speculative: not (yet) the answer to a turn
    caller_text: str = ""
    facts: dict = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    taken: trio.Event = field(default_factory=trio.Event)  # the reply answers the caller's turn (a draft: once adopted)
    tool_messages: list[dict] = field(default_factory=list)  # tool rounds, in OpenAI format, for the history
    said_before_tools: int = 0  # pieces of the reply the tool rounds' messages already carry


class InboundParser:
    """Parses one socket's Twilio messages: an event type Twilio added after us is
    skipped, not fatal, and logged once per socket -- one line per message would let
    the peer write to the log at its own rate."""

    def __init__(self, max_bytes: int, call_sid: str = "?") -> None:
        self.call_sid = call_sid  # "?" until start: the peer is not yet known to be Twilio
        self._max_bytes = max_bytes
        self._warned = False

    def parse(self, message: str | bytes) -> twilio.InboundEvent | None:
        """The event, or None for an unknown one. Raises TwilioCodecError (a CallProtocolError)."""
        try:
            return twilio.parse_inbound(message, max_bytes=self._max_bytes)
        except twilio.UnknownEventError as exc:
            if not self._warned:
                self._warned = True
                log.warning("call=%s skipping unknown Twilio event: %s", self.call_sid, exc)
            return None


class Call:
    """One Twilio Media Stream, from ``start`` to hang-up."""

    def __init__(self, ws: MediaSocket, services: Services, start: twilio.Start, *,
                 t0: float | None = None):
        cfg = services.config
        self._ws = ws
        self._svc = services
        self._inbound = InboundParser(cfg.server.max_message_bytes, start.call_sid)
        self.t0 = trio.current_time() if t0 is None else t0  # when the socket opened
        self.call_sid, self.stream_sid = start.call_sid, start.stream_sid
        self.business = cfg.business(start.parameter("business"))
        self.voice = services.voice(self.business)
        self._tools = call_tools.tools_for(self.business)  # offered to the model with every reply
        self.states: list[str] = []
        self.history = History()
        self.fsm = fsm.CallFSM(fsm.TurnSettings.from_config(cfg), keypad=_keypad(self.business),
                               reprompt=bool(self.business.reprompt))
        self.vad = VoiceActivity(VadSettings.from_config(cfg))
        self.stt = StreamingRecognizer(services.stt_channel, SttSettings.from_config(cfg, self.business.language),
                                       self._dispatch, is_quiet=lambda: not self.vad.speaking)
        self.tx = TxQueue(ws.send_message, lambda f: twilio.render_media(self.stream_sid, f),
                          metronome=services.metronome, capacity_frames=cfg.audio.tx_queue_frames,
                          lead_frames=cfg.audio.tx_lead_frames, frames_per_message=cfg.audio.tx_frames_per_message)
        self._greeting = telemetry.TurnTimeline()
        self._greeting.stamp("ws_connected", self.t0)
        self._latest = self._greeting  # the newest turn's timeline, for the stats line
        self.stt.on_stream_open = lambda at: self._greeting.stamp("stt_stream_opened", at)
        # Transcript results arrive between turns too (a late final for the last turn's audio, noise):
        # the first partial and the first final after each start of speech, and when each came.
        # A turn takes the first of each that came after its speech began.
        self._results_at: list[tuple[str, float]] = []
        self._results_seen: set[str] = set()
        self._turns: dict[int, _Turn] = {}
        self._turns_taken = 0
        self._speculation = {"drafts": 0, "hits": 0, "misses": 0, "late": 0}
        self._rearm = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._scope = trio.CancelScope()  # the whole call: end_now cancels it
        # Why the call ended, for its record; stays "aborted" on an internal error or a daemon shutdown.
        self.end_reason = "aborted"
        self._heard_at = self.t0  # when the peer last sent anything: what the line watchdog checks
        log.info("call=%s start business=%s", self.call_sid, self.business.name)

    # -- lifecycle ---------------------------------------------------------

    async def run(self) -> str:
        """Serve the call until it ends; returns the reason for the close frame.

        The caller ends it with ``stop`` or by closing the socket (reason "bye");
        the agent ends it when nothing has come in for ``server.media_timeout_ms``,
        at ``server.max_call_duration_s``, or by ``wind_down`` / ``end_now``
        (the reason says which). Raises CallProtocolError.
        """
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(self.tx.run)
                    if self._svc.config.stt.streaming_enabled:
                        await nursery.start(self.stt.run)
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

    def wind_down(self, reason: str) -> None:
        """End the call politely: stop what the agent is doing, say the business's
        goodbye, then hang up; ``reason`` becomes the record's ``end_reason``.
        Callable from any task at any time; the caller cannot interrupt the goodbye."""
        if self._nursery is None:  # not running yet: there is nothing to stop and nowhere to play
            self.end_now(reason)
            return
        self._dispatch(fsm.WindDown(at=trio.current_time(), reason=reason))

    def end_now(self, reason: str) -> None:
        """End the call at once; the record is still written, with ``reason``."""
        self.end_reason = reason
        self._scope.cancel()

    async def _read_until_stop(self) -> str:
        """Carry inbound messages into the call; returns how the caller ended it."""
        while True:
            try:
                message = await self._ws.get_message()
            except trio_websocket.ConnectionClosed:
                return "socket closed"
            # 50 messages a second: the watchdog only needs this stamp, never a scope or a task.
            self._heard_at = at = trio.current_time()
            event = self._inbound.parse(message)
            if isinstance(event, twilio.Media):
                self._on_media(event.payload, at)
            elif isinstance(event, twilio.Mark):
                self._on_mark(event.name)
            elif isinstance(event, twilio.Dtmf):
                self._dispatch(fsm.KeyPressed(at=at, digit=event.digit))
            elif isinstance(event, twilio.Stop):
                return "stop"
            elif isinstance(event, (twilio.Start, twilio.Connected)):
                raise CallProtocolError(f"unexpected {type(event).__name__.lower()} mid-call")

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
        while trio.current_time() < (end_at := min(self._heard_at + quiet_s, limit_at)):
            await trio.sleep_until(end_at)
            if trio.current_time() >= limit_at:
                log.warning("call=%s ending: server.max_call_duration_s (%gs) reached", self.call_sid,
                            server.max_call_duration_s)
                self.wind_down("call duration limit")  # the goodbye plays before the cut (CLOSING ends it)
                limit_at = float("inf")  # from here only a vanished peer is this task's business
        log.warning("call=%s ended: no message from Twilio for %d ms (server.media_timeout_ms); "
                    "the peer is gone", self.call_sid, server.media_timeout_ms)
        self.end_now(f"no media for {server.media_timeout_ms} ms")

    def _finish(self) -> None:
        now = trio.current_time()
        self._dispatch(fsm.Hangup(at=now))
        for reply in list(self._turns):
            self._close_turn(reply, interrupted=True)
        record = {"call_sid": self.call_sid, "business": self.business.name,
                  "duration_ms": round((now - self.t0) * 1000, 1), "end_reason": self.end_reason,
                  "turns": self._turns_taken, "states": self.states,
                  "tx_drops": self.tx.drops, "frames_sent": self.tx.frames_sent,
                  "tx_lateness_ms": self.tx.lateness_summary(), "speculation": dict(self._speculation),
                  "greeting": self._greeting.to_record(self.call_sid, 0, self.t0, {})}
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
        for turn in self._turns.values():
            if turn.job.owns_mark(name):
                turn.job.mark_echoed(name, trio.current_time())
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
        before = self.fsm.state
        actions = self.fsm.handle(event)
        for state in self.fsm.path:
            self.states.append(state.name)
            log.info("call=%s %s->%s on %s +%dms", self.call_sid, before.name, state.name,
                     type(event).__name__, (event.at - self.t0) * 1000)
            before = state
        for action in actions:
            self._carry_out(action)
        self._rearm.set()

    def _carry_out(self, action: fsm.Action) -> None:
        handler = _ACTIONS[type(action)]
        handler(self, action)

    async def _run_timers(self) -> None:
        while True:
            self._rearm = trio.Event()
            with trio.move_on_at(self.fsm.next_deadline()):
                await self._rearm.wait()
                continue
            self._dispatch(fsm.Tick(at=trio.current_time()))

    # -- actions -------------------------------------------------------------

    def _new_turn(self, reply: int, **stamps: str | None) -> _Turn:
        timeline = telemetry.TurnTimeline() if reply != 0 else self._greeting
        if reply > 0:
            self._latest = timeline
        fillers = self.business.fillers
        filler = self._svc.cache.get(self.voice, fillers[reply % len(fillers)]) if fillers else None
        outlet = Outlet(tx=self.tx, stream_sid=self.stream_sid, emit=self._dispatch,
                        stamp=lambda name: timeline.stamp(name, trio.current_time()))
        job = ReplyJob(reply, outlet, apology=self._svc.cache.get(self.voice, self.business.apology),
                       filler=filler, voicing=self._svc.voicing(self.business),
                       stamps=(stamps.get("first", "first_reply_frame_sent"), stamps.get("last")))
        self._turns[reply] = turn = _Turn(job=job, timeline=timeline)
        return turn

    def _play_canned(self, reply: int, text: str, *, first: str, last: str | None) -> _Turn:
        turn = self._new_turn(reply, first=first, last=last)
        piece: Piece | None = self._svc.cache.get(self.voice, text) if text else None
        self._nursery.start_soon(lambda: turn.job.run(canned=[piece] if piece else []))
        turn.job.release()
        return turn

    def _play_greeting(self, action: fsm.PlayGreeting) -> None:
        self._play_canned(0, self.business.greeting, first="greeting_started", last="greeting_last_frame_sent")

    def _play_goodbye(self, action: fsm.PlayGoodbye) -> None:
        """The closing line (``goodbye`` or ``handoff``), recorded as a turn the agent took on its own."""
        self._say_own_line(fsm.GOODBYE, action.line)

    def _play_line(self, action: fsm.PlayLine) -> None:
        """A line the agent says on its own (``reprompt``), from the cache, as a turn of its own."""
        self._say_own_line(action.reply, action.line, reply=action.reply)

    def _say_own_line(self, number: int, line: str, **facts: int) -> None:
        turn = self._play_canned(number, getattr(self.business, line), first="first_reply_frame_sent", last=None)
        turn.facts.update(turn=self._turns_taken, canned=line, **facts)

    def _start_reply(self, action: fsm.StartReply) -> None:
        turn = self._new_turn(action.reply)
        messages = build_messages(self.business.system_prompt, self._recent_history(), action.text)
        think = chat_thinker(self._svc.chat, messages,
                             first_clause_min_chars=self._svc.config.llm.first_clause_min_chars,
                             stamp=lambda name: turn.timeline.stamp(name, trio.current_time()),
                             tools=self._tools,
                             on_calls=functools.partial(self._tool_round, action.reply, turn),
                             on_usage=functools.partial(_add_usage, turn.facts))
        self._nursery.start_soon(lambda: turn.job.run(think=think))
        if action.draft:
            self._speculation["drafts"] += 1
            turn.draft = True  # think now; speak only if the turn ends on these words
            if action.voice_draft:
                turn.job.voice_now()
        else:
            self._take_turn(action.reply, action)

    def _adopt_draft(self, action: fsm.AdoptDraft) -> None:
        self._turns[action.reply].draft = False
        self._take_turn(action.reply, action)

    def _take_turn(self, reply: int, action: fsm.StartReply | fsm.AdoptDraft) -> None:
        """Reply ``reply`` answers the caller's turn: telemetry, history, and let it speak."""
        turn = self._turns[reply]
        turn.timeline.stamp("turn_committed", trio.current_time())
        turn.timeline.stamp("speech_start", action.speech_start_at)
        turn.timeline.stamp("speech_end", action.speech_end_at)
        for name, at in self._results_at:
            if at >= action.speech_start_at:
                turn.timeline.stamp(name, at)  # the first of each kind wins
        self._results_at.clear()
        self._turns_taken += 1
        if action.speculation != "none":
            self._speculation[{"hit": "hits", "miss": "misses", "late": "late"}[action.speculation]] += 1
        turn.facts.update(turn=self._turns_taken, reply=reply, speculation=action.speculation,
                          required_silence_ms=round(action.required_silence_s * 1000, 1))
        turn.fallbacks.extend(action.fallbacks)
        turn.caller_text = action.text
        turn.taken.set()
        self.history = self.history.said_by_caller(action.text)
        turn.job.voice_now()
        if self.business.log_transcripts:
            log.info("call=%s turn=%d caller: %s", self.call_sid, reply, action.text)

    async def _tool_round(self, reply: int, turn: _Turn, text: str, calls: list, sentences: int) -> list | None:
        """Carry out the model's tool calls for reply ``reply``, made after ``sentences`` sentences
        (``text``); the messages to ask again with, or None.

        The round's messages join the history when the reply closes; an ending
        (end_call, transfer_call) goes to the FSM, which decides when it happens.
        """
        await turn.taken.wait()  # a draft runs no tools: they may act on the business's systems
        outcome = await run_tool_calls(self.business, text, calls, self._svc.tools)
        turn.tool_messages.extend(outcome.messages)
        # The history's assistant message with the calls carries those sentences (and a filler before them).
        turn.said_before_tools = sentences + (1 if sentences and turn.job.filler_said else 0)
        ending = outcome.ending
        if isinstance(ending, call_tools.Transfer | call_tools.EndCall):
            number = ending.number if isinstance(ending, call_tools.Transfer) else ""
            self._dispatch(fsm.AgentEnds(at=trio.current_time(), reply=reply, transfer_to=number,
                                         spoke=bool(text.strip())))
        return list(outcome.messages) if outcome.ask_again else None

    def _recent_history(self):
        return self.history.recent(self._svc.config.llm.history_turns)

    def _begin_playback(self, action: fsm.BeginPlayback) -> None:
        turn = self._turns[action.reply]
        turn.facts["breath_ms"] = round(action.breath_s * 1000, 1)
        turn.job.release()

    def _say_filler(self, action: fsm.SayFiller) -> None:
        if action.reply in self._turns:
            self._turns[action.reply].job.say_filler()

    def _stop_playback(self, action: fsm.StopPlayback) -> None:
        self.tx.clear(twilio.render_clear(self.stream_sid))

    def _cancel_reply(self, action: fsm.CancelReply) -> None:
        if action.reply in self._turns:
            self._close_turn(action.reply, interrupted=True, resumes_turn=action.resumes_turn)

    def _revise_turn(self, action: fsm.ReviseTurn) -> None:
        """The final for words answered early: history (and the turn record) say what was said."""
        self.history = self.history.turn_revised(action.was, action.text)
        turn = self._turns.get(action.reply)
        if turn is not None and turn.caller_text == action.was:
            turn.caller_text = action.text

    def _reply_finished(self, action: fsm.ReplyFinished) -> None:
        if action.marks_lost:
            log.warning("call=%s reply %d: marks never came back; assuming playback ended",
                        self.call_sid, action.reply)
        if action.reply in self._turns:
            if action.marks_lost:
                self._turns[action.reply].fallbacks.append("mark_timeout")
            self._close_turn(action.reply)

    def _transcribe(self, action: fsm.TranscribeFallback) -> None:
        self._nursery.start_soon(self._transcribe_fallback, action)

    def _end_call(self, action: fsm.EndCall) -> None:
        if action.transfer_to:  # before the stream ends: Twilio asks server.after_path right after
            self._svc.outcomes.record_transfer(self.call_sid, action.transfer_to)
        self.end_now(action.reason)

    def _close_turn(self, reply: int, *, interrupted: bool = False, resumes_turn: bool = False) -> None:
        """Record what the caller actually heard and emit the turn's telemetry."""
        turn = self._turns.pop(reply)
        job = turn.job
        job.scope.cancel()
        if interrupted:  # marks are the proof of playback; the clock covers a Twilio that never echoes
            lead_s = self.tx.ahead_frames * FRAME_S + _PLAYOUT_MARGIN_S
            heard = job.heard_by(trio.current_time(), playout_margin_s=lead_s)
        else:
            heard = job.spoken
        if reply == 0 or turn.draft:
            return
        if resumes_turn:
            self.history = self.history.turn_resumed(turn.caller_text)  # the words rejoin the turn going on
        else:  # a tool round's messages already carry the words said before it
            self.history = self.history.with_messages(turn.tool_messages)
            self.history = self.history.heard_by_caller(" ".join(heard[turn.said_before_tools:]))
        self._emit_turn(turn, interrupted)

    def _emit_turn(self, turn: _Turn, interrupted: bool) -> None:
        job, facts = turn.job, dict(turn.facts)
        fallbacks = [*turn.fallbacks, *(["filler"] if job.filler_said else []),
                     *(["apology"] if job.apologized else [])]
        record = turn.timeline.to_record(
            self.call_sid, facts.pop("turn", 0), self.t0,
            {"business": self.business.name, "interrupted": interrupted, "failed": job.failed,
             "reply_text": " ".join(job.spoken),
             "caller_text": turn.caller_text if self.business.log_transcripts else None,
             "fallbacks": fallbacks, "speculation": "none", "canned": None, **facts})
        self._svc.sink.emit_turn(record)
        for observer in self._svc.observers:
            observer(record | {"kind": "turn", "caller_text": turn.caller_text,
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
            stages = self._latest.stages()
            log.info("call=%s %s", self.call_sid, telemetry.format_stats_line(
                fps=fps, queue=self.tx.queued_frames, drops=self.tx.drops,
                stt_partial_s=_s(stages.get("stt_partial")), stt_final_s=_s(stages.get("stt_final")),
                ai_s=_s(stages.get("ai_ttft")), tts_s=_s(stages.get("tts_ttfb")), total_s=_s(stages.get("v2v"))))


def _s(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


# What each action does: the driver's whole repertoire, one method per action type.
_ACTIONS: dict[type, Callable[[Call, fsm.Action], None]] = {
    fsm.PlayGreeting: Call._play_greeting,
    fsm.StartReply: Call._start_reply,
    fsm.AdoptDraft: Call._adopt_draft,
    fsm.BeginPlayback: Call._begin_playback,
    fsm.SayFiller: Call._say_filler,
    fsm.StopPlayback: Call._stop_playback,
    fsm.CancelReply: Call._cancel_reply,
    fsm.ReviseTurn: Call._revise_turn,
    fsm.ReplyFinished: Call._reply_finished,
    fsm.TranscribeFallback: Call._transcribe,
    fsm.PlayGoodbye: Call._play_goodbye,
    fsm.PlayLine: Call._play_line,
    fsm.EndCall: Call._end_call,
}


def _keypad(business: Business) -> dict[str, fsm.Ending]:
    """The business's single-digit actions, as the FSM's endings."""
    keypad = {}
    for digit in business.dtmf:
        action = call_tools.dtmf_decision(business, digit)
        if isinstance(action, call_tools.Transfer):
            keypad[digit] = fsm.Ending(fsm.TRANSFERRED, "handoff", action.number)
        elif isinstance(action, call_tools.EndCall):
            keypad[digit] = fsm.Ending(fsm.HUNG_UP)
    return keypad


def _add_usage(facts: dict, usage: Mapping[str, int]) -> None:
    """Sum the server's token counts over the turn's requests (tool rounds ask again) into its record."""
    total = facts.setdefault("llm_usage", {})
    for name, count in usage.items():
        if isinstance(count, int):
            total[name] = total.get(name, 0) + count
