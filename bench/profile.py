"""Sample agentd with py-spy during a load, and rank where its CPU goes.

py-spy (``pip install py-spy`` into the venv; it is not an agentd dependency)
is started on agentd's pid after a delay (once the load is up), records for a
fixed time, sampling only the thread that holds the GIL (``--gil``: threads
waiting in epoll or on a lock release the GIL, so what is sampled is Python
actually running), and writes collapsed stacks ("frame;frame;... count",
frame = "func (file:line)"). py-spy pauses agentd for each of its 100 samples
a second (tens of microseconds each): without pausing (``--nonblocking``) many
stacks come out torn, which ruins the inclusive ranking.
`summarize` ranks the tasks the samples worked for (the coroutine Trio was
stepping: a call's handler, a WebSocket reader, a reply, the TX pacer...; or
another thread), functions by self samples (the leaf frame: where the CPU
was) and by inclusive samples (anywhere on the stack; agentd's own functions
are listed separately, which attributes library time to the agentd feature
that caused it), and files by self samples. Shares are of GIL-holding time: the CPU that limits one process.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from bench import common

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def py_spy() -> str | None:
    """The py-spy executable next to this Python, or on PATH; None if not installed."""
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Profiler:
    """Records `pid` for `duration_s` seconds starting `delay_s` from now, in a background thread."""

    def __init__(self, pid: int, *, delay_s: float, duration_s: float, out: Path, cpu: int | None):
        self.out = out
        self.error: str | None = None
        self._command = common.pinned([py_spy() or "py-spy", "record", "--pid", str(pid),
                                       "--duration", str(int(duration_s)), "--rate", "100", "--format", "raw",
                                       "--gil", "--output", str(out)], cpu)
        self._delay_s = delay_s
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="py-spy", daemon=True)

    def start(self) -> Profiler:
        self._thread.start()
        return self

    def join(self) -> None:
        self._cancel.set()  # a load that ended before the delay is not profiled
        self._thread.join()

    def _run(self) -> None:
        if self._cancel.wait(self._delay_s):
            self.error = "the load ended before profiling started"
            return
        done = subprocess.run(self._command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            self.error = (done.stderr or done.stdout).strip()[-300:]


def _short(frame: str) -> tuple[str, str]:
    """("func (file)", "file") for a py-spy frame, with site-packages/repo prefixes cut."""
    match = _FRAME.match(frame.strip())
    func, file = (match["func"], match["file"]) if match else (frame.strip(), "?")
    file = re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", "", file)
    file = file.replace(str(common.REPO) + "/", "")
    return f"{func} ({file})", file


def _task(frames: list[tuple[str, str]]) -> str:
    """What the sample was working for: the coroutine Trio was stepping, or the thread's entry point."""
    names = [name.split(" (")[0] for name, _ in frames]
    if "unrolled_run" in names:
        at = names.index("unrolled_run") + 1
        return frames[at][0] if at < len(frames) else "trio scheduler (run loop)"
    entry = next((name for name, _ in frames if not name.startswith(("Thread.", "_bootstrap", "<module>"))), "?")
    return f"other thread: {entry}"


def summarize(raw: Path, top: int = 15) -> dict[str, object]:
    """Self and inclusive sample shares from py-spy's raw output (percent of all samples)."""
    self_func, self_file, inclusive, tasks, total = Counter(), Counter(), Counter(), Counter(), 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";")]
        n = int(count)
        total += n
        self_func[frames[-1][0]] += n
        self_file[frames[-1][1]] += n
        tasks[_task(frames)] += n
        for name in {f[0] for f in frames}:
            inclusive[name] += n

    def share(counter: Counter) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)] if total else []

    agentd_only = Counter({name: n for name, n in inclusive.items() if "(agentd/" in name})
    return {"samples": total, "by_task": share(tasks), "self": share(self_func), "self_by_file": share(self_file),
            "inclusive": share(inclusive), "agentd_inclusive": share(agentd_only)}


def print_summary(summary: dict[str, object]) -> None:
    print(f"\n== py-spy profile of agentd: {summary['samples']} samples (busy time only; % of samples)")
    for title, key in (("by task (the coroutine Trio was running, or another thread)", "by_task"),
                       ("self time by file", "self_by_file"), ("self time by function", "self"),
                       ("inclusive time of agentd's functions (callees included)", "agentd_inclusive")):
        print(f"  {title}:")
        for name, pct in summary[key]:
            print(f"    {pct:5.1f} %  {name}")
