"""bench.soak's arithmetic and printing: the run's raw facts in, figures and verdicts out. Pure."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from bench import common
from bench.capacity_report import answered_turns, call_failure, frames_sent, tx_lateness
from bench.common import fmt_p as _p

TARGET_GROWTH_PCT = 5.0
GROWTH_WINDOW_S = 60.0
_LOG_LEVEL = re.compile(r"^\d{4}-\d\d-\d\d \S+ (ERROR|CRITICAL|WARNING) ")


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """agentd's process, read from /proc at wall-clock time `at`."""

    at: float
    rss_kb: int
    threads: int
    fds: int
    cpu_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeline:
    """Wall-clock times of the run: first call, end of warm-up, last call start allowed."""

    start_at: float
    warmup_end: float
    until: float

    @property
    def window_s(self) -> float:
        """Length of the first/last windows compared for RSS growth (60 s, or half the measured time)."""
        return min(GROWTH_WINDOW_S, (self.until - self.warmup_end) / 2)


@dataclass(frozen=True, slots=True, kw_only=True)
class LogProblems:
    """What agentd's log says went wrong: counts, and the first few such lines."""

    errors: int  # ERROR or CRITICAL lines
    tracebacks: int
    warnings: int
    first: list[str]

    @property
    def count(self) -> int:
        return self.errors + self.tracebacks


def log_problems(lines: Iterable[str], keep: int = 10) -> LogProblems:
    """Count agentd's ERROR/CRITICAL lines, tracebacks and warnings (format of agentd.cli.setup_logging)."""
    counts: Counter[str] = Counter()
    first = []
    for line in lines:
        match = _LOG_LEVEL.match(line)
        kind = "Traceback" if "Traceback (most recent call last)" in line else match and match.group(1)
        if kind:
            counts[kind] += 1
            if kind != "WARNING" and len(first) < keep:
                first.append(line.rstrip()[:300])
    return LogProblems(errors=counts["ERROR"] + counts["CRITICAL"], tracebacks=counts["Traceback"],
                       warnings=counts["WARNING"], first=first)


@dataclass(frozen=True, slots=True, kw_only=True)
class Minute:
    """One minute of the run (minute 0 starts with the first call)."""

    minute: int
    warmup: bool
    calls_up: float | None  # mean over the samples
    rss_kb: float | None  # median over the samples
    cpu_pct: float | None  # agentd, % of one core
    threads: int | None
    fds: int | None
    v2v_p50_ms: float | None
    v2v_p95_ms: float | None
    turns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SoakResult:
    """The soak's figures (None where a figure could not be measured)."""

    slots: int
    timeline: Timeline
    placed: int
    failed: int
    failures: dict[str, int]  # reason -> calls
    agentd_alive: bool  # still running when the calls ended
    agentd_records: int
    log: LogProblems
    idle: Sample | None
    after: Sample | None  # a few seconds after the last call ended
    at_warmup_end: Sample | None
    at_end: Sample | None
    max_rss_kb: int | None
    first_window_rss_kb: float | None
    last_window_rss_kb: float | None
    calls_up_median: float | None  # after warm-up, at the sample times
    calls_up_min: int | None
    lateness_ms: dict[str, float | None]
    frames_sent: int | None
    tx_drops: int
    v2v_ms: list[float]  # turns whose speech ended after warm-up
    greeting_ms: list[float]
    agentd_cpu_pct: float | None  # after warm-up
    usage: dict[str, float | None]  # core 1 health and other processes' load (see bench.soak.usage)
    minutes: list[Minute]
    samples: list[Sample]  # raw, every --sample-s over the whole run

    @property
    def growth_pct(self) -> float | None:
        first, last = self.first_window_rss_kb, self.last_window_rss_kb
        return 100 * (last - first) / first if first and last else None

    @property
    def completed(self) -> int:
        return self.placed - self.failed

    @property
    def targets(self) -> dict[str, bool | None]:
        growth = self.growth_pct
        return {"growth": None if growth is None else growth < TARGET_GROWTH_PCT,
                "dropped": self.failed == 0 and self.agentd_alive and self.placed > 0,
                "errors": self.log.count == 0}

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"growth_pct": self.growth_pct, "completed": self.completed, "targets": self.targets}


# -- analysis ------------------------------------------------------------------------------------------


def _between(samples: list[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start <= s.at <= end]


def _median(values: list[float]) -> float | None:
    return common.percentile(values, 50)


def _cpu_pct(samples: list[Sample]) -> float | None:
    """agentd's CPU % of one core between the first and the last of `samples`."""
    if len(samples) < 2 or samples[-1].at <= samples[0].at:
        return None
    return 100 * (samples[-1].cpu_s - samples[0].cpu_s) / (samples[-1].at - samples[0].at)


def _calls_up(calls: list[dict], at: float) -> int:
    return sum(1 for c in calls if c["started_at"] <= at < c["started_at"] + c.get("total_call_ms", 0) / 1000)


def _minutes(samples: list[Sample], calls: list[dict], timeline: Timeline) -> list[Minute]:
    turns = answered_turns(calls)
    rows = []
    for minute in range(int(-(-(timeline.until - timeline.start_at) // 60))):
        start = timeline.start_at + 60 * minute
        end = min(start + 60, timeline.until)
        inside = _between(samples, start, end)
        v2v = [ms for at, ms in turns if start <= at < end]
        rows.append(Minute(
            minute=minute, warmup=start < timeline.warmup_end,
            calls_up=sum(_calls_up(calls, s.at) for s in inside) / len(inside) if inside else None,
            rss_kb=_median([s.rss_kb for s in inside]), cpu_pct=_cpu_pct(inside),
            threads=max((s.threads for s in inside), default=None), fds=max((s.fds for s in inside), default=None),
            v2v_p50_ms=common.percentile(v2v, 50), v2v_p95_ms=common.percentile(v2v, 95), turns=len(v2v)))
    return rows


def analyse(*, slots: int, timeline: Timeline, samples: list[Sample], workers: list[dict],
            call_records: list[dict], log: LogProblems, agentd_alive: bool, idle: Sample | None,
            after: Sample | None, usage: dict[str, float | None]) -> SoakResult:
    """Turn the soak's raw facts into its figures."""
    placed = [c for w in workers for c in w["calls"]]
    answered = [c for c in placed if not c.get("error")]
    failures = Counter(f for f in map(call_failure, placed) if f)
    t = timeline
    measured = _between(samples, t.warmup_end, t.until)
    first = _between(measured, t.warmup_end, t.warmup_end + t.window_s)
    last = _between(measured, t.until - t.window_s, t.until)
    up = [_calls_up(answered, s.at) for s in measured]
    return SoakResult(
        slots=slots, timeline=t, placed=len(placed), failed=sum(failures.values()), failures=dict(failures),
        agentd_alive=agentd_alive, agentd_records=len(call_records), log=log, idle=idle, after=after,
        at_warmup_end=measured[0] if measured else None, at_end=measured[-1] if measured else None,
        max_rss_kb=max((s.rss_kb for s in samples), default=None),
        first_window_rss_kb=_median([s.rss_kb for s in first]), last_window_rss_kb=_median([s.rss_kb for s in last]),
        calls_up_median=_median(up), calls_up_min=min(up, default=None),
        lateness_ms=tx_lateness(call_records), frames_sent=frames_sent(call_records),
        tx_drops=sum(r.get("tx_drops", 0) for r in call_records),
        v2v_ms=[ms for at, ms in answered_turns(answered) if at >= t.warmup_end],
        greeting_ms=[c["greeting_ms"] for c in answered if c.get("greeting_ms") is not None],
        agentd_cpu_pct=_cpu_pct(measured), usage=usage, minutes=_minutes(samples, answered, t), samples=samples)


# -- printing -------------------------------------------------------------------------------------------


def _mb(kb: float | None) -> str:
    return common.fmt(None if kb is None else kb / 1024, 1)


def _mark(ok: bool | None) -> str:
    return {True: "**met**", False: "**missed**", None: "n/a"}[ok]


def _of(sample: Sample | None, name: str) -> str:
    return "-" if sample is None else str(getattr(sample, name))


def summary_rows(r: SoakResult) -> list[tuple[str, str, str]]:
    """(measure, result, target) rows of the summary table."""
    growth, targets, late, u = r.growth_pct, r.targets, r.lateness_ms, r.usage
    failures = "; ".join(f"{n} x {why}" for why, n in r.failures.items())
    return [
        ("calls placed / completed / failed", f"{r.placed} / {r.completed} / {r.failed}"
         + (f" ({failures})" if failures else "") + ("" if r.agentd_alive else "; agentd DIED"),
         f"0 dropped calls: {_mark(targets['dropped'])}"),
        ("agentd log: ERROR+CRITICAL / Traceback lines (WARNING)",
         f"{r.log.errors} / {r.log.tracebacks} ({r.log.warnings})", f"0 errors: {_mark(targets['errors'])}"),
        (f"RSS growth after warm-up (median of the last vs the first {r.timeline.window_s:.0f} s)",
         "-" if growth is None else f"{growth:+.1f} %",
         f"< {TARGET_GROWTH_PCT:g} %: {_mark(targets['growth'])}"),
        ("agentd RSS MB: idle / end of warm-up / end / max / after the calls",
         " / ".join(_mb(s and s.rss_kb) for s in (r.idle, r.at_warmup_end, r.at_end))
         + f" / {_mb(r.max_rss_kb)} / {_mb(r.after and r.after.rss_kb)}", ""),
        ("agentd threads / open fds: idle, end of warm-up, end, after the calls",
         ", ".join(f"{_of(s, 'threads')} / {_of(s, 'fds')}" for s in (r.idle, r.at_warmup_end, r.at_end, r.after)),
         ""),
        ("calls up after warm-up: median / min (at the samples)",
         f"{common.fmt(r.calls_up_median)} / {common.fmt(r.calls_up_min)} of {r.slots}", ""),
        ("agentd call records / calls placed", f"{r.agentd_records} / {r.placed}", ""),
        ("TX lateness ms p50 / p99 / max (agentd)",
         f"{common.fmt(late['p50'], 1)} / {common.fmt(late['p99'], 1)} / {common.fmt(late['max'], 0)}", ""),
        ("TX frames sent / dropped (tx_drops)", f"{r.frames_sent} / {r.tx_drops}", ""),
        ("V2V ms p50 / p95 / max after warm-up (softphone)",
         f"{_p(r.v2v_ms, 50)} / {_p(r.v2v_ms, 95)} / {_p(r.v2v_ms, 100)} ({len(r.v2v_ms)} turns)", ""),
        ("greeting ms p50 / p95", f"{_p(r.greeting_ms, 50)} / {_p(r.greeting_ms, 95)}", ""),
        ("agentd CPU after warm-up, % of one core", common.fmt(r.agentd_cpu_pct), ""),
        ("softphones: CPU % / loop lag p99 ms; localcloud CPU %",
         f"{u['softphone_cpu_pct']:.0f} / {common.fmt(u['softphone_lag_p99_ms'], 1)}; {u['cloud_cpu_pct']:.0f}", ""),
        ("other processes' CPU, % of one core", ", ".join(f"{k} {v:.0f}" for k, v in u.items()
                                                          if k.startswith("others ")), ""),
    ]


def print_summary(r: SoakResult, *, machine: dict, delays: common.Delays, command: str, raw: str) -> None:
    """The Markdown section for bench/RESULTS.md: the summary table and the per-minute table."""
    t = r.timeline
    print(f"\n## bench.soak\n\nMachine: {common.format_machine(machine)}.\n"
          f"Command: `{command}` ({r.slots} calls held up for {(t.until - t.start_at) / 60:g} min, the first "
          f"{(t.warmup_end - t.start_at) / 60:g} min warm-up; STT final {delays.stt_final_ms} ms, LLM TTFT "
          f"{delays.llm_ttft_ms} ms at {delays.llm_tokens_per_s:g} tok/s, TTS TTFB {delays.tts_ttfb_ms} ms; "
          f"raw: {raw}).\n")
    print("| measure | result | target |\n|---|---|---|")
    for measure, result, target in summary_rows(r):
        print(f"| {measure} | {result} | {target} |")
    print("\n| minute | calls up | RSS MB | agentd CPU % | threads | fds | V2V p50 / p95 ms (turns) |\n"
          "|---|---|---|---|---|---|---|")
    for m in r.minutes:
        print(f"| {m.minute}{' (warm-up)' if m.warmup else ''} | {common.fmt(m.calls_up)} | {_mb(m.rss_kb)} | "
              f"{common.fmt(m.cpu_pct)} | {common.fmt(m.threads)} | {common.fmt(m.fds)} | "
              f"{common.fmt(m.v2v_p50_ms)} / {common.fmt(m.v2v_p95_ms)} ({m.turns}) |")
    if r.log.first:
        print("\nagentd log, first problems:\n" + "\n".join(f"    {line}" for line in r.log.first[:5]))
    print("\nTargets: " + ", ".join(f"{name} {_mark(ok)}" for name, ok in r.targets.items()))
