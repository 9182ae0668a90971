"""``agentd report --plot``: the median turn's stage waterfall and the V2V histogram, as one PNG.

Kept apart from agentd.report because matplotlib is an optional extra
(``agentd[plot]``): a production install reports in text without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt  # noqa: E402 -- after the backend is chosen

from agentd.report import Report  # noqa: E402
from agentd.telemetry import STAGES  # noqa: E402

__all__ = ["plot"]

_WATERFALL = ("stt_final", "endpointing", "ai_ttft", "ai_sentence", "tts_ttfb", "playout", "v2v")


def plot(report: Report, v2v_ms: Sequence[float], out_path: str) -> None:
    """Write a PNG with the median-turn waterfall (left) and the V2V histogram (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    _waterfall(left, report)
    _histogram(right, v2v_ms, report)
    fig.suptitle(f"agentd: {report.calls} calls, {report.turns} turns")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def _waterfall(ax, report: Report) -> None:
    stamps = report.median_stamps_ms
    rows = [(stage, stamps[a], stamps[b]) for stage in _WATERFALL
            for a, b in [STAGES[stage]] if a in stamps and b in stamps]
    for i, (stage, start, end) in enumerate(rows):
        ax.barh(i, end - start, left=start, color=f"C{i}")
        ax.text(max(start, end) + 10, i, f"{end - start:.0f} ms", va="center", fontsize=9)
    ax.set_yticks(range(len(rows)), [stage for stage, *_ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms after the caller stopped speaking (median of each moment)")
    ax.set_title("Median turn, stage by stage")
    if rows:
        ax.set_xlim(min(0, min(s for _, s, _ in rows)), max(e for *_, e in rows) * 1.18)


def _histogram(ax, v2v_ms: Sequence[float], report: Report) -> None:
    ax.hist(v2v_ms, bins=min(30, max(5, len(v2v_ms) // 3)), color="C3", edgecolor="white")
    if "v2v" in report.stages:
        s = report.stages["v2v"]
        for value, label, style in ((s.p50_ms, "p50", "--"), (s.p95_ms, "p95", ":")):
            ax.axvline(value, color="black", linestyle=style, label=f"{label} {value:.0f} ms")
        ax.legend()
    ax.set_xlabel("voice-to-voice, ms")
    ax.set_ylabel("turns")
    ax.set_title(f"V2V over {len(v2v_ms)} turns")
