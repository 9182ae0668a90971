"""`agentd call`: a softphone that plays Twilio's side of a Media Streams call.

It connects to an agent's WebSocket exactly as Twilio's `<Connect><Stream>`
would: `connected`, `start` (fresh sids, custom parameters), then one `media`
message every 20 ms of Trio time for the whole call -- caller audio during a
turn, mu-law line silence otherwise -- and finally `stop`. What the agent sends
back goes into a simulated Twilio playback buffer (softphone_playback), which
plays 20 ms per slot and echoes marks as Twilio does. A caller script
(softphone_script) decides when to speak and measures the agent.

Two tasks share one call: the slot loop (paced on an absolute schedule,
`t0 + k * 20 ms`, so it never drifts and runs under MockClock) and the agent
reader. Every send goes through one lock that also assigns `sequenceNumber`,
so numbers go out in order. The agent closing the socket ends the call; that
is handled once, with `except*`, at the call boundary.
"""

import argparse
import contextlib
import json
import logging
import secrets
import sys
import tempfile
from dataclasses import dataclass, field, fields, is_dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import trio
from trio_websocket import ConnectionClosed, DisconnectionTimeout, HandshakeError, open_websocket_url

from agentd.testbed.softphone.caller_audio import CallerAudioError, synthesize_caller_turns
from agentd.codecs import twilio
from agentd.errors import UpstreamUnavailable
from agentd.metronome import Metronome
from agentd.security import twilio_signature
from agentd.testbed.softphone.playback import SLOT_MS, PlaybackBuffer, Recording
from agentd.testbed.softphone.script import CallerTurn, CallScript, GreetingReport, SlotFacts, TurnReport

__all__ = ["CallReport", "CallerTurn", "Violation", "format_report", "main", "place_call", "twilio_signature"]

log = logging.getLogger(__name__)

SLOT_S = SLOT_MS / 1000
MAX_VIOLATIONS_KEPT = 50  # a broken agent can commit one per frame; keep the report readable
_RIFF_MAGIC = b"RIFF"


@dataclass(frozen=True, slots=True, kw_only=True)
class Violation:
    """Something Twilio would reject or garble. `code` is Twilio's error number where one exists."""

    at_ms: int  # media time since `start`
    code: str  # "31924" header in payload, "31950" binary frame, "codec" malformed message
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CallReport:
    """Everything measured on one call. Times are ms of media time since `start` was sent."""

    url: str
    stream_sid: str
    call_sid: str
    parameters: dict[str, str]
    greeting: GreetingReport
    turns: tuple[TurnReport, ...]
    total_call_ms: int
    media_messages_received: int
    media_bytes_received: int
    frames_played: int
    clears_received: int
    marks_received: int
    marks_echoed: tuple[str, ...]
    violations: tuple[Violation, ...]  # the first MAX_VIOLATIONS_KEPT
    violation_count: int
    ended_by: str  # "softphone" (we sent stop) or "agent" (it closed the socket)
    close_detail: str
    recording: Recording = field(repr=False, compare=False)

    @property
    def greeting_latency_ms(self) -> int | None:
        return self.greeting.latency_ms

    def to_dict(self) -> dict:
        """A JSON-serializable view (the recording is left out; see `recording.stereo_wav()`)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name != "recording"}


def _plain(value):
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return value


async def place_call(
    url: str,
    turns: list[CallerTurn],
    *,
    business: str | None = None,
    extra_parameters: dict[str, str] | None = None,
    extra_headers: dict[str, str] | None = None,
    settle_ms: int = 700,
    gap_ms: int = 0,
    reply_timeout_s: float = 15.0,
    max_reply_s: float = 60.0,
    connect_timeout_s: float = 10.0,
    metronome: Metronome | None = None,
) -> CallReport:
    """Call the agent at `url` (ws:// or wss://), speak `turns`, and report what happened.

    `business` and `extra_parameters` become `start.customParameters`;
    `extra_headers` go on the upgrade request (e.g. x-twilio-signature). The
    call waits for the greeting to settle, then for each turn speaks, waits for
    the reply to start (up to `reply_timeout_s` after the turn's audio ends)
    and to settle (`settle_ms` of quiet, at most `max_reply_s`), then hangs up.
    All timing uses the Trio clock. Raises UpstreamUnavailable if the
    WebSocket cannot be opened; an agent hanging up mid-call is reported, not raised.
    Many calls in one process should share a running `metronome` (as agentd's
    pacers do): each slot then waits on it, up to one tick late, instead of
    paying for a Trio sleep of its own.
    """
    parameters = dict(extra_parameters or {})
    if business is not None:
        parameters["business"] = business
    script = CallScript(turns, settle_ms=settle_ms, gap_ms=gap_ms, reply_timeout_ms=round(reply_timeout_s * 1000),
                        max_reply_ms=round(max_reply_s * 1000))
    headers = [(k.encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    with contextlib.suppress(DisconnectionTimeout):  # an agent that never acknowledges our close
        async with contextlib.AsyncExitStack() as stack:
            ws = await _connect(stack, url, headers, connect_timeout_s)
            call = _Call(ws, script, url=url, parameters=parameters, metronome=metronome)
            await call.run()
    return call.report()


async def _connect(stack: contextlib.AsyncExitStack, url: str, headers, timeout_s: float):
    try:
        return await stack.enter_async_context(
            open_websocket_url(url, extra_headers=headers, connect_timeout=timeout_s, disconnect_timeout=5.0)
        )
    except (HandshakeError, OSError, ValueError) as exc:  # ValueError: not a ws:// or wss:// URL
        raise UpstreamUnavailable(f"cannot open {url}: {exc!r}") from exc


class _Call:
    """One call in progress: the socket, the simulated Twilio buffer, the script, the tallies."""

    def __init__(self, ws, script: CallScript, *, url: str, parameters: dict[str, str],
                 metronome: Metronome | None) -> None:
        self._ws = ws
        self._metronome = metronome
        self._script = script
        self._url = url
        self._parameters = parameters
        self._stream_sid = "MZ" + secrets.token_hex(16)
        self._call_sid = "CA" + secrets.token_hex(16)
        self._account_sid = "AC" + secrets.token_hex(16)
        self._buffer = PlaybackBuffer()
        self._recording = Recording()
        self._send_lock = trio.Lock()
        self._sequence = 0
        self._t0 = 0.0
        self._end_ms = 0
        self._ended_by = "softphone"
        self._close_detail = ""
        self._media_received = self._media_bytes = self._frames_played = 0
        self._clears = self._marks_received = 0
        self._echoed: list[str] = []
        self._violations: list[Violation] = []
        self._violation_count = 0

    async def run(self) -> None:
        """Open the stream, run slots until the script hangs up or the agent closes."""
        self._t0 = trio.current_time()  # provisional, so an early close still reports a sane time
        try:
            await self._ws.send_message(twilio.render_connected())
            await self._send(lambda seq: twilio.render_start(
                stream_sid=self._stream_sid, call_sid=self._call_sid, account_sid=self._account_sid,
                custom_parameters=self._parameters, sequence=seq))
            self._t0 = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_agent)
                await self._run_slots()
                nursery.cancel_scope.cancel()  # stop sent: nothing more to hear
        except* ConnectionClosed as group:
            self._ended_by = "agent"
            self._close_detail = str(group.exceptions[0].reason)
        self._end_ms = round(self._now_ms())

    def report(self) -> CallReport:
        return CallReport(
            url=self._url, stream_sid=self._stream_sid, call_sid=self._call_sid, parameters=self._parameters,
            greeting=self._script.greeting_report(), turns=self._script.turn_reports(), total_call_ms=self._end_ms,
            media_messages_received=self._media_received, media_bytes_received=self._media_bytes,
            frames_played=self._frames_played, clears_received=self._clears, marks_received=self._marks_received,
            marks_echoed=tuple(self._echoed), violations=tuple(self._violations),
            violation_count=self._violation_count, ended_by=self._ended_by, close_detail=self._close_detail,
            recording=self._recording,
        )

    # -- caller side: one slot every 20 ms ------------------------------------------------

    async def _run_slots(self) -> None:
        slot = 0
        while True:
            # Absolute schedule: a late slot does not push back the ones after it.
            due = self._t0 + slot * SLOT_S
            if self._metronome is None:
                await trio.sleep_until(due)
            elif trio.current_time() < due:
                await self._metronome.alarm(self._metronome.align(due)).wait()
            if await self._play_slot(slot):
                return
            slot += 1

    async def _play_slot(self, slot: int) -> bool:
        """Play the agent's next frame, send the caller's; True once `stop` has been sent."""
        at_ms = slot * SLOT_MS
        playback = self._buffer.play_slot(at_ms)
        self._frames_played += playback.frame is not None
        await self._echo(playback.marks)
        before = self._script.phase
        plan = self._script.on_slot(SlotFacts(
            at_ms=at_ms, played_bytes=playback.audio_bytes, agent_quiet_ms=self._buffer.quiet_ms(at_ms)))
        if self._script.phase is not before:
            log.info("call=%s %s->%s +%dms", self._call_sid[:8], before.name, self._script.phase.name, at_ms)
        if plan.hang_up:
            await self._send(lambda seq: twilio.render_stop(self._stream_sid, self._call_sid, self._account_sid, seq))
            return True
        if plan.dtmf:
            await self._send(lambda seq: twilio.render_dtmf(self._stream_sid, plan.dtmf, seq))
        await self._send(lambda seq: twilio.render_inbound_media(
            stream_sid=self._stream_sid, chunk=slot + 1, timestamp_ms=at_ms, payload=plan.caller_frame, sequence=seq))
        self._recording.add_slot(caller=plan.caller_frame, agent=playback.frame)
        return False

    # -- agent side: everything it sends ----------------------------------------------------

    async def _read_agent(self) -> None:
        while True:
            await self._on_message(await self._ws.get_message())

    async def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self._violate("31950", f"binary frame of {len(message)} bytes")
            return
        try:
            event = twilio.parse_outbound(message, stream_sid=self._stream_sid)
        except twilio.TwilioCodecError as exc:
            self._violate("codec", str(exc))  # Twilio logs these and carries on; so do we
            return
        if isinstance(event, twilio.OutboundMedia):
            self._on_media(event.payload)
        elif isinstance(event, twilio.OutboundMark):
            self._marks_received += 1
            await self._echo(self._buffer.add_mark(event.name))
        else:
            self._clears += 1
            self._script.note_clear()
            await self._echo(self._buffer.clear())

    def _on_media(self, payload: bytes) -> None:
        self._media_received += 1
        self._media_bytes += len(payload)
        if payload.startswith(_RIFF_MAGIC):
            # Twilio plays the header bytes as noise (error 31924); so does the simulation.
            self._violate("31924", "media payload starts with a RIFF/WAV header")
        self._buffer.append_audio(payload, at_ms=self._now_ms())

    # -- shared plumbing ------------------------------------------------------------------

    async def _echo(self, names: tuple[str, ...]) -> None:
        for name in names:
            await self._send(lambda seq: twilio.render_inbound_mark(self._stream_sid, name, seq))
            self._echoed.append(name)
            self._script.note_mark_echoed(name)

    async def _send(self, render: Callable[[int], str]) -> None:
        """Send one message numbered with the next sequenceNumber (numbers go out in order)."""
        async with self._send_lock:
            self._sequence += 1
            await self._ws.send_message(render(self._sequence))

    def _violate(self, code: str, detail: str) -> None:
        self._violation_count += 1
        if len(self._violations) < MAX_VIOLATIONS_KEPT:
            self._violations.append(Violation(at_ms=round(self._now_ms()), code=code, detail=detail))

    def _now_ms(self) -> float:
        return (trio.current_time() - self._t0) * 1000


# -- the command line ------------------------------------------------------------------------


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="agentd call", description="Call an agent as Twilio would and time it.")
    parser.add_argument("url", help="the agent's WebSocket URL (ws:// or wss://)")
    parser.add_argument("--turn", dest="turns", action="append", type=lambda s: ("wav", s), metavar="WAV",
                        default=[], help="a caller turn from a PCM16 WAV (repeatable, in order)")
    parser.add_argument("--say", dest="turns", action="append", type=lambda s: ("say", s), metavar="TEXT",
                        help="a caller turn spoken by espeak-ng (repeatable, mixes with --turn)")
    parser.add_argument("--dtmf", dest="turns", action="append", type=lambda s: ("dtmf", s), metavar="DIGITS",
                        help="a turn that presses keys (repeatable, mixes with --turn)")
    parser.add_argument("--lang", default="en-us", help="espeak-ng voice for --say (default en-us)")
    parser.add_argument("--business", help="sent as customParameters.business")
    parser.add_argument("--param", action="append", default=[], metavar="K=V", help="another custom parameter")
    parser.add_argument("--header", action="append", default=[], metavar="K=V", help="an extra upgrade header")
    parser.add_argument("--auth-token", help="sign the upgrade with x-twilio-signature for this auth token")
    parser.add_argument("--signed-url", help="the URL to sign (default: URL; proxies may rewrite it)")
    parser.add_argument("--out", type=Path, help="write a stereo WAV (left caller, right agent)")
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    parser.add_argument("--settle-ms", type=int, default=700, help="agent quiet time that ends a reply")
    parser.add_argument("--gap-ms", type=int, default=0, help="extra pause before each caller turn")
    parser.add_argument("--reply-timeout-s", type=float, default=15.0, help="give up waiting for a reply")
    return parser.parse_args(argv)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"agentd call: {flag} wants K=V, got {item!r}")
        pairs[key] = value
    return pairs


def _build_turns(specs: list[tuple[str, str]], lang: str, scratch: Path) -> list[CallerTurn]:
    """Turn --turn/--say/--dtmf specs (in command-line order) into CallerTurns."""
    texts = [text for kind, text in specs if kind == "say"]
    spoken = iter(synthesize_caller_turns(texts, lang, out_dir=scratch) if texts else [])
    turns = []
    for kind, value in specs:
        if kind == "wav":
            turns.append(CallerTurn.from_wav(value))
        elif kind == "say":
            turns.append(replace(CallerTurn.from_wav(next(spoken)), label=f"say: {value}"))
        else:
            turns.append(CallerTurn(dtmf=value, label=f"dtmf {value}"))
    return turns


def format_report(report: CallReport) -> str:
    """A human-readable summary: the greeting, one table row per turn, the totals."""
    greeting = report.greeting
    lines = [
        f"call {report.call_sid} -> {report.url} ({report.ended_by} hung up after {report.total_call_ms / 1000:.1f} s)",
        "greeting: " + (f"{greeting.latency_ms} ms to first audio, {greeting.audio_ms} ms long"
                        if greeting.latency_ms is not None else "none"),
        f"{'turn':>4}  {'caller':<32} {'v2v ms':>7} {'reply ms':>8} {'clears':>6} {'marks':>5}  status",
    ]
    for turn in report.turns:
        v2v = "-" if turn.v2v_ms is None else str(turn.v2v_ms)
        status = ("answered" if turn.settled else "answered, cut off") if turn.answered else "NO REPLY"
        lines.append(f"{turn.index:>4}  {_shorten(turn.label, 32):<32} {v2v:>7} {turn.reply_audio_ms:>8} "
                     f"{turn.clears:>6} {len(turn.marks_echoed):>5}  {status}")
    lines.append(f"media received: {report.media_messages_received} messages, {report.frames_played} frames played; "
                 f"clears {report.clears_received}; marks {report.marks_received} sent, "
                 f"{len(report.marks_echoed)} echoed")
    lines.append(f"protocol violations: {report.violation_count}")
    lines += [f"  +{v.at_ms} ms  [{v.code}] {v.detail}" for v in report.violations[:10]]
    return "\n".join(lines)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def main(argv: list[str] | None = None) -> int:
    """`agentd call URL --turn a.wav ...`: returns 0 if every turn was answered without
    protocol violations, 1 if not, 2 if the call could not be made."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    headers = _pairs(args.header, "--header")
    if args.auth_token:
        headers["x-twilio-signature"] = twilio_signature(args.auth_token, args.signed_url or args.url)
    try:
        with tempfile.TemporaryDirectory(prefix="agentd-call-") as scratch:
            turns = _build_turns(args.turns, args.lang, Path(scratch))
        report = trio.run(partial(
            place_call, args.url, turns, business=args.business, extra_parameters=_pairs(args.param, "--param"),
            extra_headers=headers, settle_ms=args.settle_ms, gap_ms=args.gap_ms, reply_timeout_s=args.reply_timeout_s))
    except (CallerAudioError, UpstreamUnavailable, ValueError) as exc:
        print(f"agentd call: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.out:
        args.out.write_bytes(report.recording.stereo_wav())
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    clean = all(turn.answered for turn in report.turns) and len(report.turns) == len(turns)
    return 0 if clean and report.violation_count == 0 and report.ended_by == "softphone" else 1
