"""Fuzz ``agentd serve`` with hostile Twilio traffic: the CI property, at length.

    .venv/bin/python -m bench.fuzz                  # 10,000 examples, about 5 minutes on 2 cores
    .venv/bin/python -m bench.fuzz --examples 500 --seed 7

It runs the property of tests/test_hostile_input.py (read its docstring for
the contract and the design) against one in-process daemon pointed at an
in-process localcloud, with a healthy call always in progress alongside.
Unlike the test it does not stop at the first failure: every example runs,
failures are classified (crash, mismatch, hang, not serving) and the daemon
is restarted on the same port after a crash (cutting short the healthy call
in progress, which then counts as not answered). At the end it prints the
count of each close code and reason, each failure class with up to three
examples, and the healthy calls; the exit status is 1 if anything failed.
Traffic stays on 127.0.0.1; the run ends after ``--examples`` examples.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import trio
from hypothesis import HealthCheck, Phase, given, seed, settings

from agentd.testbed.softphone.caller_audio import synthesize_caller_turns
from agentd.config import load_config
from agentd.testbed.localcloud import LocalCloud, settings_from_config
from agentd.testbed.softphone.script import CallerTurn

# The property lives with its test; the tests directory is not a package (pytest puts it on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import HOURS_LINE
from test_hostile_input import (
    DaemonThread,
    HealthyCalls,
    ServerLog,
    check_hostile_call,
    fuzz_config,
    hostile_calls,
)

EXAMPLES_SHOWN = 3
FRAME_CHARS_SHOWN = 100
PROGRESS_EVERY = 1000


class Fuzzer:
    """Runs examples against a daemon, restarting it after a crash, and tallies what happened."""

    def __init__(self, daemon: DaemonThread, log: ServerLog) -> None:
        self.daemon = daemon
        self.log = log
        self.closes: Counter = Counter()
        self.failures: dict[str, list[str]] = defaultdict(list)
        self.examples = 0
        self._started = time.monotonic()

    def run_one(self, frames: list[str | bytes]) -> None:
        self.examples += 1
        try:
            check_hostile_call(self.daemon, self.log, frames, self.closes)
        except Exception as exc:  # noqa: BLE001 -- a bench tallies failures instead of stopping
            kind = self._classify(exc)
            detail = "" if kind.startswith("crash") else f" -> {str(_root(exc))[:200]}"
            self.failures[kind].append(_show(frames) + detail)
            if self.daemon.crash is not None or kind.startswith("not serving"):
                self._restart()
        if self.examples % PROGRESS_EVERY == 0:
            print(f"  {self.examples} examples, {sum(map(len, self.failures.values()))} failed, "
                  f"{time.monotonic() - self._started:.0f} s", flush=True)

    def _classify(self, exc: Exception) -> str:
        if self.daemon.crash is not None:
            return f"crash: {type(_root(self.daemon.crash)).__name__}"
        if isinstance(exc, trio.TooSlowError):
            return "hang"
        if isinstance(exc, AssertionError):
            return "mismatch"
        return f"not serving: {type(exc).__name__}"

    def _restart(self) -> None:
        port = self.daemon.port
        self.daemon.stop()
        config = self.daemon.config.with_overrides(**{"server.port": port})  # the healthy calls keep their URL
        self.daemon = DaemonThread(config).start()


def _root(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (the exception that started it all)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _show(frames: list[str | bytes]) -> str:
    """The frames, each cut to FRAME_CHARS_SHOWN (padded ones run to 130 KB)."""
    shown = [repr(f) if len(repr(f)) <= FRAME_CHARS_SHOWN else f"{repr(f)[:FRAME_CHARS_SHOWN]}...<{len(f)}>"
             for f in frames]
    return "[" + ", ".join(shown) + "]"


def fuzz(fuzzer: Fuzzer, *, examples: int, seed_value: int) -> None:
    """Feed ``examples`` Hypothesis examples (no shrinking: nothing raises) to ``fuzzer``."""
    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(frames=hostile_calls())
    def run(frames: list[str | bytes]) -> None:
        fuzzer.run_one(frames)

    run()


def report(fuzzer: Fuzzer, healthy: HealthyCalls, elapsed_s: float) -> bool:
    """Print the tallies; True when nothing failed."""
    print(f"\n{fuzzer.examples} examples in {elapsed_s:.0f} s")
    print("\nclose code  reason (up to ':')                           count")
    for (code, reason), count in sorted(fuzzer.closes.items(), key=lambda item: (item[0][0], -item[1])):
        print(f"{code:>10}  {reason!r:<44} {count:>5}")
    print(f"\nhealthy calls alongside: {len(healthy.reports)}, answered their turn: {healthy.answered}, "
          f"failed to connect: {len(healthy.errors)}")
    if not fuzzer.failures:
        print("failures: none (no crash, no mismatch, no hang)")
    for kind, cases in sorted(fuzzer.failures.items()):
        print(f"\nFAILURE {kind}: {len(cases)} example(s)")
        for case in cases[:EXAMPLES_SHOWN]:
            print(f"  {case}")
    return not fuzzer.failures and not healthy.errors and healthy.answered == len(healthy.reports)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="examples to run (default 10000)")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: random, printed)")
    args = parser.parse_args(argv)
    seed_value = random.randrange(2**32) if args.seed is None else args.seed
    print(f"bench.fuzz: {args.examples} examples, seed {seed_value}", flush=True)
    quiet = logging.StreamHandler()
    quiet.setLevel(logging.ERROR)  # agentd logs a warning per hostile call; keep the errors only
    logging.basicConfig(level=logging.INFO, handlers=[quiet])
    with tempfile.TemporaryDirectory(prefix="agentd-fuzz-") as scratch:
        return 0 if run(Path(scratch), examples=args.examples, seed_value=seed_value) else 1


def run(scratch: Path, *, examples: int, seed_value: int) -> bool:
    """localcloud, the daemon and the healthy calls around one fuzz run; True when nothing failed."""
    [wav] = synthesize_caller_turns(["What time do you open tomorrow?"], "en-us", out_dir=scratch)
    turn = CallerTurn.from_wav(wav)
    cloud_settings = settings_from_config(load_config(None), stt_engine="script", script_lines=(HOURS_LINE,))
    with LocalCloud(cloud_settings) as cloud:
        daemon = DaemonThread(fuzz_config(str(scratch / "telemetry"), cloud)).start()
        fuzzer = Fuzzer(daemon, ServerLog())
        started = time.monotonic()
        with fuzzer.log, HealthyCalls(fuzzer.daemon.url, turn) as healthy:
            fuzz(fuzzer, examples=examples, seed_value=seed_value)
        fuzzer.daemon.stop()
    return report(fuzzer, healthy, time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
