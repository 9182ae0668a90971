"""One spoken reply: LLM text -> speakable pieces -> speech -> the TX queue.

A reply is three tasks in one cancel scope, so a barge-in (``CancelReply``)
abandons all of it at once:

    think: LLM deltas -> SentenceSplitter -> sentences channel
    voice: sentences -> TTS -> pieces channel        (piece k+1 synthesizes while k plays)
    play:  waits for ``release()``, then pieces -> TX frames + one mark per piece

The job decides nothing about time: the FSM says when synthesis may start
(``voice_now``), when a filler is due (``say_filler``) and when to play
(``release``), and it times the wait for the last mark. The job reports
``ReplyAudioReady`` when the first piece (or the filler) exists -- even an
empty reply reports it, so the call never waits forever -- ``ReplyQueued``
once every piece is queued, and ``PlaybackDone`` when the last mark comes
back. Marks echoed after a ``clear`` do not count as heard (Twilio echoes
pending marks on ``clear``): the TX epoch tells them apart. Failures degrade,
never hang: an LLM or TTS error before anything was said plays the business's
cached apology.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from agentd import fsm
from agentd.codecs import mulaw, twilio
from agentd.errors import UpstreamUnavailable
from agentd.text import SentenceSplitter
from agentd.adapters.tts_google import Synthesizer, Voice
from agentd.tx import FRAME_S, TxQueue

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


# (text before the calls, the calls, sentences said so far) -> messages to ask the model again with, or None
ToolRoundHandler = Callable[[str, list, int], Awaitable[list | None]]


class ChunkedSynthesizer(Protocol):
    """A TTS that hands over audio while the sentence is still being synthesized."""

    async def synthesize_into(self, text: str, voice: Voice,
                              sink: Callable[[bytes], Awaitable[None]]) -> None: ...


@dataclass(frozen=True, slots=True)
class Voicing:
    """How a reply's sentences become audio: whole sentences, or chunks as they come."""

    voice: Voice
    whole: Synthesizer | None = None  # exactly one of these two
    chunked: ChunkedSynthesizer | None = None

    def __post_init__(self) -> None:
        if (self.whole is None) == (self.chunked is None):
            raise ValueError("Voicing takes exactly one of `whole` and `chunked`")


@dataclass(frozen=True, slots=True)
class Outlet:
    """Where a reply goes and how it reports: the call's TX queue, stream and FSM."""

    tx: TxQueue
    stream_sid: str
    emit: Callable[[fsm.Event], None]
    stamp: Callable[[str], None]  # telemetry: a named moment of this reply's timeline


class ReplyJob:
    """Reply ``reply_id`` of a call; ``run()`` inside the call's nursery."""

    def __init__(self, reply_id: int, outlet: Outlet, *, apology: Piece | None = None,
                 filler: Piece | None = None, voicing: Voicing | None = None,
                 stamps: tuple[str, str | None] = ("first_reply_frame_sent", None)):
        self.id = reply_id
        self.scope = trio.CancelScope()
        self.spoken: list[str] = []  # pieces queued to Twilio, in order
        self.failed: str | None = None
        self.apologized = False  # the apology was said instead of (part of) the reply
        self.filler_said = False
        self._out = outlet
        self._apology = apology
        self._filler = filler
        self._voicing = voicing
        self._first_frame_stamp, self._last_frame_stamp = stamps
        self._released = trio.Event()
        self._gate = trio.Event()  # synthesis may start (held shut for an unadopted draft)
        self._pieces_in, self._pieces_out = trio.open_memory_channel[Piece](_PIPE_DEPTH)
        self._filler_in = self._pieces_in.clone()  # closed once any audio is ready
        self._marks: dict[str, str] = {}
        self._sent_at: dict[str, float] = {}  # when each piece's last frame left for Twilio
        self._heard_marks: set[str] = set()
        self._epoch = -1
        self._all_queued = False
        self._ready_sent = False
        self._answered = False  # audio of the reply itself (not the filler) is on its way
        self._done_sent = False

    # -- what the driver tells the job ---------------------------------------

    def voice_now(self) -> None:
        """Synthesis may start (a draft's waits until it is adopted, unless drafts are voiced)."""
        self._gate.set()

    def release(self) -> None:
        """Play: pieces go to the TX queue as they come."""
        self._released.set()

    def say_filler(self) -> None:
        """No audio is ready yet: the filler goes first, and counts as the first audio."""
        if not self._ready_sent and self._filler is not None:
            self._filler_in.send_nowait(self._filler)  # nothing else is queued yet
            self.filler_said = True
            self._ready()

    # -- the three tasks ---------------------------------------------------

    async def run(self, *, think: Callable | None = None, canned: Sequence[Piece] = ()) -> None:
        """Produce (``think`` streams sentences; ``canned`` is ready audio) and play."""
        sentences_in, sentences_out = trio.open_memory_channel[_Sentence](_PIPE_DEPTH)
        with self.scope:
            async with trio.open_nursery() as nursery:
                if think is not None:
                    nursery.start_soon(self._guarded_think, think, sentences_in)
                    nursery.start_soon(self._voice, sentences_out, self._pieces_in)
                else:
                    sentences_in.close()
                    nursery.start_soon(self._feed_canned, canned, self._pieces_in)
                await self._released.wait()
                await self._play(self._pieces_out)

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
                    self.apologized = True
                    await out.send(_Sentence(self._apology.text, self._apology.frames))

    async def _voice(self, sentences: trio.MemoryReceiveChannel, out: trio.MemorySendChannel) -> None:
        async with out:
            await self._gate.wait()
            async for sentence in sentences:
                await self._speak(sentence, out)
        self._ready()  # nothing to say still lets the call move on

    async def _feed_canned(self, canned: Sequence[Piece], out: trio.MemorySendChannel) -> None:
        async with out:
            for piece in canned:
                await out.send(piece)
        self._ready()

    def _ready(self) -> None:
        if not self._ready_sent:
            self._ready_sent = True
            self._filler_in.close()
            self._out.emit(fsm.ReplyAudioReady(at=trio.current_time(), reply=self.id))

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
        voicing = self._voicing
        assert voicing is not None
        self._out.stamp("tts_start")
        try:
            if voicing.chunked is not None:
                await self._speak_streamed(voicing.chunked, sentence.text, out)
            else:
                audio = await voicing.whole.synthesize(sentence.text, voicing.voice)
                self._out.stamp("tts_first_audio")
                await self._send(out, Piece(sentence.text, tuple(mulaw.split_frames(audio))))
        except UpstreamUnavailable as exc:
            log.warning("reply %d: TTS failed: %s", self.id, exc)
            self.failed = str(exc)
            if not self._answered and self._apology is not None:  # a filler is no answer: apologize
                self.apologized = True
                await self._send(out, self._apology)

    async def _speak_streamed(self, tts: ChunkedSynthesizer, text: str, out: trio.MemorySendChannel) -> None:
        """Play whole frames as chunks arrive; the sentence's last piece carries its text."""
        pending = bytearray()

        async def sink(chunk: bytes) -> None:
            self._out.stamp("tts_first_audio")
            pending.extend(chunk)
            whole = len(pending) - len(pending) % mulaw.FRAME_BYTES
            if whole:
                frames = tuple(mulaw.split_frames(bytes(pending[:whole])))
                del pending[:whole]
                await self._send(out, Piece("", frames))

        await tts.synthesize_into(text, self._voicing.voice, sink)
        await self._send(out, Piece(text, tuple(mulaw.split_frames(bytes(pending)))))

    # -- playback ----------------------------------------------------------

    async def _play(self, pieces: trio.MemoryReceiveChannel) -> None:
        tx, stamp = self._out.tx, self._out.stamp
        self._epoch = tx.epoch
        first = True
        async for piece in pieces:
            if first:
                tx.put_hook(lambda: stamp(self._first_frame_stamp), epoch=self._epoch)
                first = False
            await tx.put_frames(piece.frames, epoch=self._epoch)
            name = f"r{self.id}-{len(self._marks) + 1}"
            self._marks[name] = piece.text
            tx.put_hook(lambda name=name: self._sent_at.__setitem__(name, trio.current_time()),
                        epoch=self._epoch)
            if piece.text:
                self.spoken.append(piece.text)
            tx.put_control(twilio.render_mark(self._out.stream_sid, name), epoch=self._epoch)
        if self._last_frame_stamp is not None:
            tx.put_hook(lambda: stamp(self._last_frame_stamp), epoch=self._epoch)
        self._all_queued = True
        now = trio.current_time()
        self._out.emit(fsm.ReplyQueued(at=now, reply=self.id, playout_s=tx.queued_frames * FRAME_S))
        self._check_done(now)

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
        if self._out.tx.epoch != self._epoch:
            return  # echoed by our own `clear`: the caller never heard it
        self._heard_marks.add(name)
        self._check_done(at)

    def _check_done(self, at: float) -> None:
        if self._all_queued and len(self._heard_marks) == len(self._marks) and not self._done_sent:
            self._done_sent = True
            self._out.emit(fsm.PlaybackDone(at=at, reply=self.id))


def chat_thinker(chat, messages: Sequence[Mapping[str, str]], *, first_clause_min_chars: int,
                 stamp: Callable[[str], None], tools: Sequence[Mapping] = (), on_calls: ToolRoundHandler | None = None,
                 max_rounds: int = 3, on_usage: Callable[[Mapping[str, int]], None] | None = None):
    """A ``think`` function: stream the LLM, cut it into speakable pieces, say each.

    With ``tools`` offered, the tool calls a request ends with go to ``on_calls``
    (with the text before them and how many sentences the reply has said); it
    returns the messages to ask the model again with, or None when the reply is
    over. ``max_rounds`` bounds a model that keeps calling tools. ``on_usage``
    hears each request's token counts when the server reports them.
    """

    async def think(say) -> None:
        splitter = SentenceSplitter(first_clause_min_chars=first_clause_min_chars)
        stamp("ai_start")
        request = list(messages)
        said = 0
        for _ in range(max_rounds):
            text, calls = [], []
            async with chat.stream(request, tools=tools) as items:
                async for item in items:
                    if not isinstance(item, str):
                        calls.append(item)
                        continue
                    stamp("ai_first_token")
                    text.append(item)
                    for sentence in splitter.push(item):
                        stamp("ai_first_sentence")
                        said += 1
                        await say(sentence)
            if on_usage is not None and items.usage is not None:
                on_usage(items.usage)
            for sentence in splitter.flush():
                stamp("ai_first_sentence")
                said += 1
                await say(sentence)
            if not calls or on_calls is None:
                return
            more = await on_calls("".join(text), calls, said)
            if more is None:
                return
            request += more

    return think
