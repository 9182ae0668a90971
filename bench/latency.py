"""``python -m bench.latency``: voice-to-voice latency of scripted calls, per feature configuration.

For each STT profile (localcloud holding finals back 880 ms, Google-like, or
150 ms) one localcloud child process serves STT (script engine), TTS (espeak-ng)
and the LLM (keyword rules) with injected delays: LLM TTFT 350 ms at 60
tokens/s, TTS TTFB 120 ms. For each configuration of {speculation,
early finalize} agentd runs in this process (``serve`` with production
config plus the overrides), and N calls of three espeak-ng turns are placed
with the softphone, a few at a time (latency, not load: calls are staggered,
at most --parallel at once). Measured:

* softphone side: greeting latency and voice-to-voice (V2V) per turn;
* agentd's own turn and call records: stage durations, speculation outcomes,
  and the V2V budget of bench/overhead.py (agent-added overhead).

Everything stays on 127.0.0.1; every loop is bounded; results go to stdout and
to a JSON file under var/bench/.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from agentd.cli import setup_logging
from agentd.config import Config, load_config
from agentd.errors import UpstreamUnavailable
from agentd.server import serve
from agentd.testbed.softphone import CallReport, place_call
from agentd.testbed.softphone.script import CallerTurn
from agentd.text import normalize_for_match
from bench import common
from bench.common import fmt_p as _p
from bench.overhead import RecordError, turn_budget
from bench.service_times import PhraseCosts, phrase_costs

log = logging.getLogger("bench.latency")

PHRASES = (common.HOURS, common.PRICE, common.BYE)
CALL_TIMEOUT_S = 180.0  # a call of three turns takes ~31 s; anything near this is stuck
TARGET_GREETING_MS = 50
TARGET_OVERHEAD_P95_MS = 20
TARGET_RATIO = 0.6
BACKGROUND_LIMIT_PCT = 25.0  # other processes' CPU above which a configuration's figures are not agentd's alone


@dataclass(frozen=True, slots=True, kw_only=True)
class Variant:
    stt_final_ms: int
    spec: bool
    early_finalize: bool

    @property
    def name(self) -> str:
        on = {True: "on", False: "off"}
        return f"stt {self.stt_final_ms} | spec {on[self.spec]} | early finalize {on[self.early_finalize]}"


MATRIX = (
    Variant(stt_final_ms=880, spec=True, early_finalize=True),
    Variant(stt_final_ms=880, spec=False, early_finalize=False),
    Variant(stt_final_ms=880, spec=True, early_finalize=False),
    Variant(stt_final_ms=880, spec=False, early_finalize=True),
    Variant(stt_final_ms=150, spec=True, early_finalize=True),
    Variant(stt_final_ms=150, spec=False, early_finalize=False),
)


# -- running one configuration --------------------------------------------------------------------


@dataclass
class VariantRun:
    """What one configuration produced: the softphones' reports and agentd's records."""

    reports: list[CallReport]
    records: list[dict]
    failed: list[str]


async def run_variant(config: Config, turns: list[CallerTurn], *, calls: int, parallel: int,
                      stagger_s: float) -> VariantRun:
    """Start agentd with `config`, place `calls` calls (at most `parallel` at once), stop agentd."""
    run = VariantRun(reports=[], records=[], failed=[])
    limiter = trio.CapacityLimiter(parallel)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(serve, config, observers=[run.records.append]))
        url = f"ws://127.0.0.1:{server.port}{config.server.path}"
        async with trio.open_nursery() as callers:
            for index in range(calls):
                callers.start_soon(_one_call, url, turns, limiter, index * stagger_s if index < parallel else 0, run)
        await trio.sleep(0.3)  # let agentd record the last call's end
        nursery.cancel_scope.cancel()
    return run


async def _one_call(url: str, turns: list[CallerTurn], limiter: trio.CapacityLimiter, delay_s: float,
                    run: VariantRun) -> None:
    await trio.sleep(delay_s)
    async with limiter:
        with trio.move_on_after(CALL_TIMEOUT_S) as guard:
            try:
                run.reports.append(await place_call(url, turns, business=common.BUSINESS))
            except UpstreamUnavailable as exc:
                run.failed.append(str(exc))
        if guard.cancelled_caught:
            run.failed.append(f"call still running after {CALL_TIMEOUT_S:.0f} s")


# -- analysis ---------------------------------------------------------------------------------------


def match_record(report: CallReport, index: int, records: list[dict]) -> dict | None:
    """agentd's record of the call's turn whose transcript is phrase `index` (the last, if retried)."""
    wanted = normalize_for_match(PHRASES[index].script)
    found = [r for r in records if r.get("kind") == "turn" and r.get("call_sid") == report.call_sid
             and normalize_for_match(r.get("caller_text") or "") == wanted and not r.get("interrupted")]
    return found[-1] if found else None


def analyse(variant: Variant, run: VariantRun, costs: list[PhraseCosts], config: Config,
            delays: common.Delays) -> dict:
    """Everything printed about one configuration, as plain JSON-ready data."""
    rows, problems = [], Counter()
    for report in run.reports:
        # The agent may end the call after the caller's goodbye (end_call): early is the problem.
        early = report.ended_by != "softphone" and not all(turn.answered for turn in report.turns)
        if early or report.violation_count:
            problems["call ended early by the agent, or protocol violations"] += 1
        for index, turn in enumerate(report.turns):
            rows.append(_turn_row(report, index, turn, run.records, costs[index], config, delays, problems))
    turn_records = [r for r in run.records if r.get("kind") == "turn"]
    call_records = [r for r in run.records if r.get("kind") == "call"]
    return {
        "variant": asdict(variant), "name": variant.name, "calls": len(run.reports), "failed": run.failed,
        "greeting_ms": [r.greeting_latency_ms for r in run.reports],
        "turns": rows, "problems": dict(problems),
        "stages_ms": _stage_lists(turn_records),
        "speculation_calls": dict(sum((Counter(r.get("speculation", {})) for r in call_records), Counter())),
        "speculation_turns": dict(Counter(r.get("speculation", "none") for r in turn_records
                                          if not r.get("interrupted"))),
        "tx_drops": sum(r.get("tx_drops", 0) for r in call_records),
        "records": run.records,  # agentd's own, for questions this printout does not answer
    }


def _turn_row(report: CallReport, index: int, turn, records: list[dict], costs: PhraseCosts, config: Config,
              delays: common.Delays, problems: Counter) -> dict:
    row = {"phrase": index, "v2v": turn.v2v_ms, "speculation": None, "budget": None}
    if turn.v2v_ms is None:
        problems["turn not answered"] += 1
        return row
    record = match_record(report, index, records)
    if record is None:
        problems["no agentd record with the phrase's transcript"] += 1
        return row
    row["speculation"] = record.get("speculation", "none")
    try:
        row["budget"] = asdict(turn_budget(turn.v2v_ms, record, costs, final_timeout_ms=config.stt.final_timeout_ms,
                                           tts_ttfb_ms=delays.tts_ttfb_ms))
    except RecordError as exc:
        problems[str(exc)] += 1
    return row


def _stage_lists(turn_records: list[dict]) -> dict[str, list[float]]:
    """Stage durations of answered turns, minus two artefacts of the records' stamps.

    stt_final is skipped when final_text precedes speech_start (a late final of
    the turn before, stamped into this one).
    """
    stages: dict[str, list[float]] = {}
    for record in turn_records:
        if record.get("interrupted"):
            continue
        stamps = record.get("stamps_ms", {})
        for name, ms in record.get("stages_ms", {}).items():
            if name == "stt_final" and stamps.get("final_text", 0) < stamps.get("speech_start", 0):
                continue
            stages.setdefault(name, []).append(ms)
    return stages


# -- printing ----------------------------------------------------------------------------------------


def _budget_values(result: dict, key: str) -> list[float]:
    return [row["budget"][key] for row in result["turns"] if row["budget"]]


def _present(result: dict, key: str) -> list[float]:
    return [value for value in _budget_values(result, key) if value is not None]


def v2v_p50(result: dict) -> float | None:
    return common.percentile([row["v2v"] for row in result["turns"]], 50)


def print_variant(result: dict) -> None:
    v2v = [row["v2v"] for row in result["turns"]]
    greeting = result["greeting_ms"]
    answered = sum(1 for value in v2v if value is not None)
    print(f"\n== {result['name']}: {result['calls']} calls, {answered}/{len(v2v)} turns answered, "
          f"{len(result['failed'])} calls failed, tx drops {result['tx_drops']}; other processes on this machine "
          f"used {result['background_pct']:.0f} % of a core meanwhile")
    g95 = common.percentile(greeting, 95)
    print(f"  greeting ms       p50 {_p(greeting, 50):>5}  p95 {_p(greeting, 95):>5}             "
          f"target p95 <= {TARGET_GREETING_MS}: {common.verdict(None if g95 is None else g95 <= TARGET_GREETING_MS)}")
    print(f"  V2V ms            p50 {_p(v2v, 50):>5}  p95 {_p(v2v, 95):>5}  max {_p(v2v, 100):>5}")
    _print_overhead(result)
    parts = ("required_silence", "stt_wait", "llm_wait", "tts_wait", "breath", "overhead")
    print("  V2V budget p50:   " + " | ".join(f"{k} {_p(_budget_values(result, k), 50)}" for k in parts))
    per_phrase = " | ".join(
        f"{PHRASES[i].spoken[:22]}.. {_p([r['v2v'] for r in result['turns'] if r['phrase'] == i], 50)}"
        for i in range(len(PHRASES)))
    print(f"  V2V p50 by phrase: {per_phrase}")
    print("  agentd stages ms p50/p95: " + " | ".join(
        f"{name} {_p(values, 50)}/{_p(values, 95)}" for name, values in result["stages_ms"].items()))
    located = " | ".join(f"{k} {_p(_present(result, k), 50)}/{_p(_present(result, k), 95)}"
                         for k in ("tts_excess", "llm_excess", "playout_excess"))
    print(f"  internal, located p50/p95 ms: {located}")
    lags = _present(result, "commit_lag")
    print(f"  speculation: per call {result['speculation_calls']}; per turn {result['speculation_turns']}; "
          f"commit->ai_start lag of fresh replies p95 {_p(lags, 95)} ms")
    for problem, count in result["problems"].items():
        print(f"  PROBLEM x{count}: {problem}")
    for failure in result["failed"][:5]:
        print(f"  FAILED CALL: {failure}")
    if result["background_pct"] > BACKGROUND_LIMIT_PCT:
        print(f"  WARNING: other processes used {result['background_pct']:.0f} % of a core during this "
              "configuration: its p95s are not agentd's alone")


def _print_overhead(result: dict) -> None:
    overhead = _budget_values(result, "overhead")
    o95 = common.percentile(overhead, 95)
    ok = None if o95 is None else o95 <= TARGET_OVERHEAD_P95_MS
    print(f"  overhead ms       p50 {_p(overhead, 50):>5}  p95 {_p(overhead, 95):>5}  max {_p(overhead, 100):>5}   "
          f"target p95 <= {TARGET_OVERHEAD_P95_MS}: {common.verdict(ok)}")
    for key, meaning in (("softphone_side", "VAD vs softphone end of speech, WebSocket, 20 ms playback slots"),
                         ("service_extra", "localcloud beyond the injected delays (espeak-ng, its servers)"),
                         ("internal", "agentd's own code")):
        values = _budget_values(result, key)
        print(f"    {key + ' ms':<15} p50 {_p(values, 50):>5}  p95 {_p(values, 95):>5}  max {_p(values, 100):>5}"
              f"   ({meaning})")


def print_ratios(results: list[dict]) -> None:
    by_variant = {(r["variant"]["stt_final_ms"], r["variant"]["spec"], r["variant"]["early_finalize"]): r
                  for r in results}
    print("\n== V2V p50 ratios (feature configuration / both off, same STT profile)")
    for stt in sorted({key[0] for key in by_variant}, reverse=True):
        off = by_variant.get((stt, False, False))
        base = v2v_p50(off) if off else None
        for spec, early, label in ((True, True, "both on"), (True, False, "speculation only"),
                                   (False, True, "early finalize only")):
            run = by_variant.get((stt, spec, early))
            if run is None or not base:
                continue
            ratio = v2v_p50(run) / base
            target = (f"   target <= {TARGET_RATIO}: {common.verdict(ratio <= TARGET_RATIO)}"
                      if (stt, label) == (880, "both on") else "")
            print(f"  stt {stt}: {label:<20} {fmt_ms(v2v_p50(run))} / {fmt_ms(base)} = {ratio:.2f}{target}")


def fmt_ms(value: float | None) -> str:
    return common.fmt(value) + " ms"


# -- the command ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 calls per configuration (a smoke run, ~4 min)")
    add_run_options(parser, "latency", calls=10, parallel=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.calls = min(args.calls, 2)
        args.parallel = min(args.parallel, 2)
    return args


def add_run_options(parser: argparse.ArgumentParser, name: str, *, calls: int, parallel: int) -> None:
    """The options of a benchmark on this harness: calls per configuration, which ones, config, output, quiet."""
    parser.add_argument("--calls", type=int, default=calls, help=f"calls per configuration (default {calls})")
    parser.add_argument("--parallel", type=int, default=parallel,
                        help=f"calls in progress at once (default {parallel})")
    parser.add_argument("--stagger-s", type=float, default=7.0, help="between the first calls' starts")
    parser.add_argument("--only", help="run only configurations whose name contains this (e.g. 'stt 880')")
    parser.add_argument("--config", help="agentd.toml (default etc/agentd.toml)")
    parser.add_argument("--out", type=Path, help=f"JSON results (default var/bench/{name}-<time>.json)")
    common.add_quiet_options(parser, each="configuration", retries=1, busy="got busy")
    parser.add_argument("--log-level", default="ERROR")


def out_path(args: argparse.Namespace, name: str) -> Path:
    """--out, or var/bench/<name>-<time>.json; its directory is created."""
    out = args.out or common.REPO / "var" / "bench" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def run_matrix(args: argparse.Namespace, base: Config, turns: list[CallerTurn], out_dir: Path) -> list[dict]:
    variants = [v for v in MATRIX if not args.only or args.only in v.name]
    results = []
    for stt in sorted({v.stt_final_ms for v in variants}, reverse=True):
        delays = common.Delays(stt_final_ms=stt)
        lines = [p.script for p in PHRASES]
        with common.LocalCloudProcess(lines, delays, log_path=out_dir / f"localcloud-{stt}.log") as lc:
            costs = [phrase_costs(base, phrase, turn, lc, delays) for phrase, turn in zip(PHRASES, turns)]
            print_costs(costs)
            for variant in (v for v in variants if v.stt_final_ms == stt):
                results.append(run_quietly(args, base, lc, variant, turns, costs, delays))
                print_variant(results[-1])
    return results


def run_quietly(args: argparse.Namespace, base: Config, lc: common.LocalCloudProcess, variant: Variant,
                turns: list[CallerTurn], costs: list[PhraseCosts], delays: common.Delays) -> dict:
    """run_one on a quiet machine; again (up to --retries times) if other processes got busy meanwhile."""
    return common.run_quietly(lambda: run_one(args, base, lc, variant, turns, costs, delays), args,
                              functools.partial(disturbed, variant))


def disturbed(variant: Variant, result: dict) -> str | None:
    """Why `result` (with its background_pct) is not agentd's alone, or None (common.run_quietly's judge)."""
    if result["background_pct"] <= BACKGROUND_LIMIT_PCT:
        return None
    return f"{variant.name}: other processes used {result['background_pct']:.0f} % of a core meanwhile"


def run_one(args: argparse.Namespace, base: Config, lc: common.LocalCloudProcess, variant: Variant,
            turns: list[CallerTurn], costs: list[PhraseCosts], delays: common.Delays) -> dict:
    config = variant_config(base, lc, variant)
    run, background_pct = run_calls(args, config, lc, variant, turns)
    return analyse(variant, run, costs, config, delays) | {
        "costs": [asdict(c) for c in costs], "background_pct": background_pct}


def variant_config(base: Config, lc: common.LocalCloudProcess, variant: Variant) -> Config:
    """The production config pointed at `lc`, with the variant's features on or off."""
    return base.with_overrides(**common.agentd_overrides(lc), **{
        "server.stats_interval_s": 0, "spec.enabled": variant.spec,
        "turn.early_finalize_enabled": variant.early_finalize})


def run_calls(args: argparse.Namespace, config: Config, lc: common.LocalCloudProcess, variant: Variant,
              turns: list[CallerTurn]) -> tuple[VariantRun, float]:
    """Place --calls calls of `turns` on agentd with `config`; also the % of a core others used meanwhile."""
    print(f"running {variant.name}: {args.calls} calls...", file=sys.stderr, flush=True)
    own0, busy0, wall0 = own_cpu_s(lc), sum(common.cpu_busy_seconds().values()), time.monotonic()
    run = trio.run(functools.partial(run_variant, config, turns, calls=args.calls, parallel=args.parallel,
                                     stagger_s=args.stagger_s))
    others = sum(common.cpu_busy_seconds().values()) - busy0 - (own_cpu_s(lc) - own0)
    return run, 100 * max(0.0, others) / (time.monotonic() - wall0)


def own_cpu_s(lc: common.LocalCloudProcess) -> float:
    """CPU time of this process (agentd + softphones) and of localcloud with its espeak-ng runs."""
    return common.cpu_seconds(os.getpid()) + common.cpu_seconds(lc.process.pid, children=True)


def print_costs(costs: list[PhraseCosts]) -> None:
    print("\nper phrase (first piece of the reply; bare-client service times; agentd VAD end - softphone end):")
    for phrase, cost in zip(PHRASES, costs):
        print(f"  {phrase.spoken!r}: first piece {cost.first_piece!r}; LLM injected {cost.llm_injected_ms:.0f} / "
              f"measured {cost.llm_measured_ms:.0f} ms; TTS measured {cost.tts_measured_ms:.0f} ms; "
              f"endpoint offset {cost.endpoint_offset_ms:+.0f} ms")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    machine = common.machine_description()
    started = time.monotonic()
    out = out_path(args, "latency")
    base = load_config(args.config)
    print(f"bench.latency on {common.format_machine(machine)}")
    print(f"injected: LLM TTFT 350 ms at 60 tokens/s, TTS TTFB 120 ms; STT final 880 / 150 ms; "
          f"{args.calls} calls x {len(PHRASES)} turns per configuration, <= {args.parallel} at once")
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as scratch:
        turns = common.caller_turns(PHRASES, scratch)
    results = run_matrix(args, base, turns, out.parent)
    print_ratios(results)
    elapsed = time.monotonic() - started
    print(f"\n{len(results)} configurations in {elapsed / 60:.1f} min; JSON: {out}")
    out.write_text(json.dumps({"machine": machine, "args": vars(args) | {"out": str(out)}, "results": results},
                              indent=1, default=str))
    failed = sum(len(r["failed"]) for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
