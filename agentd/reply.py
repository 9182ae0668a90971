"""One spoken reply: LLM text -> speakable pieces -> speech -> the TX queue.

A reply is three tasks in one cancel scope, so a barge-in (``CancelReply``)
abandons all of it at once:

    think: LLM deltas -> SentenceSplitter -> sentences channel
    voice: sentences -> TTS -> pieces channel        (piece k+1 synthesizes while k plays)
    play:  waits for BeginPlayback, then pieces -> TX frames + one mark per piece

The FSM hears ``ReplyAudioReady`` when the first piece exists (even an empty
reply reports it, so the call never waits forever) and ``PlaybackDone`` when
the last mark comes back. Marks echoed after a ``clear`` do not count as heard
(Twilio echoes pending marks on ``clear``): the TX epoch tells them apart.
Failures degrade, never hang: an LLM or TTS error before anything was said
plays the business's cached apology.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

from agentd import fsm
from agentd.codecs import mulaw, twilio
from agentd.errors import UpstreamUnavailable
from agentd.text import SentenceSplitter
from agentd.tts_google import Synthesizer, Voice
from agentd.tx import TxQueue

log = logging.getLogger(__name__)

_PIPE_DEPTH = 16  # sentences / pieces in flight; a reply is a handful of sentences


@dataclass(frozen=True, slots=True)
class Piece:
    """A speakable piece and its audio (160-byte mu-law frames)."""

    text: str
    frames: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class _Sentence:
    text: str
    cached: tuple[bytes, ...] | None = None  # pre-synthesized audio (apology)


class ReplyJob:
    """Reply ``reply_id`` of a call; ``run()`` inside the call's nursery."""

    def __init__(self, reply_id: int, *, tx: TxQueue, stream_sid: str,
                 emit: Callable[[fsm.Event], None], stamp: Callable[[str], None],
                 apology: Piece | None, tts: Synthesizer | None = None, voice: Voice | None = None,
                 first_frame_stamp: str = "first_reply_frame_sent", last_frame_stamp: str | None = None,
                 filler: Piece | None = None, mark_timeout_s: float = 3.0):
        self.id = reply_id
        self.scope = trio.CancelScope()
        self.begin = trio.Event()
        self.gate = trio.Event()  # synthesis may start (held shut for an unadopted draft)
        self.draft = False
        self.spoken: list[str] = []  # pieces queued to Twilio, in order
        self.failed: str | None = None
        self._tx = tx
        self._sid = stream_sid
        self._emit = emit
        self._stamp = stamp
        self._apology = apology
        self._tts = tts
        self._voice_params = voice
        self._first_frame_stamp = first_frame_stamp
        self._last_frame_stamp = last_frame_stamp
        self._filler = filler
        self.filler_at = float("inf")  # when to say the filler if no audio is ready (call clock)
        self._filler_scope = trio.CancelScope()
        self._mark_timeout_s = mark_timeout_s
        self._done = trio.Event()
        self._marks: dict[str, str] = {}
        self._sent_at: dict[str, float] = {}  # when each piece's last frame left for Twilio
        self._echoed = 0
        self._heard_marks: set[str] = set()
        self._epoch = -1
        self._all_queued = False
        self._ready_sent = False
        self._answered = False  # audio of the reply itself (not the filler) is on its way
        self._done_sent = False

    # -- the three tasks ---------------------------------------------------

    async def run(self, *, think: Callable | None = None, canned: Sequence[Piece] = ()) -> None:
        """Produce (``think`` streams sentences; ``canned`` is ready audio) and play."""
        sentences_in, sentences_out = trio.open_memory_channel[_Sentence](_PIPE_DEPTH)
        pieces_in, pieces_out = trio.open_memory_channel[Piece](_PIPE_DEPTH)
        with self.scope:
            async with trio.open_nursery() as nursery:
                if think is not None:
                    nursery.start_soon(self._guarded_think, think, sentences_in)
                    if self._filler is not None:
                        nursery.start_soon(self._offer_filler, pieces_in.clone())
                    nursery.start_soon(self._voice, sentences_out, pieces_in)
                else:
                    nursery.start_soon(self._feed_canned, canned, pieces_in)
                await self.begin.wait()
                await self._play(pieces_out)

    async def _guarded_think(self, think: Callable, out: trio.MemorySendChannel) -> None:
        async with out:
            said_anything = False

            async def say(text: str) -> None:
                nonlocal said_anything
                said_anything = True
                await out.send(_Sentence(text))

            try:
                await think(say)
            except UpstreamUnavailable as exc:
                self.failed = str(exc)
                log.warning("reply %d: LLM failed: %s", self.id, exc)
                if not said_anything and self._apology is not None:
                    await out.send(_Sentence(self._apology.text, self._apology.frames))

    async def _voice(self, sentences: trio.MemoryReceiveChannel, out: trio.MemorySendChannel) -> None:
        async with out:
            await self.gate.wait()
            async for sentence in sentences:
                await self._speak(sentence, out)
        self._ready()  # nothing to say still lets the call move on

    async def _offer_filler(self, out: trio.MemorySendChannel) -> None:
        """If the reply has no audio by ``filler_at`` (set from the end of the caller's
        speech), say a filler
        (from memory) so the caller is never left in silence; the reply follows it."""
        with self._filler_scope:
            async with out:
                await self.gate.wait()
                await trio.sleep_until(self.filler_at)
                if not self._ready_sent:
                    out.send_nowait(self._filler)  # nothing else is queued yet
                    self._ready()

    async def _feed_canned(self, canned: Sequence[Piece], out: trio.MemorySendChannel) -> None:
        async with out:
            for piece in canned:
                await out.send(piece)
        self._ready()

    def _ready(self) -> None:
        if not self._ready_sent:
            self._ready_sent = True
            self._filler_scope.cancel()
            self._emit(fsm.ReplyAudioReady(at=trio.current_time(), reply=self.id))

    # -- synthesis ---------------------------------------------------------

    async def _send(self, out: trio.MemorySendChannel, piece: Piece) -> None:
        self._answered = True
        await out.send(piece)
        self._ready()

    async def _speak(self, sentence: _Sentence, out: trio.MemorySendChannel) -> None:
        """Synthesize one sentence into pieces; a failure says the apology instead
        (if nothing was said yet) or skips the sentence."""
        if sentence.cached is not None:
            await self._send(out, Piece(sentence.text, sentence.cached))
            return
        assert self._tts is not None and self._voice_params is not None
        self._stamp("tts_start")
        try:
            if hasattr(self._tts, "synthesize_into"):
                await self._speak_streamed(sentence.text, out)
            else:
                audio = await self._tts.synthesize(sentence.text, self._voice_params)
                self._stamp("tts_first_audio")
                await self._send(out, Piece(sentence.text, tuple(mulaw.split_frames(audio))))
        except UpstreamUnavailable as exc:
            log.warning("reply %d: TTS failed: %s", self.id, exc)
            self.failed = str(exc)
            if not self._answered and self._apology is not None:  # a filler is no answer: apologize
                await self._send(out, self._apology)

    async def _speak_streamed(self, text: str, out: trio.MemorySendChannel) -> None:
        """Play whole frames as chunks arrive; the sentence's last piece carries its text."""
        pending = bytearray()

        async def sink(chunk: bytes) -> None:
            self._stamp("tts_first_audio")
            pending.extend(chunk)
            whole = len(pending) - len(pending) % mulaw.FRAME_BYTES
            if whole:
                frames = tuple(mulaw.split_frames(bytes(pending[:whole])))
                del pending[:whole]
                await self._send(out, Piece("", frames))

        await self._tts.synthesize_into(text, self._voice_params, sink)
        await self._send(out, Piece(text, tuple(mulaw.split_frames(bytes(pending)))))

    # -- playback ----------------------------------------------------------

    async def _play(self, pieces: trio.MemoryReceiveChannel) -> None:
        self._epoch = self._tx.epoch
        first = True
        async for piece in pieces:
            if first:
                self._tx.put_hook(lambda: self._stamp(self._first_frame_stamp), epoch=self._epoch)
                first = False
            await self._tx.put_frames(piece.frames, epoch=self._epoch)
            name = f"r{self.id}-{len(self._marks) + 1}"
            self._marks[name] = piece.text
            self._tx.put_hook(lambda name=name: self._sent_at.__setitem__(name, trio.current_time()),
                              epoch=self._epoch)
            if piece.text:
                self.spoken.append(piece.text)
            self._tx.put_control(twilio.render_mark(self._sid, name), epoch=self._epoch)
        if self._last_frame_stamp is not None:
            self._tx.put_hook(lambda: self._stamp(self._last_frame_stamp), epoch=self._epoch)
        self._all_queued = True
        self._check_done(trio.current_time())
        # Twilio echoes a mark when playback reaches it; one that never comes back must
        # not leave the call speaking forever.
        with trio.move_on_after(self._tx.queued_frames * 0.02 + self._mark_timeout_s):
            await self._done.wait()
        if not self._done.is_set():
            log.warning("reply %d: %d marks never came back; assuming playback ended",
                        self.id, len(self._marks) - self._echoed)
            self._finish(trio.current_time())

    def heard_by(self, now: float, *, playout_margin_s: float) -> list[str]:
        """What the caller heard of this reply if it is cut off at ``now``: pieces whose
        mark came back, plus -- for a Twilio that does not echo marks -- pieces whose
        last frame left more than ``playout_margin_s`` (Twilio's buffer) before ``now``."""
        heard = set(self._heard_marks)
        heard.update(n for n, at in self._sent_at.items() if at <= now - playout_margin_s)
        return [text for name, text in self._marks.items() if name in heard and text]

    def owns_mark(self, name: str) -> bool:
        return name in self._marks

    def mark_echoed(self, name: str, at: float) -> None:
        """Twilio echoed one of our marks: heard, unless a clear intervened."""
        if self._tx.epoch != self._epoch:
            return  # echoed by our own `clear`: the caller never heard it
        self._echoed += 1
        self._heard_marks.add(name)
        self._check_done(at)

    def _check_done(self, at: float) -> None:
        if self._all_queued and self._echoed == len(self._marks):
            self._finish(at)

    def _finish(self, at: float) -> None:
        if not self._done_sent:
            self._done_sent = True
            self._done.set()
            self._emit(fsm.PlaybackDone(at=at, reply=self.id))


def chat_thinker(chat, messages: Sequence[Mapping[str, str]], *, first_clause_min_chars: int,
                 stamp: Callable[[str], None]):
    """A ``think`` function: stream the LLM, cut it into speakable pieces, say each."""

    async def think(say) -> None:
        splitter = SentenceSplitter(first_clause_min_chars=first_clause_min_chars)
        stamp("ai_start")
        async with chat.stream(messages) as deltas:
            async for delta in deltas:
                stamp("ai_first_token")
                for sentence in splitter.push(delta):
                    stamp("ai_first_sentence")
                    await say(sentence)
        for sentence in splitter.flush():
            stamp("ai_first_sentence")
            await say(sentence)

    return think
