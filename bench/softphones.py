"""``python -m bench.softphones``: one process of softphones for bench.capacity and bench.soak (a worker).

It places ``--calls`` calls to one agentd URL from one Trio loop. Call i starts
at wall-clock time ``--start-at + i * --interval-s`` (so several workers can
interleave their calls on one schedule); ``--sequential`` places them one
after another instead. With ``--until`` (bench.soak) each of the ``--calls``
slots starts on that schedule and then places calls back to back until that
wall-clock time, so about ``--calls`` calls are always up; the last ones end
after it. Every call speaks the same WAV turns, in order.

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
from agentd.metronome import Metronome
from agentd.testbed.softphone import CallReport, place_call
from agentd.testbed.softphone.script import CallerTurn
from bench import common

CALL_TIMEOUT_S = 240.0
LAG_PROBE_S = 0.01
MIN_CALL_PERIOD_S = 1.0  # --until: a slot whose calls fail at once retries at most this often


def summarize(report: CallReport, started_at: float) -> dict:
    """The few facts bench.capacity needs from one call (JSON-ready)."""
    return {
        "call_sid": report.call_sid, "started_at": started_at, "greeting_ms": report.greeting_latency_ms,
        "total_call_ms": report.total_call_ms, "ended_by": report.ended_by, "violations": report.violation_count,
        "turns": [{"v2v_ms": t.v2v_ms, "speech_end_ms": t.speech_end_ms, "answered": t.answered}
                  for t in report.turns],
        "error": None,
    }


async def _call_at(url: str, turns: list[CallerTurn], start_at: float, results: list[dict],
                   metronome: Metronome) -> None:
    await trio.sleep(max(0.0, start_at - time.time()))
    await _place(url, turns, results, metronome)


async def _calls_until(url: str, turns: list[CallerTurn], start_at: float, until: float, results: list[dict],
                       metronome: Metronome) -> None:
    """One slot: from `start_at`, place calls back to back while the wall clock is before `until`."""
    await trio.sleep(max(0.0, start_at - time.time()))
    while (started := time.time()) < until:
        await _place(url, turns, results, metronome)
        await trio.sleep(max(0.0, started + MIN_CALL_PERIOD_S - time.time()))


async def _place(url: str, turns: list[CallerTurn], results: list[dict], metronome: Metronome) -> None:
    """Place one call now; append its summary (or its error) to `results`."""
    started_at = time.time()
    with trio.move_on_after(CALL_TIMEOUT_S) as guard:
        try:
            report = await place_call(url, turns, business=common.BUSINESS, metronome=metronome)
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
    metronome = Metronome()  # every slot of every call waits on it, not on a Trio sleep of its own
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_probe_lag, lags, done)
        await nursery.start(metronome.run)
        if args.sequential:
            for _ in range(args.calls):
                await _call_at(args.url, turns, args.start_at, results, metronome)
        else:
            async with trio.open_nursery() as calls:
                for index in range(args.calls):
                    at = args.start_at + index * args.interval_s
                    if args.until is None:
                        calls.start_soon(_call_at, args.url, turns, at, results, metronome)
                    else:
                        calls.start_soon(_calls_until, args.url, turns, at, args.until, results, metronome)
        done.set()
        nursery.cancel_scope.cancel()  # the metronome
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
    parser.add_argument("--until", type=float, help="wall-clock time: each call slot places calls back to back "
                                                    "until then (--calls is then the number of slots)")
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
