"""Drain under load: N live calls, then SIGTERM; how many finish, how long the drain takes.

    python -m bench.drain --calls 20 [--drain-timeout-s 300] [--out DIR]

Starts localcloud and `agentd serve` as child processes (as bench.capacity
does), places N three-turn calls from softphone workers, and sends agentd
SIGTERM once /metrics says all N are up. It then reports how many calls
finished every turn (whoever hung up), how the others ended (their call
records' end_reason), the drain's wall time and agentd's exit status, and runs
`agentd report` (with --plot) on the run's telemetry.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from agentd.report import load_records
from bench import common
from bench.capacity import CLOUD_CPU, PHRASES, run_softphones

POLL_S = 0.2


def calls_active(ops_port: int) -> int:
    """agentd_calls_active from agentd's /metrics (0 when it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0
    line = next(line for line in text.splitlines() if line.startswith("agentd_calls_active "))
    return int(float(line.split()[1]))


def start_agentd(lc: common.LocalCloudProcess, run_dir: Path, *, calls: int, drain_timeout_s: float,
                 ops_port: int) -> tuple[subprocess.Popen, int]:
    port = common.free_port()
    overrides = common.agentd_overrides(lc, port=port, telemetry_dir=str(run_dir / "telemetry")) | {
        "server.max_calls": calls + 5, "server.drain_timeout_s": drain_timeout_s,
        "ops.listen": f"127.0.0.1:{ops_port}", "server.stats_interval_s": 0}
    with open(run_dir / "agentd.log", "ab") as log_file:
        process = subprocess.Popen([common.PYTHON, "-m", "agentd", "serve"], cwd=common.REPO,
                                   env=os.environ | common.env_overrides(overrides), stdout=log_file, stderr=log_file)
    common.wait_for_port(port, process, timeout_s=60)
    return process, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--drain-timeout-s", type=float, default=300.0)
    parser.add_argument("--out", type=Path, help="run directory (default var/bench/drain-<time>/)")
    args = parser.parse_args(argv)
    run_dir = args.out or common.REPO / "var" / "bench" / f"drain-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True, exist_ok=True)
    wavs = common.caller_wavs(PHRASES, run_dir / "caller")
    with common.LocalCloudProcess([p.script for p in PHRASES], common.Delays(stt_final_ms=880),
                                  log_path=run_dir / "localcloud.log", cpu=CLOUD_CPU) as lc:
        ops_port = common.free_port()
        agentd, port = start_agentd(lc, run_dir, calls=args.calls, drain_timeout_s=args.drain_timeout_s,
                                    ops_port=ops_port)
        try:
            results: list[dict] = []
            placing = threading.Thread(target=lambda: results.extend(run_softphones(
                f"ws://127.0.0.1:{port}/media", wavs, run_dir, "drain", calls=args.calls, rate=10.0,
                per_process=args.calls, cpu=CLOUD_CPU)))
            placing.start()
            while calls_active(ops_port) < args.calls:
                if not placing.is_alive():
                    raise RuntimeError("the softphones ended before every call was up")
                time.sleep(POLL_S)
            signalled = time.monotonic()
            agentd.send_signal(signal.SIGTERM)
            status = agentd.wait(args.drain_timeout_s + 120)
            drain_s = time.monotonic() - signalled
            placing.join()
        finally:
            common.stop_child(agentd)
    calls = [c for worker in results for c in worker["calls"]]
    # Finished: every turn answered, whoever hung up (the agent ends the call after the caller's goodbye).
    finished = [c for c in calls if c["turns"] and all(t["answered"] for t in c["turns"])]
    records = load_records(str(run_dir / "telemetry"), "calls")
    print(f"drain of {args.calls} live calls: SIGTERM -> exit {status} in {drain_s:.1f} s; "
          f"{len(finished)} of {len(calls)} calls finished every turn")
    print("call records by end_reason: " + ", ".join(
        f"{reason} {n}" for reason, n in sorted(collections.Counter(r["end_reason"] for r in records).items())))
    print(f"\nagentd report {run_dir / 'telemetry'} --plot {run_dir / 'report.png'}\n")
    sys.stdout.flush()
    return subprocess.call([common.PYTHON, "-m", "agentd", "report", str(run_dir / "telemetry"),
                            "--plot", str(run_dir / "report.png")], cwd=common.REPO)


if __name__ == "__main__":
    sys.exit(main())
