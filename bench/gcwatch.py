"""``python -m bench.gcwatch LOG [--freeze] serve ...``: run ``agentd`` with its garbage-collector pauses logged.

A diagnostic for bench.capacity (``--gc-log``, ``--gc-freeze``), not part of
agentd: it installs a ``gc.callbacks`` hook that times every collection,
appends one line per collection that took at least ``MIN_PAUSE_MS`` to LOG
("<unix time> <gen> <ms> <collected>"), then runs ``agentd.cli.main`` with the
remaining arguments in this same interpreter. A collection stops every thread
that needs the GIL, the Trio loop included, so long ones show up as TX
lateness. ``--freeze`` first imports agentd's daemon modules and calls
``gc.freeze()``, so full collections stop re-scanning the ~70,000 objects the
imports leave behind: the experiment behind a suggested change to agentd.
"""

from __future__ import annotations

import gc
import sys
import time

from agentd.cli import main as agentd_main

MIN_PAUSE_MS = 5.0


class GcWatch:
    """Times each collection (gc.callbacks: "start"/"stop") and logs the long ones."""

    def __init__(self, log_path: str) -> None:
        # Open for the life of the process; line-buffered, so a crash loses nothing.
        self._log = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause_ms = (time.perf_counter() - self._started) * 1000
        if pause_ms >= MIN_PAUSE_MS:
            self._log.write(f"{time.time():.3f} {info['generation']} {pause_ms:.1f} {info['collected']}\n")


def read_pauses(log_path: str, since: float, until: float) -> list[tuple[int, float]]:
    """(generation, ms) of the logged collections between two unix times."""
    pauses = []
    try:
        with open(log_path, encoding="utf-8") as log:
            for line in log:
                at, generation, ms, _ = line.split()
                if since <= float(at) <= until:
                    pauses.append((int(generation), float(ms)))
    except FileNotFoundError:
        pass
    return pauses


def _freeze_after_imports() -> None:
    import agentd.server  # noqa: F401  (the daemon's whole import graph)

    gc.collect()
    gc.freeze()


if __name__ == "__main__":
    log_path, rest = sys.argv[1], sys.argv[2:]
    if rest[:1] == ["--freeze"]:
        rest = rest[1:]
        _freeze_after_imports()
    gc.callbacks.append(GcWatch(log_path))
    sys.exit(agentd_main(rest))
