"""``python -m bench.softphones``: one process of softphones for bench.capacity (a worker, not a benchmark).

It places ``--calls`` calls to one agentd URL from one Trio loop. Call i starts
at wall-clock time ``--start-at + i * --interval-s`` (so several workers can
interleave their calls on one schedule); ``--sequential`` places them one
after another instead. Every call speaks the same WAV turns, in order.

Because the softphones share a CPU core with localcloud, the worker also
measures its own health: the lag of a 10 ms Trio sleep (a loop that falls
behind sends caller audio late and hears agent audio late, which would
inflate the V2V it reports) and its CPU time. It writes one JSON document
to ``--out``; the orchestrator reads it.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import trio

from agentd.errors import UpstreamUnavailable
from agentd.softphone import CallReport, place_call
from agentd.softphone_script import CallerTurn
from bench import common

CALL_TIMEOUT_S = 240.0
LAG_PROBE_S = 0.01


def summarize(report: CallReport, started_at: float) -> dict:
    """The few facts bench.capacity needs from one call (JSON-ready)."""
    return {
        "call_sid": report.call_sid, "started_at": started_at, "greeting_ms": report.greeting_latency_ms,
        "total_call_ms": report.total_call_ms, "ended_by": report.ended_by, "violations": report.violation_count,
        "turns": [{"v2v_ms": t.v2v_ms, "speech_end_ms": t.speech_end_ms, "answered": t.answered}
                  for t in report.turns],
        "error": None,
    }


async def _call_at(url: str, turns: list[CallerTurn], start_at: float, results: list[dict]) -> None:
    await trio.sleep(max(0.0, start_at - time.time()))
    started_at = time.time()
    with trio.move_on_after(CALL_TIMEOUT_S) as guard:
        try:
            report = await place_call(url, turns, business=common.BUSINESS)
        except UpstreamUnavailable as exc:
            results.append({"started_at": started_at, "error": str(exc), "turns": []})
            return
        results.append(summarize(report, started_at))
    if guard.cancelled_caught:
        results.append({"started_at": started_at, "error": f"still running after {CALL_TIMEOUT_S:.0f} s",
                        "turns": []})


async def _probe_lag(lags: list[float], done: trio.Event) -> None:
    while not done.is_set():
        before = trio.current_time()
        await trio.sleep(LAG_PROBE_S)
        lags.append((trio.current_time() - before - LAG_PROBE_S) * 1000)


async def run_calls(args: argparse.Namespace, turns: list[CallerTurn]) -> dict:
    results: list[dict] = []
    lags: list[float] = []
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_probe_lag, lags, done)
        if args.sequential:
            for _ in range(args.calls):
                await _call_at(args.url, turns, args.start_at, results)
        else:
            async with trio.open_nursery() as calls:
                for index in range(args.calls):
                    calls.start_soon(_call_at, args.url, turns, args.start_at + index * args.interval_s, results)
        done.set()
    return {"calls": results, "loop_lag_ms": {q: common.percentile(lags, q) for q in (50, 99, 100)}}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.softphones", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--wav", action="append", required=True, help="a caller turn (repeat, in order)")
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--start-at", type=float, default=0.0, help="wall-clock time (time.time()) of call 0")
    parser.add_argument("--interval-s", type=float, default=0.1)
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    turns = [replace(CallerTurn.from_wav(path), label=Path(path).stem) for path in args.wav]
    cpu0, begin = _cpu_s(), max(args.start_at, time.time())
    result = trio.run(run_calls, args, turns)
    # Over the calling period only (not imports, not the wait for --start-at, which costs no CPU).
    result |= {"cpu_s": _cpu_s() - cpu0, "wall_s": time.time() - begin}
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
