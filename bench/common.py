"""What both benchmarks share: the scripted caller, localcloud as a child process, statistics, /proc readers.

The scripted caller. Each caller turn is an espeak-ng phrase (what the softphone
sends) paired with the line localcloud's `script` STT engine answers for it
(what "Google" transcribes, with the punctuation Google's automatic
punctuation would add). The script engine answers the n-th voiced segment of
a recognition stream with the n-th line, and every call opens its own stream,
so every call of a benchmark speaks the same phrases in the same order. The
phrases are chosen so that (a) each is ONE segment for localcloud (no inner
pause of 300 ms: no commas in the spoken text), (b) the `acme` business's
keyword rules answer each with a different reply, and (c) the mix holds short
(< 2 s of speech: turn.min_silence_short_s) and long utterances
(turn.min_silence_long_s), as real callers do.

localcloud runs as its own process (`python -m agentd localcloud`), so its
gRPC server, espeak-ng children and HTTP server never share a GIL or an event
loop with what is being measured. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Generic, Self, TypeVar

import numpy as np

from agentd.testbed.softphone.caller_audio import synthesize_caller_turns
from agentd.testbed.softphone.script import CallerTurn

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BUSINESS = "acme"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


# -- the scripted caller ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Phrase:
    """One caller turn: `spoken` by espeak-ng; `script` is what localcloud's STT returns for it."""

    spoken: str
    script: str


HOURS = Phrase(spoken="What time do you open tomorrow", script="What time do you open tomorrow?")
PRICE = Phrase(spoken="How much does it cost to fix a leaking pipe",  # ~2.9 s of speech: a "long" turn
               script="How much does it cost to fix a leaking pipe?")
BOOK = Phrase(spoken="Can you send a plumber tomorrow morning", script="Can you send a plumber tomorrow morning?")
BYE = Phrase(spoken="Thanks for your help goodbye", script="Thanks for your help, goodbye.")


def caller_wavs(phrases: Sequence[Phrase], out_dir: str | Path) -> list[Path]:
    """Speak each phrase with espeak-ng into `out_dir`; the WAV paths, in order."""
    return synthesize_caller_turns([p.spoken for p in phrases], "en-us", out_dir=out_dir)


def caller_turns(phrases: Sequence[Phrase], out_dir: str | Path) -> list[CallerTurn]:
    """Speak each phrase with espeak-ng into `out_dir`; CallerTurns labelled with the spoken text."""
    paths = caller_wavs(phrases, out_dir)
    return [replace(CallerTurn.from_wav(path), label=p.spoken) for p, path in zip(phrases, paths)]


# -- localcloud as a child process -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Delays:
    """Service delays injected by localcloud (ms; tokens per second)."""

    stt_final_ms: int
    llm_ttft_ms: int = 350
    llm_tokens_per_s: float = 60.0
    tts_ttfb_ms: int = 120


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pinned(command: list[str], cpu: int | None) -> list[str]:
    """`command` run under `taskset -c cpu` (unchanged when cpu is None)."""
    return command if cpu is None else ["taskset", "-c", str(cpu), *command]


class LocalCloudProcess:
    """`agentd localcloud` in a child process, script STT engine, with injected delays.

    ``with LocalCloudProcess(lines, delays, log_path=...) as lc:`` starts it and
    waits for its one "localcloud grpc=..." line; leaving the block stops it
    (SIGTERM to that child only). Raises RuntimeError if it does not come up.
    """

    def __init__(self, script_lines: Sequence[str], delays: Delays, *, log_path: Path, cpu: int | None = None,
                 tts_cache: bool = False):
        self._lines = list(script_lines)
        self._delays = delays
        self._tts_cache = tts_cache
        self._log_path = log_path
        self._cpu = cpu
        self._scratch = tempfile.TemporaryDirectory(prefix="bench-localcloud-")
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def __enter__(self) -> Self:
        script = Path(self._scratch.name) / "script.txt"
        script.write_text("\n".join(self._lines) + "\n", encoding="utf-8")
        d = self._delays
        command = [PYTHON, "-m", "agentd", "localcloud", "--host", "127.0.0.1",
                   "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
                   "--stt-engine", "script", "--script", str(script),
                   "--stt-final-delay-ms", str(d.stt_final_ms), "--llm-ttft-ms", str(d.llm_ttft_ms),
                   "--llm-tokens-per-s", str(d.llm_tokens_per_s), "--tts-ttfb-ms", str(d.tts_ttfb_ms),
                   *(["--tts-cache"] if self._tts_cache else [])]
        self._log = open(self._log_path, "ab")
        self.process = subprocess.Popen(pinned(command, self._cpu), cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=self._log)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if ready:
                line = self.process.stdout.readline().decode(errors="replace")
                if line.startswith("localcloud grpc="):
                    return
                if not line:  # EOF: it exited
                    break
        raise RuntimeError(f"localcloud did not start (exit {self.process.poll()}); see {self._log_path}")

    def __exit__(self, *exc_info: object) -> None:
        stop_child(self.process)
        self._log.close()
        self._scratch.cleanup()


def stop_child(process: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    """Ask one child we started to stop (`sig`), then kill it if it will not."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def agentd_overrides(lc: LocalCloudProcess, *, port: int = 0, telemetry_dir: str = "") -> dict[str, object]:
    """Dotted config keys pointing agentd at `lc` over plaintext loopback (as `agentd demo` does)."""
    return {
        "server.host": "127.0.0.1", "server.port": port, "server.telemetry_dir": telemetry_dir,
        "stt.endpoint": lc.grpc_target, "stt.tls": False,
        "tts.endpoint": lc.grpc_target, "tts.tls": False,
        "llm.base_url": lc.http_base_url, "llm.api_key_env": "", "ops.listen": "127.0.0.1:0",
    }


def env_overrides(dotted: Mapping[str, object]) -> dict[str, str]:
    """The same keys as AGENTD__SECTION__KEY environment variables (booleans as true/false)."""
    def text(value: object) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return {"AGENTD__" + key.replace(".", "__").upper(): text(value) for key, value in dotted.items()}


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = START_TIMEOUT_S) -> None:
    """Return once something accepts TCP connections on 127.0.0.1:`port`; RuntimeError if `process` dies first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout_s:.0f} s")


# -- statistics --------------------------------------------------------------------------------------


def percentile(values: Iterable[float | None], q: float) -> float | None:
    """The q-th percentile (0..100, linear interpolation between ranks); None for no values."""
    data = [v for v in values if v is not None]
    return float(np.percentile(data, q)) if data else None


def fmt(value: float | None, digits: int = 0) -> str:
    """A number for a table cell; "-" for None."""
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_p(values: Iterable[float | None], q: float, digits: int = 0) -> str:
    """The q-th percentile of `values` for a table cell; "-" for no values."""
    return fmt(percentile(values, q), digits)


def verdict(ok: bool | None) -> str:
    return {True: "OK", False: "MISSED", None: "n/a"}[ok]


# -- the machine and /proc -----------------------------------------------------------------------------


def machine_description() -> dict[str, object]:
    """nproc, CPU model, RAM, Python version, kernel and the UTC date, for RESULTS.md."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": cpu, "ram_gb": round(mem_kb / 1024 / 1024, 1),
            "python": platform.python_version(), "kernel": platform.release(),
            "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def format_machine(machine: Mapping[str, object]) -> str:
    return (f"{machine['nproc']} CPUs ({machine['cpu_model']}), {machine['ram_gb']} GB RAM, "
            f"Python {machine['python']}, Linux {machine['kernel']}, {machine['date_utc']}")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime + stime of process `pid` (all its threads), from /proc/PID/stat.

    With `children`, plus the time of its children it has waited for (espeak-ng runs of localcloud).
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / _CLOCK_TICKS


def rss_kb(pid: int) -> int:
    """VmRSS of process `pid` in kB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_busy_seconds() -> dict[int, float]:
    """Busy time (user+nice+system+irq+softirq+steal) of each CPU since boot, from /proc/stat."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in values[:8])
            busy[int(name[3:])] = (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS
    return busy


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """utime + stime of each thread of process `pid` (tid -> seconds); the main thread's tid is `pid`."""
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        times[int(task.name)] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return times


def background_load_pct(seconds: float = 3.0) -> float:
    """Busy time of all CPUs over the next `seconds`, in % of one core (what others are running now)."""
    before = sum(cpu_busy_seconds().values())
    time.sleep(seconds)
    return 100 * (sum(cpu_busy_seconds().values()) - before) / seconds


QUIET_PCT = 20.0  # other processes' load, % of one core, under which the machine counts as quiet


def wait_for_quiet(max_wait_s: float, threshold_pct: float = QUIET_PCT) -> float:
    """Wait (at most `max_wait_s`) until the machine's load is under `threshold_pct` of a core; returns it.

    Benchmarks on a shared machine measure the neighbours too; this only waits, it never ends anything.
    """
    deadline = time.monotonic() + max_wait_s
    load = background_load_pct()
    while load > threshold_pct and time.monotonic() < deadline:
        print(f"waiting for a quiet machine: other processes use {load:.0f} % of a core", file=sys.stderr, flush=True)
        time.sleep(10)
        load = background_load_pct()
    return load


T = TypeVar("T")


def add_quiet_options(parser: argparse.ArgumentParser, *, each: str, retries: int, busy: str) -> None:
    """--wait-quiet-s and --retries (see run_quietly); `each` names what is run, `busy` when it is run again."""
    parser.add_argument("--wait-quiet-s", type=float, default=120,
                        help=f"before each {each}, wait up to this long for other processes to use "
                             f"< {QUIET_PCT:g} %% of a core (default 120)")
    parser.add_argument("--retries", type=int, default=retries,
                        help=f"run a {each} again when other processes {busy} meanwhile (default {retries})")


def run_quietly(run: Callable[[], T], args: argparse.Namespace, disturbed: Callable[[T], str | None], *,
                settle_s: float = 0.0) -> T:
    """`run()` once the machine is quiet (--wait-quiet-s); again, up to --retries times, while it was not.

    `disturbed(result)` says how other processes got busy during the run (printed to stderr), or None.
    Each attempt first sleeps `settle_s` (what the previous run started winds down).
    """
    for attempt in range(1 + args.retries):
        time.sleep(settle_s)
        wait_for_quiet(args.wait_quiet_s)
        result = run()
        why = disturbed(result)
        if why is None:
            break
        print(why + ("; running it again" if attempt < args.retries else ""), file=sys.stderr, flush=True)
    return result


class Sampler(Generic[T]):
    """``with Sampler(read, period_s) as s:`` calls `read()` every `period_s` in a thread; `s.samples` holds the results.

    `on_sample` (optional) gets each one as it comes. Sampling stops early, with the reason in `lost`,
    when `read` raises OSError or RuntimeError: the process it reads has gone (or is a zombie).
    """

    def __init__(self, read: Callable[[], T], period_s: float, on_sample: Callable[[T], None] | None = None):
        self.samples: list[T] = []
        self.lost = ""
        self._read, self._period_s, self._on_sample = read, period_s, on_sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                sample = self._read()
            except (OSError, RuntimeError) as exc:
                self.lost = repr(exc)
                return
            self.samples.append(sample)
            if self._on_sample is not None:
                self._on_sample(sample)


def runqueue_wait_s(pid: int, tid: int | None = None) -> float:
    """Seconds thread `tid` (default: the main thread) of `pid` spent runnable but waiting for a CPU.

    From /proc/PID/task/TID/schedstat (on-CPU ns, run-queue wait ns, timeslices): time a thread
    that wanted to run could not, because the core was busy with other threads or processes.
    """
    fields = Path(f"/proc/{pid}/task/{tid or pid}/schedstat").read_text().split()
    return int(fields[1]) / 1e9
