"""Per-turn latency timelines, log lines, and JSONL telemetry records.

A call driver stamps named moments of each turn on a `TurnTimeline` (Trio
clock seconds, as read by the driver: this module never reads a clock), then:

* `TurnTimeline.stages()` derives the latency of each pipeline stage in ms;
* `TurnTimeline.to_record` makes the turn's JSON record, and `format_timeline`
  renders such a record for a human;
* `format_stats_line` is the per-call once-a-second health line;
* `JsonlSink` appends turn and call records to daily JSONL files without ever
  blocking a call: records go through a bounded memory channel (full = drop
  and count) and one task writes them, in batches, from a worker thread.
  Each record gets `time`, the ISO 8601 UTC moment it was emitted;
* `prune_daily` deletes files older than `telemetry.keep_days`.
"""

import datetime
import json
import logging
import math
import os
import re
import types
from collections.abc import Callable, Mapping
from typing import Any

import trio

__all__ = ["STAGES", "TIMELINE_STAMPS", "JsonlSink", "TurnTimeline", "format_stats_line", "format_timeline",
           "prune", "prune_daily", "utc_now_iso"]

log = logging.getLogger(__name__)

# In pipeline order.  `greeting_started` is stamped when the first greeting frame is sent;
# `turn_committed` when agentd takes the caller's turn (a speculative draft's ai_start is earlier).
TIMELINE_STAMPS = (
    "ws_connected", "greeting_started", "greeting_last_frame_sent", "stt_stream_opened",
    "speech_start", "speech_end", "first_partial", "final_text", "turn_committed", "ai_start", "ai_first_token",
    "ai_first_sentence", "tts_start", "tts_first_audio", "first_reply_frame_sent",
)

# stage -> (from stamp, to stamp).  The table is the definition of each stage.
STAGES: Mapping[str, tuple[str, str]] = types.MappingProxyType({
    "greeting": ("ws_connected", "greeting_started"),              # per call: until the caller hears us
    "stt_partial": ("speech_start", "first_partial"),
    "stt_final": ("speech_end", "final_text"),
    "endpointing": ("speech_end", "turn_committed"),               # end of speech -> we commit the turn
    "ai_ttft": ("ai_start", "ai_first_token"),
    "ai_sentence": ("ai_start", "ai_first_sentence"),
    "tts_ttfb": ("tts_start", "tts_first_audio"),
    "playout": ("tts_first_audio", "first_reply_frame_sent"),
    "v2v": ("speech_end", "first_reply_frame_sent"),               # voice-to-voice, what the caller feels
})


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


class TurnTimeline:
    """Named moments of one turn (or of a call's greeting), in Trio-clock seconds."""

    def __init__(self) -> None:
        self._stamps: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<TurnTimeline {self._stamps}>"

    def stamp(self, name: str, at: float, *, first_only: bool = True) -> None:
        """Record moment `name` at Trio time `at`; with first_only, a later stamp of it is ignored.

        Raises ValueError for a name not in TIMELINE_STAMPS (a typo would silently lose data).
        """
        if name not in TIMELINE_STAMPS:
            raise ValueError(f"unknown timeline stamp {name!r}; expected one of TIMELINE_STAMPS")
        if not (first_only and name in self._stamps):
            self._stamps[name] = at

    def get(self, name: str) -> float | None:
        """The Trio time of `name`, or None if it was never stamped."""
        return self._stamps.get(name)

    def stages(self) -> dict[str, float]:
        """Stage durations in ms (rounded to 0.1), only for stages whose two stamps both exist."""
        return {stage: _ms(self._stamps[end] - self._stamps[start])
                for stage, (start, end) in STAGES.items()
                if start in self._stamps and end in self._stamps}

    def to_record(self, call_sid: str, turn: int, t0: float, extra: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON-ready record: call_sid, turn, stamps_ms, stages_ms, plus `extra`'s keys.

        `stamps_ms` are in pipeline order, in ms since `t0` (the call's start, so
        the turns of one call line up), rounded to 0.1 ms.  Raises ValueError if
        `extra` would overwrite one of the record's own keys.
        """
        stamps = {name: _ms(self._stamps[name] - t0) for name in TIMELINE_STAMPS if name in self._stamps}
        record = {"call_sid": call_sid, "turn": turn, "stamps_ms": stamps, "stages_ms": self.stages()}
        clash = record.keys() & extra.keys()
        if clash:
            raise ValueError(f"extra keys clash with the record's own: {sorted(clash)}")
        return {**record, **extra}


def format_timeline(record: Mapping[str, Any], *, per_line: int = 5) -> str:
    """A compact multi-line rendering of one turn record (from `TurnTimeline.to_record`), for humans.

    Stamps are in ms relative to `speech_end` (or to the call's start when the
    record has no speech_end, e.g. the greeting), in time order, `per_line` to
    a line; the last line lists the stages.  Example::

          speech_start -1480 | speech_end +0 | final_text +312 | ai_start +320 | ai_first_token +680
          tts_start +702 | tts_first_audio +950 | first_reply_frame_sent +1040 | v2v 1040 ms
          stages ms: stt_partial 150 | stt_final 312 | endpointing 320 | ai_ttft 360 | ...
    """
    stamps, stages = record.get("stamps_ms", {}), record.get("stages_ms", {})
    origin = stamps.get("speech_end", 0.0)
    parts = [f"{name} {at - origin:+.0f}" for name, at in sorted(stamps.items(), key=lambda item: item[1])]
    if "v2v" in stages:
        parts.append(f"v2v {stages['v2v']:.0f} ms")
    lines = ["  " + " | ".join(parts[i:i + per_line]) for i in range(0, len(parts), per_line)]
    if stages:
        lines.append("  stages ms: " + " | ".join(f"{name} {ms:.0f}" for name, ms in stages.items()))
    return "\n".join(lines) or "  (no stamps)"


def format_stats_line(*, fps: float | None, queue: int | None, drops: int | None, stt_partial_s: float | None,
                      stt_final_s: float | None, ai_s: float | None, tts_s: float | None,
                      total_s: float | None) -> str:
    """The per-call health line; None renders as "-".

    ``[TX] fps=50 q=5 drops=0 | [STT] p=0.70s f=1.30s | [AI]=0.40s | [TTS]=0.30s total=1.90s``
    """
    def count(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}s"

    return (f"[TX] fps={count(fps)} q={count(queue)} drops={count(drops)} | "
            f"[STT] p={secs(stt_partial_s)} f={secs(stt_final_s)} | [AI]={secs(ai_s)} | "
            f"[TTS]={secs(tts_s)} total={secs(total_s)}")


def _utc_day() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")


def utc_now_iso() -> str:
    """Now, as ISO 8601 UTC with milliseconds: ``2026-12-05T01:22:14.123Z``."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_DAILY_FILE = re.compile(r"(?:turns|calls)-(\d{8})\.jsonl")


def prune(directory: str, keep_days: int, today: datetime.date) -> list[str]:
    """Delete the sink's daily files dated more than ``keep_days`` before ``today``; their names.

    Only files this sink writes (turns-/calls-YYYYMMDD.jsonl) are touched.
    """
    oldest = today - datetime.timedelta(days=keep_days)
    removed = []
    for name in sorted(os.listdir(directory)):
        match = _DAILY_FILE.fullmatch(name)
        if match and datetime.datetime.strptime(match[1], "%Y%m%d").date() < oldest:
            os.remove(os.path.join(directory, name))
            removed.append(name)
    return removed


async def prune_daily(directory: str, keep_days: int) -> None:
    """`prune` now and once a day, until cancelled; nothing when telemetry or pruning is off."""
    if not directory or keep_days <= 0:
        return
    while True:
        today = datetime.datetime.now(datetime.timezone.utc).date()
        try:
            removed = await trio.to_thread.run_sync(prune, directory, keep_days, today)
        except OSError as exc:
            log.warning("telemetry: pruning %s failed: %s", directory, exc)
        else:
            if removed:
                log.info("telemetry: deleted %d files older than %d days", len(removed), keep_days)
        await trio.sleep(24 * 3600)


class JsonlSink:
    """Appends turn and call records to `<dir>/turns-YYYYMMDD.jsonl` and `<dir>/calls-YYYYMMDD.jsonl`.

    `emit_*` never blocks and never raises: when the channel is full (the disk
    is slower than the calls) the record is dropped and counted in `dropped`.
    The sink owns a record once emitted (it is serialized later, off-thread;
    values JSON cannot encode are written as their str()).
    An empty `directory` disables the sink: emits are no-ops and `run` returns
    at once.  The day in the file name is the UTC date when a batch is written.
    """

    def __init__(self, directory: str, *, capacity: int = 1000, max_batch: int = 200,
                 day: Callable[[], str] = _utc_day) -> None:
        self.directory = directory
        self.dropped = 0
        self.written = 0
        self._max_batch = max_batch
        self._day = day
        self._send, self._receive = trio.open_memory_channel[tuple[str, Mapping[str, Any]]](capacity)

    @property
    def enabled(self) -> bool:
        return bool(self.directory)

    def emit_turn(self, record: Mapping[str, Any]) -> None:
        """Queue a turn record for turns-YYYYMMDD.jsonl (dropped and counted if the queue is full)."""
        self._emit("turns", record)

    def emit_call(self, record: Mapping[str, Any]) -> None:
        """Queue a call record for calls-YYYYMMDD.jsonl (dropped and counted if the queue is full)."""
        self._emit("calls", record)

    def close(self) -> None:
        """No more records: `run` writes what is queued, then returns.  Later emits count as dropped."""
        self._send.close()

    def _emit(self, kind: str, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self._send.send_nowait((kind, {"time": utc_now_iso(), **record}))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.dropped += 1

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Create the directory, then write queued records until `close()` (or cancellation).

        Start it with ``await nursery.start(sink.run)``: a directory that cannot
        be created fails the start.  On cancellation, records already queued are
        still written (shielded), so a clean shutdown loses nothing.
        """
        if not self.enabled:
            task_status.started()
            return
        await trio.to_thread.run_sync(lambda: os.makedirs(self.directory, exist_ok=True))
        task_status.started()
        try:
            async for first in self._receive:
                await self._write([first, *self._drain(self._max_batch - 1)])
        finally:
            await self._write(self._drain(math.inf))

    def _drain(self, limit: float) -> list[tuple[str, Mapping[str, Any]]]:
        """Up to `limit` records that are queued right now, without waiting."""
        batch = []
        while len(batch) < limit:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return batch

    async def _write(self, batch: list[tuple[str, Mapping[str, Any]]]) -> None:
        if not batch:
            return
        try:
            # Shielded: a batch taken off the channel is written even if we are being
            # cancelled (the thread cannot be interrupted anyway; a write is short).
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._append, batch)
        except (OSError, ValueError) as exc:
            # Telemetry must never take calls down: a full disk (or a circular
            # record) costs this batch, loudly.
            self.dropped += len(batch)
            log.warning("telemetry: dropped %d records: %s", len(batch), exc)
        else:
            self.written += len(batch)

    def _append(self, batch: list[tuple[str, Mapping[str, Any]]]) -> None:
        """Worker thread: serialize and append the batch, one file open per kind."""
        day = self._day()
        lines: dict[str, list[str]] = {}
        for kind, record in batch:
            lines.setdefault(kind, []).append(json.dumps(record, ensure_ascii=False, separators=(",", ":"),
                                                         default=str))
        for kind, kind_lines in lines.items():
            path = os.path.join(self.directory, f"{kind}-{day}.jsonl")
            with open(path, "a", encoding="utf-8", errors="backslashreplace") as fh:  # peer text may hold lone surrogates
                fh.write("\n".join(kind_lines) + "\n")
