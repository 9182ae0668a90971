"""``python -m bench.soak``: N calls held up for M minutes through localcloud; does agentd leak or fail?

The processes of bench.capacity: ONE ``agentd serve`` on core 0, localcloud
(the Google-like injected delays) and the softphones on core 1, this
orchestrator on core 1 too (``--no-pin``: all of them float). Each of the
--calls softphone slots starts at --rate per second and then places calls
back to back (a call: greeting, three turns, hang-up, ~30 s) until --minutes
after the first call, so ~N calls are always up; the last ones end after
that. A thread reads agentd's VmRSS, threads, open fds and CPU time from
/proc every --sample-s seconds for the whole run.

Measured: RSS at the end of the warm-up (the first --warmup-minutes), at the
end and its max; growth = median RSS of the last minute / median RSS of the
first minute after warm-up - 1 (target < 5 %); calls placed, completed and
failed (as bench.capacity: no greeting, a turn unanswered, the agent hung up,
a softphone error; target 0); agentd's ERROR/CRITICAL/Traceback log lines
(target 0); TX drops and lateness from agentd's call records; V2V per minute;
agentd CPU. Raw results go to var/bench/soak-<time>/results.json and a
Markdown summary for bench/RESULTS.md is printed.

Everything listens on 127.0.0.1; every wait is bounded; child processes are
stopped by their own pid.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from agentd.config import load_config
from bench import capacity, common, soak_report
from bench.capacity import AGENTD_CPU, CLOUD_CPU, Agentd, Readings
from bench.soak_report import LogProblems, Sample, SoakResult, Timeline

START_DELAY_S = 3.0  # softphone workers have imported and loaded their WAVs by then
SETTLE_S = 5.0  # after the last call: agentd writes its last records, frees what the calls held
PROGRESS_S = 60.0


# -- reading agentd's process --------------------------------------------------------------------------


def snapshot(pid: int) -> Sample:
    """agentd's VmRSS, thread count, open fds and CPU time now (from /proc/PID)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":" in line)
    if "VmRSS" not in status:
        raise RuntimeError(f"no VmRSS for pid {pid} (a zombie?)")
    return Sample(at=time.time(), rss_kb=int(status["VmRSS"].split()[0]), threads=int(status["Threads"]),
                  fds=len(os.listdir(f"/proc/{pid}/fd")), cpu_s=common.cpu_seconds(pid))


def progress_printer(timeline: Timeline) -> Callable[[Sample], None]:
    """A common.Sampler `on_sample` that prints one line a minute to stderr."""
    last: list[Sample] = []

    def show(sample: Sample) -> None:
        if last and sample.at - last[0].at < PROGRESS_S:
            return
        cpu = f"{100 * (sample.cpu_s - last[0].cpu_s) / (sample.at - last[0].at):.0f} %" if last else "-"
        last[:] = [sample]
        print(f"soak t={(sample.at - timeline.start_at) / 60:+.1f} min: RSS {sample.rss_kb / 1024:.1f} MB, "
              f"threads {sample.threads}, fds {sample.fds}, agentd CPU {cpu}", file=sys.stderr, flush=True)

    return show


def count_log_problems(path: Path) -> LogProblems:
    """log_problems of agentd's log as it is now (read line by line: a long soak writes tens of MB)."""
    with open(path, encoding="utf-8", errors="replace") as lines:
        return soak_report.log_problems(lines)


# -- the run -------------------------------------------------------------------------------------------


def usage(before: Readings, after: Readings, workers: list[dict], *, pinned: bool) -> dict[str, float | None]:
    """Core 1's health (softphones, localcloud) and other processes' CPU between two readings, % of one core."""
    wall = after.at - before.at
    agentd = after.agentd_cpu - before.agentd_cpu
    cloud = after.cloud_cpu - before.cloud_cpu
    phones = sum(w["cpu_s"] for w in workers)
    ours = cloud + phones + after.own_cpu - before.own_cpu
    busy = {core: after.busy[core] - before.busy[core] for core in after.busy}
    if pinned:
        others = {"others core 0": busy[AGENTD_CPU] - agentd, "others core 1": busy[CLOUD_CPU] - ours}
    else:
        others = {"others all cores": sum(busy.values()) - agentd - ours}
    return {"softphone_cpu_pct": 100 * phones / wall, "cloud_cpu_pct": 100 * cloud / wall,
            "softphone_lag_p99_ms": max((w["loop_lag_ms"].get("99") or 0.0 for w in workers), default=None)} | {
        name: 100 * max(0.0, seconds) / wall for name, seconds in others.items()}


def soak(agentd: Agentd, lc: common.LocalCloudProcess, wavs: list[Path], run_dir: Path,
         args: argparse.Namespace) -> SoakResult:
    """Hold --calls calls up for --minutes while sampling agentd; the figures."""
    common.wait_for_quiet(args.wait_quiet_s)
    idle = snapshot(agentd.pid)
    start_at = time.time() + START_DELAY_S
    timeline = Timeline(start_at=start_at, warmup_end=start_at + 60 * args.warmup_minutes,
                        until=start_at + 60 * args.minutes)
    print(f"soak: {args.calls} calls for {args.minutes:g} min (warm-up {args.warmup_minutes:g} min), "
          f"ramp at {args.rate:g}/s, a sample every {args.sample_s:g} s", file=sys.stderr, flush=True)
    cloud_cpu = CLOUD_CPU if args.pin else None
    before = Readings.take(agentd, lc)
    with common.Sampler(lambda: snapshot(agentd.pid), args.sample_s, progress_printer(timeline)) as sampler:
        workers = capacity.run_softphones(agentd.url, wavs, run_dir, "soak", calls=args.calls, rate=args.rate,
                                          per_process=args.calls_per_softphone, start_at=start_at,
                                          until=timeline.until, cpu=cloud_cpu)
        after_calls = Readings.take(agentd, lc)
        time.sleep(SETTLE_S)
    alive = agentd.process.poll() is None
    after = snapshot(agentd.pid) if alive else None
    if sampler.lost:
        print(f"soak: sampling stopped early (agentd gone?): {sampler.lost}", file=sys.stderr)
    return soak_report.analyse(
        slots=args.calls, timeline=timeline, samples=sampler.samples, workers=workers,
        call_records=capacity.read_records(agentd.telemetry_dir, "calls", capacity.call_sids(workers)),
        log=count_log_problems(run_dir / "agentd.log"), agentd_alive=alive, idle=idle, after=after,
        usage=usage(before, after_calls, workers, pinned=args.pin))


# -- the command ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls held up at once (default 200)")
    parser.add_argument("--minutes", type=float, default=10.0, help="from the first call to the last call "
                        "start, warm-up included (default 10)")
    parser.add_argument("--warmup-minutes", type=float, default=2.0,
                        help="the first minutes, not counted in the RSS growth (default 2)")
    parser.add_argument("--rate", type=float, default=10.0, help="call slots started per second (default 10)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="agentd /proc sample period (default 5)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="no taskset: agentd, localcloud, softphones and this process float over all CPUs")
    parser.add_argument("--calls-per-softphone", type=int, default=100,
                        help="call slots per softphone process (default 100)")
    parser.add_argument("--stt-final-ms", type=int, default=880, help="localcloud's final delay (default 880)")
    parser.add_argument("--wait-quiet-s", type=float, default=120,
                        help="first wait up to this long for other processes to use < 20 %% of a core (default 120)")
    parser.add_argument("--config", help="agentd.toml (default etc/agentd.toml)")
    parser.add_argument("--out", type=Path, help="run directory (default var/bench/soak-<time>/)")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup_minutes < args.minutes:
        parser.error("--warmup-minutes must be less than --minutes")
    if args.calls < 1 or args.rate <= 0 or args.sample_s <= 0:
        parser.error("--calls, --rate and --sample-s must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        print("bench.soak needs 2 CPUs to pin (agentd on core 0, the rest on core 1); or --no-pin", file=sys.stderr)
        return 2
    machine = common.machine_description()
    if args.pin:
        os.sched_setaffinity(0, {CLOUD_CPU})  # this orchestrator stays off agentd's core
    run_dir = args.out or common.REPO / "var" / "bench" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    business = load_config(args.config).business(common.BUSINESS)  # fail early on a bad config
    print(f"bench.soak on {common.format_machine(machine)}; business {business.name}; run dir {run_dir}")
    wavs = common.caller_wavs(capacity.PHRASES, run_dir / "wavs")
    delays = common.Delays(stt_final_ms=args.stt_final_ms)
    with common.LocalCloudProcess([p.script for p in capacity.PHRASES], delays, log_path=run_dir / "localcloud.log",
                                  cpu=CLOUD_CPU if args.pin else None) as lc:
        agentd = capacity.start_agentd(lc, run_dir, max_calls=args.calls + 50, config_path=args.config,
                                       gc_log=None, cpu=AGENTD_CPU if args.pin else None)
        try:
            result = soak(agentd, lc, wavs, run_dir, args)
        finally:
            common.stop_child(agentd.process, signal.SIGINT)  # SIGINT: a clean Trio shutdown
    results_path = run_dir / "results.json"
    results_path.write_text(json.dumps(
        {"machine": machine, "args": {k: v for k, v in vars(args).items() if k != "out"},
         "delays": asdict(delays), "result": result.to_json()}, indent=1, default=str))
    command = shlex.join([".venv/bin/python", "-m", "bench.soak", *argv])
    raw = results_path.relative_to(common.REPO) if results_path.is_relative_to(common.REPO) else results_path
    soak_report.print_summary(result, machine=machine, delays=delays, command=command, raw=str(raw))
    print(f"\nJSON: {results_path}")
    return 0 if all(result.targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
