"""``agentd report DIR``: latency percentiles and failure rates from a telemetry directory.

Reads the sink's ``turns-*.jsonl`` and ``calls-*.jsonl`` (agentd.telemetry),
optionally only records since a moment (``--since``, against each record's
ISO UTC ``time``) and of one business (``--business``), and prints:

* p50 / p95 / max of each pipeline stage and of voice-to-voice (V2V);
* how calls ended, the share of failed turns and of each fallback;
* the speculation hit rate (drafts whose words the caller really ended with).

Percentiles interpolate linearly between the two nearest turns (numpy's
default), so p50 of 100, 200, 300, 400 ms is 250 ms.

``--plot out.png`` also draws the median turn as a waterfall and the V2V
histogram (matplotlib: ``pip install 'agentd[plot]'``).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agentd.telemetry import STAGES

__all__ = ["Report", "build_report", "format_report", "load_records", "main"]

FALLBACK_KINDS = ("filler", "apology", "stt_recognize", "mark_timeout")


@dataclass(frozen=True, slots=True, kw_only=True)
class StageStats:
    count: int
    p50_ms: float
    p95_ms: float
    max_ms: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    calls: int
    turns: int
    end_reasons: Mapping[str, int]
    stages: Mapping[str, StageStats]   # in pipeline order, v2v last
    failed_turns: int
    fallbacks: Mapping[str, int]       # kind -> turns that took it
    speculation: Mapping[str, int]     # outcome (hit, miss, late, none) -> turns
    median_stamps_ms: Mapping[str, float]  # the median turn: each stamp's median, ms after speech_end


def _parse_time(text: str) -> datetime.datetime:
    """An ISO 8601 date or date-time; naive ones are UTC."""
    moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def load_records(directory: str, kind: str, *, since: datetime.datetime | None = None,
                 business: str | None = None) -> list[dict[str, Any]]:
    """The `kind` ("turns" or "calls") records of `directory`, filtered; unparsable lines are skipped."""
    records = []
    for path in sorted(glob.glob(os.path.join(directory, f"{kind}-*.jsonl"))):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if business is not None and record.get("business") != business:
                    continue
                if since is not None and ("time" not in record or _parse_time(record["time"]) < since):
                    continue
                records.append(record)
    return records


def _stats(values: Sequence[float]) -> StageStats:
    p50, p95 = np.percentile(values, [50, 95])
    return StageStats(count=len(values), p50_ms=float(p50), p95_ms=float(p95), max_ms=float(max(values)))


def build_report(turns: Sequence[Mapping[str, Any]], calls: Sequence[Mapping[str, Any]]) -> Report:
    """Aggregate turn and call records (pure)."""
    stages = {}
    for stage in STAGES:
        values = [t["stages_ms"][stage] for t in turns if stage in t.get("stages_ms", {})]
        if stage == "greeting":
            values = [c["greeting"]["stages_ms"]["greeting"] for c in calls
                      if "greeting" in c.get("greeting", {}).get("stages_ms", {})]
        if values:
            stages[stage] = _stats(values)
    fallbacks = Counter(kind for t in turns for kind in set(t.get("fallbacks", ())))
    return Report(calls=len(calls), turns=len(turns), end_reasons=dict(Counter(c.get("end_reason", "?") for c in calls)),
                  stages=stages, failed_turns=sum(1 for t in turns if t.get("failed")),
                  fallbacks=dict(fallbacks), speculation=dict(Counter(t.get("speculation", "none") for t in turns)),
                  median_stamps_ms=_median_stamps(turns))


def _median_stamps(turns: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Each stamp's median over the turns that have it, in ms after that turn's speech_end."""
    offsets: dict[str, list[float]] = {}
    for turn in turns:
        stamps = turn.get("stamps_ms", {})
        if "speech_end" in stamps:
            for name, at in stamps.items():
                offsets.setdefault(name, []).append(at - stamps["speech_end"])
    return {name: float(np.median(values)) for name, values in offsets.items()}


def _share(part: int, whole: int) -> str:
    return f"{part} ({100 * part / whole:.1f}%)" if whole else f"{part}"


def format_report(report: Report) -> str:
    """The report as a plain-text table."""
    lines = [f"{report.calls} calls, {report.turns} turns", "",
             f"{'stage':<14}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}"]
    for stage, s in report.stages.items():
        lines.append(f"{stage:<14}{s.count:>6}{s.p50_ms:>10.0f}{s.p95_ms:>10.0f}{s.max_ms:>10.0f}")
    lines += ["", "calls ended: " + (", ".join(f"{reason} {n}" for reason, n in sorted(report.end_reasons.items()))
                                     or "-"),
              f"failed turns: {_share(report.failed_turns, report.turns)}",
              "fallbacks (turns): " + ", ".join(f"{kind} {_share(report.fallbacks.get(kind, 0), report.turns)}"
                                                for kind in sorted({*FALLBACK_KINDS, *report.fallbacks}))]
    drafted = sum(n for outcome, n in report.speculation.items() if outcome != "none")
    hits = report.speculation.get("hit", 0)
    lines.append(f"speculation: {_share(hits, drafted)} of {drafted} drafted turns hit"
                 f" ({', '.join(f'{k} {v}' for k, v in sorted(report.speculation.items()))})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="agentd report", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="server.telemetry_dir")
    parser.add_argument("--since", type=_parse_time, help="only records at or after this ISO date/time (UTC)")
    parser.add_argument("--business", help="only this business's records")
    parser.add_argument("--plot", metavar="OUT.png", help="also draw the median-turn waterfall and V2V histogram")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.directory):
        print(f"agentd report: {args.directory}: no such directory", file=sys.stderr)
        return 2
    turns = load_records(args.directory, "turns", since=args.since, business=args.business)
    calls = load_records(args.directory, "calls", since=args.since, business=args.business)
    report = build_report(turns, calls)
    print(format_report(report))
    if args.plot:
        try:
            from agentd.report_plot import plot
        except ImportError as exc:
            print(f"agentd report: --plot needs matplotlib (pip install 'agentd[plot]'): {exc}", file=sys.stderr)
            return 2
        plot(report, [t["stages_ms"]["v2v"] for t in turns if "v2v" in t.get("stages_ms", {})], args.plot)
        print(f"plot: {args.plot}")
    return 0
