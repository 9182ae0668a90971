"""``python -m bench.capacity``: how many concurrent calls one agentd process on one core carries.

Three kinds of process, pinned with ``taskset`` on a 2-core machine:

* core 0: ONE ``agentd serve`` (production etc/agentd.toml; environment
  overrides point it at localcloud, raise server.max_calls, set the telemetry
  directory);
* core 1: ``agentd localcloud`` (script STT, espeak-ng TTS, rules LLM, with the
  Google-like injected delays of bench.latency) and the softphones
  (``python -m bench.softphones``; above --calls-per-softphone calls they are
  split over several processes, all on core 1). With --tts-cache localcloud
  synthesizes each sentence once: above ~150 calls its espeak-ng processes,
  not agentd, are what saturates.

First a few single calls, one after another, give the single-call V2V; then,
for each load N (default 50, 100, 200), N calls start at --rate calls/s (so
greetings do not all start at once); each call is the greeting and three
turns. Measured, per load:

* outbound pacing: agentd's call records ``tx_lateness_ms`` (ms a frame left
  after its due time), aggregated over calls;
* V2V p95 of the turns spoken while all N calls were up, vs the single-call p95;
* agentd CPU seconds per call-minute (/proc/PID/stat utime+stime over the run
  / total call-minutes) and RSS per call ((peak VmRSS - idle VmRSS) / N);
* dropped frames (sum of tx_drops), failed calls, and the health of core 1
  (softphone loop lag and CPU, localcloud CPU), which decides whether the
  softphones' V2V can be trusted.

Everything listens on 127.0.0.1; every wait is bounded; child processes are
stopped by their own pid.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentd.config import load_config
from bench import common, gcwatch, profile, softphones
from bench.capacity_report import LoadResult, analyse_load, print_load, print_summary

log = logging.getLogger("bench.capacity")

PHRASES = (common.HOURS, common.BOOK, common.BYE)
AGENTD_CPU, CLOUD_CPU = 0, 1
SAMPLE_S = 0.25
IDLE_S = 5.0


@dataclass
class Agentd:
    """The agentd child process and where it writes."""

    process: subprocess.Popen
    port: int
    telemetry_dir: Path
    gc_log: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/media"


def start_agentd(lc: common.LocalCloudProcess, run_dir: Path, *, max_calls: int, config_path: str | None,
                 gc_log: Path | None, gc_freeze: bool = False, cpu: int | None = AGENTD_CPU) -> Agentd:
    """`agentd serve` on core `cpu` (None: unpinned) with environment overrides; returns once it listens.

    With `gc_log`, agentd runs under bench.gcwatch, which logs its long garbage collections there
    (and with `gc_freeze` calls gc.freeze() after agentd's imports: an experiment, not agentd's behaviour).
    """
    port = common.free_port()
    telemetry = run_dir / "telemetry"
    overrides = common.agentd_overrides(lc, port=port, telemetry_dir=str(telemetry)) | {
        "server.max_calls": max_calls}
    env_vars = common.env_overrides(overrides)
    (run_dir / "agentd.env").write_text("".join(f"{k}={v}\n" for k, v in env_vars.items()))
    command = [common.PYTHON, "-m", "agentd", "serve"] + (["--config", config_path] if config_path else [])
    if gc_log is not None:
        command[1:3] = ["-m", "bench.gcwatch", str(gc_log)] + (["--freeze"] if gc_freeze else [])
    with open(run_dir / "agentd.log", "ab") as log_file:
        process = subprocess.Popen(common.pinned(command, cpu), cwd=common.REPO, env=os.environ | env_vars,
                                   stdout=log_file, stderr=log_file)
    try:
        common.wait_for_port(port, process, timeout_s=60)
    except BaseException:
        common.stop_child(process)
        raise
    return Agentd(process=process, port=port, telemetry_dir=telemetry, gc_log=gc_log)


# -- softphone workers ---------------------------------------------------------------------------------


def run_softphones(url: str, wavs: list[Path], run_dir: Path, tag: str, *, calls: int, rate: float,
                   per_process: int, sequential: bool = False, start_at: float | None = None,
                   until: float | None = None, cpu: int | None = CLOUD_CPU) -> list[dict]:
    """Place `calls` calls from ceil(calls / per_process) softphone processes on core `cpu`; their JSON results.

    The first call starts at wall-clock `start_at` (default: in 3 s). With `until` (wall-clock), each
    of the `calls` slots places calls back to back until then (bench.softphones --until).
    """
    workers = max(1, -(-calls // per_process))
    if start_at is None:
        start_at = time.time() + 3.0  # every worker has imported and loaded its WAVs by then
    children = []
    for w in range(workers):
        count = len(range(w, calls, workers))
        out = run_dir / f"softphones-{tag}-{w}.json"
        command = [common.PYTHON, "-m", "bench.softphones", "--url", url, "--calls", str(count),
                   "--start-at", str(start_at + w / rate), "--interval-s", str(workers / rate), "--out", str(out)]
        command += [arg for wav in wavs for arg in ("--wav", str(wav))] + (["--sequential"] if sequential else [])
        command += [] if until is None else ["--until", str(until)]
        children.append((subprocess.Popen(common.pinned(command, cpu), cwd=common.REPO), out))
    results = []
    if until is not None:
        budget_s = max(until - start_at, calls / rate) + softphones.CALL_TIMEOUT_S
    else:
        budget_s = calls * softphones.CALL_TIMEOUT_S if sequential else calls / rate + softphones.CALL_TIMEOUT_S
    deadline = time.monotonic() + (start_at - time.time()) + budget_s + 60
    try:
        for child, out in children:
            try:
                child.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                common.stop_child(child)
            if child.returncode != 0 or not out.exists():
                raise RuntimeError(f"softphone worker failed (exit {child.returncode}); see {out}")
            results.append(json.loads(out.read_text()))
    finally:  # one worker failed, or Ctrl-C: the others stop too
        for child, _ in children:
            common.stop_child(child)
    return results


def call_sids(workers: list[dict]) -> set[str]:
    """The call SIDs of the calls the softphone workers placed (a call that failed to connect has none)."""
    return {c["call_sid"] for w in workers for c in w["calls"] if c.get("call_sid")}


def read_records(telemetry_dir: Path, kind: str, call_sids: set[str]) -> list[dict]:
    """agentd's `kind` ("calls" or "turns") JSONL records for the given calls."""
    records = []
    for path in sorted(telemetry_dir.glob(f"{kind}-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("call_sid") in call_sids:
                records.append(record)
    return records


# -- one load ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Readings:
    """The CPU and scheduling counters a load is measured with, read at one moment."""

    at: float
    agentd_cpu: float
    agentd_main_cpu: float
    agentd_main_waited: float
    cloud_cpu: float  # localcloud and its espeak-ng runs
    own_cpu: float  # this orchestrator
    busy: dict[int, float]  # per core

    @classmethod
    def take(cls, agentd: Agentd, lc: common.LocalCloudProcess) -> Readings:
        return cls(at=time.monotonic(), agentd_cpu=common.cpu_seconds(agentd.pid),
                   agentd_main_cpu=common.thread_cpu_seconds(agentd.pid).get(agentd.pid, 0.0),
                   agentd_main_waited=common.runqueue_wait_s(agentd.pid),
                   cloud_cpu=common.cpu_seconds(lc.process.pid, children=True),
                   own_cpu=common.cpu_seconds(os.getpid()), busy=common.cpu_busy_seconds())


def usage(before: Readings, after: Readings, workers: list[dict]) -> dict[str, float]:
    """analyse_load's CPU arguments for the time between two readings."""
    wall = after.at - before.at
    agentd_cpu = after.agentd_cpu - before.agentd_cpu
    cloud_cpu = after.cloud_cpu - before.cloud_cpu
    ours_on_core1 = cloud_cpu + sum(w["cpu_s"] for w in workers) + after.own_cpu - before.own_cpu
    busy = {core: after.busy[core] - before.busy[core] for core in (AGENTD_CPU, CLOUD_CPU)}
    return {"wall_s": wall, "agentd_cpu_s": agentd_cpu, "cloud_cpu_s": cloud_cpu,
            "agentd_main_thread_cpu_s": after.agentd_main_cpu - before.agentd_main_cpu,
            "agentd_main_thread_waited_s": after.agentd_main_waited - before.agentd_main_waited,
            "core0_other_pct": 100 * max(0.0, busy[AGENTD_CPU] - agentd_cpu) / wall,
            "core1_other_pct": 100 * max(0.0, busy[CLOUD_CPU] - ours_on_core1) / wall}


def run_load(agentd: Agentd, lc: common.LocalCloudProcess, wavs: list[Path], run_dir: Path, args: argparse.Namespace,
             *, calls: int, idle_rss_kb: int, sequential: bool = False, profile_s: float = 0) -> LoadResult:
    """Run one load and measure it (see the module docstring); py-spy it for `profile_s` once all calls are up."""
    tag = "single" if sequential else str(calls)
    print(f"load {tag}: {calls} calls" + ("" if sequential else f" at {args.rate:g}/s") + "...",
          file=sys.stderr, flush=True)
    profiler = None
    if profile_s:
        profiler = profile.Profiler(agentd.pid, delay_s=3 + calls / args.rate + 3, duration_s=profile_s,
                                    out=run_dir / f"py-spy-{tag}.txt", cpu=CLOUD_CPU).start()
    before, started = Readings.take(agentd, lc), time.time()
    with common.Sampler(lambda: common.rss_kb(agentd.pid), SAMPLE_S) as rss:
        workers = run_softphones(agentd.url, wavs, run_dir, tag, calls=calls, rate=args.rate,
                                 per_process=args.calls_per_softphone, sequential=sequential)
        time.sleep(1.5)  # agentd writes its last call records in batches
    after = Readings.take(agentd, lc)
    sids = call_sids(workers)
    result = analyse_load(
        label=tag, calls=calls, workers=workers, idle_rss_kb=idle_rss_kb, peak_rss_kb=max(rss.samples, default=0),
        call_records=read_records(agentd.telemetry_dir, "calls", sids),
        turn_records=read_records(agentd.telemetry_dir, "turns", sids), **usage(before, after, workers),
        gc_pauses_ms=None if agentd.gc_log is None else
        [ms for _, ms in gcwatch.read_pauses(str(agentd.gc_log), started, time.time())])
    if profiler is not None:
        profiler.join()
        report_profile(profiler)
    return result


def report_profile(profiler: profile.Profiler) -> None:
    if profiler.error or not profiler.out.exists():
        print(f"\npy-spy: no profile ({profiler.error or 'no output'})")
        return
    summary = profile.summarize(profiler.out)
    profile.print_summary(summary)
    profiler.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))


# -- the command ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__.splitlines()[0])
    parser.add_argument("--loads", default="50,100,200", help="comma-separated concurrent call counts")
    parser.add_argument("--quick", action="store_true", help="loads 10,20 and one single call (~2 min)")
    parser.add_argument("--rate", type=float, default=10.0, help="call starts per second (default 10)")
    parser.add_argument("--single-calls", type=int, default=3, help="single calls for the baseline (default 3)")
    parser.add_argument("--calls-per-softphone", type=int, default=100,
                        help="calls per softphone process (more calls -> more processes, all on core 1)")
    parser.add_argument("--profile-s", type=float, default=15.0,
                        help="py-spy agentd this long during the largest load (0 = no; needs py-spy)")
    parser.add_argument("--gc-log", action="store_true",
                        help="run agentd under bench.gcwatch and report its garbage-collection pauses")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="experiment: as --gc-log, and gc.freeze() after agentd's imports")
    parser.add_argument("--stt-final-ms", type=int, default=880, help="localcloud's final delay (default 880)")
    parser.add_argument("--tts-cache", action="store_true",
                        help="localcloud synthesizes each reply sentence once (its espeak-ng processes on core 1 "
                             "saturate first above ~150 calls; the injected TTS delay still applies)")
    common.add_quiet_options(parser, each="load", retries=2, busy="used core 0")
    parser.add_argument("--config", help="agentd.toml (default etc/agentd.toml)")
    parser.add_argument("--out", type=Path, help="run directory (default var/bench/capacity-<time>/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.loads, args.single_calls = "10,20", 1
    args.load_list = [int(n) for n in args.loads.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if len(os.sched_getaffinity(0)) < 2:
        print("bench.capacity needs 2 CPUs (agentd on core 0, the rest on core 1)", file=sys.stderr)
        return 2
    machine = common.machine_description()
    os.sched_setaffinity(0, {CLOUD_CPU})  # this orchestrator stays off agentd's core
    run_dir = args.out or common.REPO / "var" / "bench" / f"capacity-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    business = load_config(args.config).business(common.BUSINESS)  # fail early on a bad config
    print(f"bench.capacity on {common.format_machine(machine)}; business {business.name}; run dir {run_dir}")
    wavs = common.caller_wavs(PHRASES, run_dir / "wavs")
    delays = common.Delays(stt_final_ms=args.stt_final_ms)
    with common.LocalCloudProcess([p.script for p in PHRASES], delays, log_path=run_dir / "localcloud.log",
                                  cpu=CLOUD_CPU, tts_cache=args.tts_cache) as lc:
        agentd = start_agentd(lc, run_dir, max_calls=max(args.load_list) + 50, config_path=args.config,
                              gc_log=run_dir / "gc.log" if args.gc_log or args.gc_freeze else None,
                              gc_freeze=args.gc_freeze)
        try:
            results = run_all(agentd, lc, wavs, run_dir, args)
        finally:
            common.stop_child(agentd.process, signal.SIGINT)  # SIGINT: a clean Trio shutdown
    print_summary(results, machine=machine, delays=delays)
    (run_dir / "results.json").write_text(json.dumps(
        {"machine": machine, "args": {k: v for k, v in vars(args).items() if k != "out"},
         "results": [r.to_json() for r in results]}, indent=1, default=str))
    print(f"\nJSON: {run_dir / 'results.json'}")
    return 0 if all(r.failed_calls == 0 for r in results) else 1


def run_all(agentd: Agentd, lc: common.LocalCloudProcess, wavs: list[Path], run_dir: Path,
            args: argparse.Namespace) -> list[LoadResult]:
    profile_s = args.profile_s if profile.py_spy() else 0
    if args.profile_s and not profile_s:
        print("py-spy is not installed: no profile (.venv/bin/pip install py-spy)", file=sys.stderr)
    single = measure(agentd, lc, wavs, run_dir, args, calls=args.single_calls, idle_rss_kb=common.rss_kb(agentd.pid),
                     sequential=True)
    print_load(single, baseline=None)
    time.sleep(2)
    idle_rss = common.rss_kb(agentd.pid)  # after a call: lazily built state is already paid for
    cpu0 = common.cpu_seconds(agentd.pid)
    time.sleep(IDLE_S)
    print(f"agentd idle (no calls): {100 * (common.cpu_seconds(agentd.pid) - cpu0) / IDLE_S:.1f} % of core 0, "
          f"RSS {idle_rss / 1024:.0f} MB")
    results = [single]
    for calls in args.load_list:
        results.append(measure(agentd, lc, wavs, run_dir, args, calls=calls, idle_rss_kb=idle_rss,
                               profile_s=profile_s if calls == max(args.load_list) else 0))
        print_load(results[-1], baseline=single)
    return results


def measure(agentd: Agentd, lc: common.LocalCloudProcess, wavs: list[Path], run_dir: Path,
            args: argparse.Namespace, **load: Any) -> LoadResult:
    """Run a load on a quiet machine; again (up to --retries times) if other processes took core 0 meanwhile."""
    def disturbed(result: LoadResult) -> str | None:
        return (f"load {result.label}: other processes used {result.core0_other_pct:.0f} % of core 0 and "
                f"{result.core1_other_pct:.0f} % of core 1 meanwhile") if result.contaminated else None

    return common.run_quietly(lambda: run_load(agentd, lc, wavs, run_dir, args, **load), args, disturbed,
                              settle_s=3)  # the last load's calls end; their tasks and sockets go


if __name__ == "__main__":
    sys.exit(main())
