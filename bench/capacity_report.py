"""bench.capacity's arithmetic and printing: one load's raw facts in, figures and verdicts out. Pure."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from bench import common
from bench.common import fmt_p as _p

TARGET_CALLS = 200
TARGET_JITTER_P99_MS = 10.0
TARGET_V2V_RATIO = 1.10
TARGET_RSS_MB = 2.0
CONTAMINATED_PCT = 15.0  # other processes' share of core 0 above which a load's figures are not agentd's alone
CONTAMINATED_CORE1_PCT = 25.0  # ... of core 1 (localcloud and the softphones slow down: V2V is not agentd's alone)
TURNS_PER_CALL = 3
STAGES_SHOWN = ("endpointing", "ai_sentence", "tts_ttfb", "playout", "v2v")


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadResult:
    """One load's figures (None where a figure could not be measured)."""

    label: str
    calls: int
    ok_calls: int
    failed_calls: int
    failures: list[str]
    full_load_s: float  # how long all `calls` were up at once (0: never)
    v2v_ms: list[float]  # turns spoken while every call was up (all turns for the single-call run)
    v2v_all_ms: list[float]
    greeting_ms: list[float]
    lateness_ms: dict[str, float | None]  # p50 / p99 / max over calls (see `tx_lateness`)
    frames_sent: int | None
    tx_drops: int
    agentd_records: int
    agentd_cpu_s: float
    agentd_cpu_pct: float
    call_minutes: float
    idle_rss_kb: int
    peak_rss_kb: int
    softphone_cpu_pct: float
    softphone_lag_ms: dict[str, float | None]
    cloud_cpu_pct: float
    core0_other_pct: float  # core 0 busy time not spent by agentd (other processes, kernel)
    core1_other_pct: float  # core 1 busy time not spent by localcloud, the softphones or the orchestrator
    agentd_main_thread_cpu_s: float  # of agentd_cpu_s: the Trio thread (the rest: gRPC bridge, workers)
    agentd_main_thread_waited_s: float  # the Trio thread's time runnable but waiting for core 0
    stages_ms: dict[str, list[float]]  # agentd's turn records: stage -> values
    gc_pauses_ms: list[float] | None  # agentd's garbage collections >= 5 ms (None: not watched)
    speculation: dict[str, int]  # agentd's turn records: outcome -> turns

    @property
    def contaminated(self) -> bool:
        return self.core0_other_pct > CONTAMINATED_PCT or self.core1_other_pct > CONTAMINATED_CORE1_PCT

    @property
    def cpu_s_per_call_minute(self) -> float | None:
        return self.agentd_cpu_s / self.call_minutes if self.call_minutes else None

    @property
    def rss_mb_per_call(self) -> float:
        return (self.peak_rss_kb - self.idle_rss_kb) / 1024 / self.calls

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"contaminated": self.contaminated, "cpu_s_per_call_minute": self.cpu_s_per_call_minute,
                               "rss_mb_per_call": self.rss_mb_per_call}


def call_failure(call: dict) -> str | None:
    """Why a softphone call counts as failed, or None."""
    if call.get("error"):
        return call["error"]
    if call["violations"]:
        return f"{call['violations']} protocol violations"
    if call["greeting_ms"] is None:
        return "no greeting"
    if len(call["turns"]) != TURNS_PER_CALL or not all(t["answered"] for t in call["turns"]):
        # The agent may end the call itself after the caller's goodbye (end_call): only early is a failure.
        return "agent hung up early" if call["ended_by"] != "softphone" else "a turn was not answered"
    return None


def _full_load_window(calls: list[dict]) -> tuple[float, float]:
    """(from, to) wall-clock seconds while every call was up; from >= to when they never all were."""
    starts = [c["started_at"] for c in calls]
    ends = [c["started_at"] + c.get("total_call_ms", 0) / 1000 for c in calls]
    return (max(starts), min(ends)) if calls else (0.0, 0.0)


def answered_turns(calls: list[dict]) -> list[tuple[float, float]]:
    """(wall-clock end of the caller's speech, V2V ms) of every answered turn."""
    return [(c["started_at"] + t["speech_end_ms"] / 1000, t["v2v_ms"])
            for c in calls for t in c["turns"] if t["v2v_ms"] is not None]


def _turn_v2v(calls: list[dict], window: tuple[float, float] | None) -> list[float]:
    """V2V of every answered turn whose speech ended inside `window` (None: all of them)."""
    return [ms for at, ms in answered_turns(calls) if window is None or window[0] <= at <= window[1]]


def frames_sent(call_records: list[dict]) -> int | None:
    """Frames agentd sent over all calls; None when no call record carries frames_sent."""
    frames = [r["frames_sent"] for r in call_records if "frames_sent" in r]
    return sum(frames) if frames else None


def tx_lateness(call_records: list[dict]) -> dict[str, float | None]:
    """Aggregate agentd's per-call tx_lateness_ms {p50, p99, max}.

    The records carry per-call percentiles, not samples, so: p50 = median of
    the per-call p50s, p99 = 99th percentile of the per-call p99s (a call's
    worst 1% is never averaged away), max = the largest per-call max.
    """
    per_call = [r["tx_lateness_ms"] for r in call_records if isinstance(r.get("tx_lateness_ms"), dict)]
    if not per_call:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": common.percentile([c.get("p50") for c in per_call], 50),
            "p99": common.percentile([c.get("p99") for c in per_call], 99),
            "max": max((c.get("max") or 0.0) for c in per_call)}


def _stages(turn_records: list[dict]) -> dict[str, list[float]]:
    stages: dict[str, list[float]] = {}
    for record in turn_records:
        for name in STAGES_SHOWN:
            if name in record.get("stages_ms", {}):
                stages.setdefault(name, []).append(record["stages_ms"][name])
    return stages


def analyse_load(*, label: str, calls: int, workers: list[dict], call_records: list[dict],
                 turn_records: list[dict], agentd_cpu_s: float,
                 cloud_cpu_s: float, wall_s: float, idle_rss_kb: int, peak_rss_kb: int,
                 core0_other_pct: float, core1_other_pct: float, agentd_main_thread_cpu_s: float,
                 agentd_main_thread_waited_s: float, gc_pauses_ms: list[float] | None = None) -> LoadResult:
    """Turn one load's raw facts into its figures."""
    placed = [c for w in workers for c in w["calls"]]
    failures = [f for f in map(call_failure, placed) if f]
    answered = [c for c in placed if not c.get("error")]
    window = _full_load_window(answered) if label != "single" else None
    calling_s = max((w["wall_s"] for w in workers), default=wall_s) or wall_s
    return LoadResult(
        label=label, calls=calls, ok_calls=len(placed) - len(failures),
        failed_calls=len(failures) + calls - len(placed),
        failures=failures[:10],
        full_load_s=max(0.0, window[1] - window[0]) if window else 0.0,
        v2v_ms=_turn_v2v(answered, window), v2v_all_ms=_turn_v2v(answered, None),
        greeting_ms=[c["greeting_ms"] for c in answered if c.get("greeting_ms") is not None],
        lateness_ms=tx_lateness(call_records), frames_sent=frames_sent(call_records),
        tx_drops=sum(r.get("tx_drops", 0) for r in call_records), agentd_records=len(call_records),
        agentd_cpu_s=agentd_cpu_s, agentd_cpu_pct=100 * agentd_cpu_s / calling_s,
        call_minutes=sum(c.get("total_call_ms", 0) for c in answered) / 60000,
        idle_rss_kb=idle_rss_kb, peak_rss_kb=peak_rss_kb,
        softphone_cpu_pct=sum(100 * w["cpu_s"] / w["wall_s"] for w in workers if w["wall_s"]),
        softphone_lag_ms={q: max((w["loop_lag_ms"].get(q) or 0.0 for w in workers), default=None)
                          for q in ("50", "99", "100")},
        cloud_cpu_pct=100 * cloud_cpu_s / calling_s, core0_other_pct=core0_other_pct,
        core1_other_pct=core1_other_pct,
        agentd_main_thread_cpu_s=agentd_main_thread_cpu_s, agentd_main_thread_waited_s=agentd_main_thread_waited_s,
        stages_ms=_stages(turn_records),
        speculation=dict(Counter(r.get("speculation", "none") for r in turn_records)), gc_pauses_ms=gc_pauses_ms)


# -- printing -------------------------------------------------------------------------------------------


def v2v_ratio(result: LoadResult, baseline: LoadResult | None) -> float | None:
    load, single = common.percentile(result.v2v_ms, 95), baseline and common.percentile(baseline.v2v_ms, 95)
    return load / single if load and single else None


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}" if whole else "-"


def print_load(result: LoadResult, baseline: LoadResult | None) -> None:
    late = result.lateness_ms
    jitter_ok = None if late["p99"] is None else late["p99"] <= TARGET_JITTER_P99_MS
    print(f"\n== load {result.label}: {result.calls} calls, {result.ok_calls} ok, {result.failed_calls} failed; "
          f"all up at once for {result.full_load_s:.0f} s ({len(result.v2v_ms)} turns in that window)")
    print(f"  TX lateness ms (agentd)  p50 {common.fmt(late['p50'], 1)}  p99 {common.fmt(late['p99'], 1)}  "
          f"max {common.fmt(late['max'], 1)}   target p99 <= {TARGET_JITTER_P99_MS:g}: {common.verdict(jitter_ok)}"
          + ("" if late["p99"] is not None else "  (agentd's call records carry no tx_lateness_ms)"))
    ratio = v2v_ratio(result, baseline)
    versus = ("" if baseline is None else f"   vs single p95 {_p(baseline.v2v_ms, 95)}: "
              f"x{common.fmt(ratio, 2)}  target <= x{TARGET_V2V_RATIO:.2f}: "
              f"{common.verdict(None if ratio is None else ratio <= TARGET_V2V_RATIO)}")
    print(f"  V2V ms (softphone)       p50 {_p(result.v2v_ms, 50)}  p95 {_p(result.v2v_ms, 95)}  "
          f"max {_p(result.v2v_ms, 100)}{versus}")
    print("  agentd stages ms p50/p95 " + " | ".join(
        f"{name} {_p(values, 50)}/{_p(values, 95)}" for name, values in result.stages_ms.items())
        + f"; speculation per turn {result.speculation}")
    print(f"  greeting ms              p50 {_p(result.greeting_ms, 50)}  p95 {_p(result.greeting_ms, 95)}  "
          f"max {_p(result.greeting_ms, 100)}")
    print(f"  agentd CPU               {result.agentd_cpu_pct:.0f} % of core 0 (others on core 0: "
          f"{result.core0_other_pct:.0f} %); "
          f"{common.fmt(result.cpu_s_per_call_minute, 2)} CPU-s per call-minute ({result.call_minutes:.1f} call-min); "
          f"Trio thread {_share(result.agentd_main_thread_cpu_s, result.agentd_cpu_s)} %, other threads (gRPC bridge, "
          f"workers) the rest; the Trio thread waited {result.agentd_main_thread_waited_s:.1f} s in all for core 0")
    print(f"  agentd RSS               idle {result.idle_rss_kb / 1024:.0f} MB, peak {result.peak_rss_kb / 1024:.0f} MB"
          f" -> {result.rss_mb_per_call:.2f} MB per call   target <= {TARGET_RSS_MB:g}: "
          f"{common.verdict(result.rss_mb_per_call <= TARGET_RSS_MB)}")
    print(f"  frames                   sent {result.frames_sent if result.frames_sent is not None else 'n/a'}, "
          f"dropped (tx_drops) {result.tx_drops}; agentd call records {result.agentd_records}/{result.calls}")
    lag = result.softphone_lag_ms
    print(f"  core 1                   softphones {result.softphone_cpu_pct:.0f} % CPU (loop lag p99 "
          f"{common.fmt(lag['99'], 1)} ms, max {common.fmt(lag['100'], 0)} ms), localcloud "
          f"{result.cloud_cpu_pct:.0f} %: {result.softphone_cpu_pct + result.cloud_cpu_pct:.0f} % of one core "
          f"(others on core 1: {result.core1_other_pct:.0f} %)")
    if result.gc_pauses_ms is not None:
        pauses = result.gc_pauses_ms
        print(f"  agentd GC pauses >= 5 ms {len(pauses)}, longest {common.fmt(max(pauses, default=None))} ms, "
              f"total {sum(pauses):.0f} ms")
    for failure in result.failures[:5]:
        print(f"  FAILED: {failure}")
    if result.contaminated:
        print(f"  WARNING: other processes used {result.core0_other_pct:.0f} % of core 0 and "
              f"{result.core1_other_pct:.0f} % of core 1 during this load: its latency figures are not agentd's alone")


def print_summary(results: list[LoadResult], *, machine: dict, delays: common.Delays) -> None:
    if not results:
        return
    single, loads = results[0], results[1:]
    print(f"\n== summary ({common.format_machine(machine)}; STT final {delays.stt_final_ms} ms, LLM TTFT "
          f"{delays.llm_ttft_ms} ms at {delays.llm_tokens_per_s:g} tok/s, TTS TTFB {delays.tts_ttfb_ms} ms)")
    print(f"single call: V2V p50 {_p(single.v2v_ms, 50)} p95 {_p(single.v2v_ms, 95)} ms "
          f"({len(single.v2v_ms)} turns); {common.fmt(single.cpu_s_per_call_minute, 2)} CPU-s per call-minute")
    print("| calls | failed | TX lateness p50/p99/max ms | V2V p95 ms (x single) | CPU-s/call-min | agentd CPU % "
          "| RSS MB/call | drops | core 1 % | others on core 0 / 1 % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in loads:
        late = r.lateness_ms
        print(f"| {r.calls} | {r.failed_calls} | {common.fmt(late['p50'], 1)}/{common.fmt(late['p99'], 1)}/"
              f"{common.fmt(late['max'], 0)} | {_p(r.v2v_ms, 95)} (x{common.fmt(v2v_ratio(r, single), 2)}) | "
              f"{common.fmt(r.cpu_s_per_call_minute, 2)} | {r.agentd_cpu_pct:.0f} | {r.rss_mb_per_call:.2f} | "
              f"{r.tx_drops} | {r.softphone_cpu_pct + r.cloud_cpu_pct:.0f} | {r.core0_other_pct:.0f} / {r.core1_other_pct:.0f} |")
    good = [r.calls for r in loads if _meets_targets(r, single)]
    print(f"targets: >= {TARGET_CALLS} calls with TX lateness p99 <= {TARGET_JITTER_P99_MS:g} ms, V2V p95 within "
          f"{(TARGET_V2V_RATIO - 1) * 100:.0f} % of a single call, RSS <= {TARGET_RSS_MB:g} MB per call, no failures: "
          f"largest load meeting all: {max(good) if good else 'none'} -> "
          f"{common.verdict(bool(good) and max(good) >= TARGET_CALLS)}")


def _meets_targets(result: LoadResult, single: LoadResult) -> bool:
    late, ratio = result.lateness_ms["p99"], v2v_ratio(result, single)
    return (result.failed_calls == 0 and late is not None and late <= TARGET_JITTER_P99_MS
            and ratio is not None and ratio <= TARGET_V2V_RATIO and result.rss_mb_per_call <= TARGET_RSS_MB)
