"""The rig of the fault-tolerance tests (tests/test_faults_*.py); no tests in this file.

* `open_rig`: one localcloud and one `agentd serve` pointed at it, inside the
  test's Trio run. Each fault scenario gets its own rig, because localcloud's
  faults are global to it; scenarios can then run side by side.
* `TwilioSide`: Twilio's end of one Media Stream, driven by the test step by
  step (speak now, hang up now, drop the line now, go quiet now, never echo marks). The
  scripted softphone (`place_call`) is used wherever its script is enough.
* `Resources`: what a finished call must hand back -- Trio tasks, threads,
  localcloud's gRPC streams and chat requests.

The calls run in real time (the agent paces audio at 20 ms a frame), so the
replies are kept short and the greeting is one word.
"""

from __future__ import annotations

import functools
import re
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
import trio_websocket
from agent_harness import turns_of, wait_for_call_record

from agentd.testbed.softphone.caller_audio import synthesize_caller_turns
from agentd.codecs import twilio
from agentd.codecs.mulaw import silence, split_frames, ulaw_decode
from agentd.codecs.pcm import rms_dbfs
from agentd.config import Config
from agentd.testbed.demo import demo_config
from agentd.testbed.localcloud import LocalCloud, settings_from_config
from agentd.server import Server, serve
from agentd.testbed.softphone.playback import SLOT_MS, PlaybackBuffer
from agentd.testbed.softphone.script import CallerTurn

SLOT_S = SLOT_MS / 1000
SETTLE_SLOTS = 35  # 700 ms of agent quiet ends a reply (the softphone's settle_ms)
REPLY_TIMEOUT_SLOTS = 750  # a reply that has not started 15 s after the caller spoke is not coming
GUARD_S = 60  # against hangs, never a performance assertion

# What localcloud's script engine "hears" in each caller turn, and the rules' answers.
OPEN_LINE = "are you open today"
PRICE_LINE = "how much is a visit"
BYE_LINE = "thanks goodbye"
OPEN_REPLY = "We open at eight. Any other question?"  # two pieces
PRICE_REPLY = "Sure. A visit is eighty dollars, parts extra. Call us any time."  # three pieces
BYE_REPLY = "Goodbye!"
APOLOGY = "Sorry, I'm having trouble, one moment."
FILLERS = ("One moment.", "Let me check.")
_RULES = [
    {"keywords": ["open"], "reply": OPEN_REPLY},
    {"keywords": ["much"], "reply": PRICE_REPLY},
    {"keywords": ["goodbye"], "reply": BYE_REPLY},
]
_SPOKEN = {"open": "Are you open today?", "price": "How much is a visit?", "bye": "Goodbye."}


def without_filler(reply: str) -> str:
    """A reply without the filler (one of FILLERS, then a space) a slow turn may open with."""
    for filler in FILLERS:
        if reply.startswith(filler + " "):
            return reply[len(filler) + 1:]
    return reply


def fault_config(base: Config, **overrides) -> Config:
    """The shipped config with a one-word greeting and short replies (calls take real time)."""
    return base.with_overrides(**{"businesses.acme.greeting": "Hi.", "businesses.acme.rules": _RULES,
                                  **overrides})


def caller_voices(directory: Path) -> dict[str, CallerTurn]:
    """Real speech for the caller (the words come from localcloud's script): open, price, bye,
    and `blip`, 180 ms of voice (a short "yes", or the agent's own echo)."""
    paths = synthesize_caller_turns(list(_SPOKEN.values()), "en-us", out_dir=directory)
    turns = {key: CallerTurn.from_wav(path) for key, path in zip(_SPOKEN, paths)}
    turns["blip"] = CallerTurn(audio=voiced_part(turns["open"].audio, ms=180), label="blip")
    return turns


def voiced_part(audio: bytes, *, ms: int) -> bytes:
    """`ms` of `audio` starting at its first voiced frame (RMS above -40 dBFS)."""
    frames = split_frames(audio, pad=False)
    first = next(i for i, frame in enumerate(frames) if rms_dbfs(ulaw_decode(frame)) > -40.0)
    return b"".join(frames[first:first + ms // SLOT_MS])


# --------------------------------------------------------------------------- the rig ---

@dataclass
class Rig:
    """One localcloud and the agent that talks to it."""

    cloud: LocalCloud
    config: Config
    url: str
    records: list[dict]
    server: Server  # what `serve` reported: its port and the services every call shares

    def turns(self, call_sid: str) -> list[dict]:
        """agentd's turn records of the call, in turn order (each carries caller_text, reply_text)."""
        return turns_of(self.records, call_sid)

    async def call_record(self, call_sid: str) -> dict:
        return await wait_for_call_record(self.records, call_sid)

    def history_sent(self) -> list[tuple[str, str]]:
        """(role, content) of the last chat request, system prompt left out ([] if none was made)."""
        request = self.cloud.stats()["last_chat_request"] or {"messages": []}
        return [(m["role"], m["content"]) for m in request["messages"] if m["role"] != "system"]


@asynccontextmanager
async def open_rig(config: Config, script: tuple[str, ...], *, observers: tuple[Callable[[dict], None], ...] = (),
                   agent_overrides: dict | None = None, **cloud_settings) -> AsyncIterator[Rig]:
    """Start localcloud (script STT engine, one script cursor for all streams) and agentd.

    `config` is a base config (`fault_config`); it is pointed at localcloud here,
    then `agent_overrides` apply. `observers` see agentd's turn and call records
    as they are made. Faults are for the caller to set once this yields: the
    agent has pre-synthesized its greeting, apology and fillers by then.
    """
    settings = settings_from_config(config, stt_engine="script", script_lines=script, stt_script_shared=True,
                                    **cloud_settings)
    with LocalCloud(settings) as cloud:
        config = demo_config(config, cloud, "").with_overrides(**(agent_overrides or {}))
        records: list[dict] = []
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(serve, config, observers=[records.append, *observers]))
            url = f"ws://127.0.0.1:{server.port}{config.server.path}"
            yield Rig(cloud=cloud, config=config, url=url, records=records, server=server)
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------- Twilio's side ---

class TwilioSide:
    """Twilio's end of one Media Stream, under the test's direct control.

    Like the softphone, it sends a media frame every 20 ms of Trio time (audio
    queued with `say`, else line silence) and plays the agent's audio through a
    `PlaybackBuffer`, echoing each mark when playback reaches it and every
    pending mark on `clear` -- unless `echo_marks` is False. Unlike the
    softphone it has no script: the test says when to speak, hang up, drop
    the line or go quiet, and waits (`wait_until`) on what this side observed.
    Times are slot numbers (20 ms each) since `start`.
    """

    def __init__(self, *, echo_marks: bool = True, call_sid: str | None = None) -> None:
        self.echo_marks = echo_marks
        self.stream_sid = "MZ" + format(id(self), "032x")  # Twilio's format: MZ/CA + 32 hex
        self.call_sid = call_sid or "CA" + format(id(self), "032x")
        self.slot = 0
        self.played_slots: list[int] = []  # slots in which agent audio played
        self.marks_sent: list[str] = []  # marks the agent sent, in order
        self.marks_echoed: list[str] = []
        self.echoed_by_clear: list[str] = []  # the subset echoed because of a `clear`
        self.clears: list[int] = []  # slot of each `clear`
        self.close_code: int | None = None  # how the agent closed the socket, once it has
        self.close_reason: str | None = None
        self._buffer = PlaybackBuffer()
        self._caller: deque[bytes] = deque()
        self._changed = trio.Event()
        self._lock = trio.Lock()
        self._sequence = 0
        self._stopped = False
        self._quiet = False
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._tcp: trio.SocketStream | None = None

    # -- what the test does --------------------------------------------------------

    def say(self, audio: bytes) -> None:
        """Queue caller audio; it goes out one frame per slot, after anything queued before."""
        self._caller.extend(split_frames(audio))

    @property
    def saying(self) -> bool:
        return bool(self._caller)

    @property
    def frames_left(self) -> int:
        """Caller frames queued but not sent yet."""
        return len(self._caller)

    async def said(self) -> int:
        """Wait until the queued caller audio is all sent; returns the slot after its last frame."""
        await self.wait_until(lambda: not self._caller)
        return self.slot

    async def speak(self, audio: bytes) -> int:
        """`say`, then `said`."""
        self.say(audio)
        return await self.said()

    def played_since(self, slot: int) -> int:
        """Slots of agent audio played from `slot` on."""
        return sum(1 for played in self.played_slots if played >= slot)

    def agent_quiet_slots(self) -> int:
        """Slots since agent audio last played (0 while it plays)."""
        last = self.played_slots[-1] if self.played_slots else -1
        return 0 if self._buffer.queued_bytes else self.slot - 1 - last

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait (slot by slot, or on each agent message) until `condition()` holds."""
        while not condition():
            await self._changed.wait()

    async def wait_for_reply(self, since: int) -> None:
        """Wait until agent audio played after slot `since`, then 700 ms of quiet; or, as the
        softphone does, give up on a reply that has not started 15 s after `since`."""
        def over() -> bool:
            if self.played_since(since) == 0:
                return self.slot - since >= REPLY_TIMEOUT_SLOTS
            return self.agent_quiet_slots() >= SETTLE_SLOTS

        await self.wait_until(over)

    async def hang_up(self) -> None:
        """Send `stop` (the caller hung up) and stop sending media."""
        self._stopped = True
        await self._send(lambda seq: twilio.render_stop(self.stream_sid, self.call_sid, "ACfault", seq))

    async def press(self, keys: str) -> None:
        """Keypad presses, one `dtmf` event each, as Twilio reports them."""
        for key in keys:
            await self._send(lambda seq, key=key: twilio.render_dtmf(self.stream_sid, key, seq))

    def go_quiet(self) -> None:
        """The line goes half-open: from now on this side sends nothing at all (no media, no
        mark echoes) yet never closes the socket, as a peer that vanished without a FIN.
        It still reads, to see how the agent ends the call."""
        self._stopped = self._quiet = True

    async def drop(self) -> None:
        """The line drops: the TCP connection closes with no WebSocket close handshake."""
        self._stopped = True
        assert self._tcp is not None
        await self._tcp.aclose()

    # -- the line ------------------------------------------------------------------

    async def connect(self, nursery: trio.Nursery, url: str, *, parameters: dict[str, str],
                      headers: dict[str, str]) -> None:
        """Open the socket as Twilio does (upgrade with `headers`, then `connected`, `start` with
        `parameters` as its customParameters); run the line in `nursery`."""
        host, port, resource = _split_ws_url(url)
        self._tcp = await trio.open_tcp_stream(host, port)
        self._ws = await trio_websocket.wrap_client_stream(
            nursery, self._tcp, host, resource, extra_headers=[(k.encode(), v.encode()) for k, v in headers.items()])
        await self._ws.send_message(twilio.render_connected())
        await self._send(lambda seq: twilio.render_start(
            stream_sid=self.stream_sid, call_sid=self.call_sid, account_sid="ACfault",
            custom_parameters=parameters, sequence=seq))
        nursery.start_soon(self._read)
        nursery.start_soon(self._run_slots)

    async def close(self) -> None:
        """Hang up unless the call already ended; wait (briefly) for the agent to close its side."""
        if not self._stopped:
            await self.hang_up()
        with trio.move_on_after(5):
            await self.wait_until(lambda: self.close_code is not None)
        assert self._tcp is not None
        await self._tcp.aclose()

    async def _run_slots(self) -> None:
        t0 = trio.current_time()
        while not self._stopped:
            await trio.sleep_until(t0 + self.slot * SLOT_S)
            if self._stopped:
                return
            playback = self._buffer.play_slot(self.slot * SLOT_MS)
            if playback.frame is not None:
                self.played_slots.append(self.slot)
            await self._echo(playback.marks)
            frame = self._caller.popleft() if self._caller else silence(1)
            await self._send(lambda seq, frame=frame, slot=self.slot: twilio.render_inbound_media(
                stream_sid=self.stream_sid, chunk=slot + 1, timestamp_ms=slot * SLOT_MS, payload=frame, sequence=seq))
            self.slot += 1
            self._notify()

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            while True:
                event = twilio.parse_outbound(await self._ws.get_message(), stream_sid=self.stream_sid)
                if isinstance(event, twilio.OutboundMedia):
                    self._buffer.append_audio(event.payload, at_ms=self.slot * SLOT_MS)
                elif isinstance(event, twilio.OutboundMark):
                    self.marks_sent.append(event.name)
                    await self._echo(self._buffer.add_mark(event.name))
                else:
                    self.clears.append(self.slot)
                    pending = self._buffer.clear()
                    if self.echo_marks:
                        self.echoed_by_clear += pending
                    await self._echo(pending)
                self._notify()
        except trio_websocket.ConnectionClosed as closed:
            self.close_code, self.close_reason = closed.reason.code, closed.reason.reason
            self._notify()

    async def _echo(self, names: tuple[str, ...]) -> None:
        if not self.echo_marks:
            return
        for name in names:
            await self._send(lambda seq, name=name: twilio.render_inbound_mark(self.stream_sid, name, seq))
            self.marks_echoed.append(name)

    async def _send(self, render: Callable[[int], str]) -> None:
        assert self._ws is not None
        if self._quiet:
            return
        async with self._lock:
            self._sequence += 1
            try:
                await self._ws.send_message(render(self._sequence))
            except (trio_websocket.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                self._stopped = True  # the agent or the test ended the call; the reader reports how

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


@asynccontextmanager
async def open_twilio_side(url: str, *, business: str = "acme", echo_marks: bool = True, call_sid: str | None = None,
                           parameters: dict[str, str] | None = None,
                           headers: dict[str, str] | None = None) -> AsyncIterator[TwilioSide]:
    """A `TwilioSide` connected to the agent at `url` for the duration of the block.

    `start` carries `parameters` (what the TwiML's `<Parameter>`s said) or else just the
    business; `headers` go on the upgrade (e.g. x-twilio-signature).

    Leaving the block hangs up (`stop`) unless the test already hung up or
    dropped the line, and returns once the agent's side is closed too.
    """
    side = TwilioSide(echo_marks=echo_marks, call_sid=call_sid)
    async with trio.open_nursery() as nursery:
        await side.connect(nursery, url, parameters={"business": business} if parameters is None else parameters,
                           headers=headers or {})
        yield side
        await side.close()
        nursery.cancel_scope.cancel()


def _split_ws_url(url: str) -> tuple[str, int, str]:
    """ws://host:port/path -> (host, port, /path)."""
    rest = url.removeprefix("ws://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    return host, int(port), "/" + path


# ----------------------------------------------------------------------- resources ---

@dataclass(frozen=True, slots=True)
class Resources:
    """What a call holds while it runs: Trio tasks, threads, gRPC streams, chat requests."""

    tasks: int
    threads: int
    stt_streams: int
    chat_requests: int

    @classmethod
    def now(cls, cloud: LocalCloud) -> Resources:
        stats = cloud.stats()
        return cls(tasks=_trio_tasks(), threads=_busy_threads(),
                   stt_streams=stats["active_streams"], chat_requests=stats["active_chats"])


_IDLE_TRIO_WORKER = re.compile(r"Trio thread \d+")  # a busy worker is named after its job


def _busy_threads() -> int:
    """Threads alive now, less the idle workers of Trio's thread cache: those hold nothing
    and retire on their own 10 s after their last job, possibly in the middle of a test."""
    return sum(1 for thread in threading.enumerate() if not _IDLE_TRIO_WORKER.fullmatch(thread.name))


def _trio_tasks() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return count(trio.lowlevel.current_root_task())


async def wait_until_released(cloud: LocalCloud, baseline: Resources, *, within_s: float = 1.0) -> Resources:
    """Poll (Trio clock; real time here) until what the call held is back to `baseline`;
    returns what was held at the deadline if it was not."""
    with trio.move_on_after(within_s):
        while Resources.now(cloud) != baseline:
            await trio.sleep(0.02)
    return Resources.now(cloud)
