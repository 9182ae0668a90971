"""``python -m bench.gcwatch LOG serve ...``: run ``agentd`` with its garbage-collector pauses logged.

A diagnostic for bench.capacity (``--gc-log``), not part of agentd: it installs
a ``gc.callbacks`` hook that times every collection, appends one line per
collection that took at least ``MIN_PAUSE_MS`` to LOG ("<unix time> <gen>
<ms> <collected>"), then runs ``agentd.cli.main`` with the remaining arguments
in this same interpreter. A collection stops every thread that needs the GIL,
the Trio loop included, so long ones show up as TX lateness.
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


if __name__ == "__main__":
    gc.callbacks.append(GcWatch(sys.argv[1]))
    sys.exit(agentd_main(sys.argv[2:]))
