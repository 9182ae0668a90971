"""The live status page behind the ops listener's ``GET /``: plain HTML and inline SVG.

Three parts: the daemon's state (ready, draining, why not ready), the calls up
now (business, FSM state, duration), and a stage waterfall of the last turns
(each stage drawn from its start to its end, in ms after the caller stopped
speaking). The browser re-fetches it every few seconds (a meta refresh): no
script, no build step, nothing to install.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from agentd.telemetry import STAGES

if TYPE_CHECKING:
    from agentd.server import Server

__all__ = ["WATERFALL_STAGES", "render"]

REFRESH_S = 3
# The stages of a reply, in pipeline order, as drawn in the waterfall (v2v is the whole bar).
WATERFALL_STAGES = ("stt_final", "endpointing", "ai_ttft", "ai_sentence", "tts_ttfb", "playout", "v2v")
_COLOURS = {"stt_final": "#6a9fd8", "endpointing": "#9b7fd1", "ai_ttft": "#e0a030", "ai_sentence": "#f0c870",
            "tts_ttfb": "#4caf7d", "playout": "#8bd0a8", "v2v": "#d05050"}
_ROW_PX, _LABEL_PX, _PLOT_PX = 16, 170, 560

_STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{padding:2px 10px;border-bottom:1px solid #ddd;text-align:left}
.ok{color:#176f2c;font-weight:bold}.bad{color:#b00020;font-weight:bold}h2{margin-top:1.4em}"""


def render(server: Server, now: float) -> str:
    """The whole page for the server's state at Trio time ``now``."""
    parts = [f'<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">',
             f"<title>agentd</title><style>{_STYLE}</style></head><body>",
             "<h1>agentd</h1>", _state(server, now), "<h2>Calls up now</h2>", _calls(server.calls, now),
             "<h2>Last turns: stage waterfall</h2>", waterfall(server.recent_turns), "</body></html>"]
    return "\n".join(parts)


def _state(server: Server, now: float) -> str:
    reasons = server.not_ready()
    ready = '<span class="ok">ready</span>' if not reasons else (
        '<span class="bad">not ready</span>: ' + html.escape(", ".join(reasons)))
    draining = '<span class="bad">draining</span>' if server.draining else "no"
    refused = ", ".join(f"{html.escape(k)} {v}" for k, v in sorted(server.refused.items())) or "none"
    return (f"<p>{ready} &middot; draining: {draining} &middot; calls: {len(server.calls)} &middot; "
            f"refused: {refused} &middot; up {_duration(now - server.started_at)}</p>")


def _calls(calls: Iterable[Any], now: float) -> str:
    rows = []
    for call in sorted(calls, key=lambda c: c.t0):
        business = getattr(getattr(call, "business", None), "name", "-")
        state = call.states[-1] if call.states else "starting"
        rows.append(f"<tr><td>{html.escape(call.call_sid)}</td><td>{html.escape(business)}</td>"
                    f"<td>{html.escape(state)}</td><td>{_duration(now - call.t0)}</td></tr>")
    if not rows:
        return "<p>No calls.</p>"
    return "<table><tr><th>call</th><th>business</th><th>state</th><th>duration</th></tr>" + "".join(rows) + "</table>"


def waterfall(turns: Iterable[Mapping[str, Any]]) -> str:
    """An SVG with one row per turn stage: a bar from the stage's start to its end (ms after speech_end)."""
    rows = []
    for turn in turns:
        stamps = turn.get("stamps_ms", {})
        origin = stamps.get("speech_end")
        if origin is None:
            continue
        label = f"{turn.get('call_sid', '?')[-6:]} #{turn.get('turn', '?')}"
        for stage in WATERFALL_STAGES:
            start, end = (stamps.get(name) for name in STAGES[stage])
            if start is not None and end is not None:
                rows.append((label, stage, start - origin, end - origin))
            label = ""
    if not rows:
        return "<p>No turns yet.</p>"
    # A speculative reply starts before the caller stops: such stages begin left of 0 (negative ms).
    lo = min(0.0, *(min(start, end) for *_, start, end in rows))
    span = max(max(max(start, end) for *_, start, end in rows) - lo, 1.0)
    scale = _PLOT_PX / span
    height = _ROW_PX * len(rows) + 24
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_LABEL_PX + _PLOT_PX + 70}" height="{height}" '
           'font-size="11" font-family="sans-serif">']
    for i, (label, stage, start, end) in enumerate(rows):
        y = i * _ROW_PX
        x, width = _LABEL_PX + (min(start, end) - lo) * scale, max(abs(end - start) * scale, 1)
        out += [f'<text x="0" y="{y + 12}">{html.escape(label)}</text>',
                f'<text x="{_LABEL_PX - 4}" y="{y + 12}" text-anchor="end">{stage}</text>',
                f'<rect x="{x:.1f}" y="{y + 2}" width="{width:.1f}" height="{_ROW_PX - 4}" fill="{_COLOURS[stage]}"/>',
                f'<text x="{x + width + 3:.1f}" y="{y + 12}">{end - start:.0f} ms</text>']
    axis_y = _ROW_PX * len(rows) + 14
    zero = _LABEL_PX - lo * scale
    out.append(f'<line x1="{zero:.1f}" y1="0" x2="{zero:.1f}" y2="{axis_y - 10}" stroke="#888" stroke-dasharray="3"/>')
    out.append(f'<text x="{_LABEL_PX}" y="{axis_y}">dashed line = end of the caller\'s speech (0 ms); '
               f'width = {span:.0f} ms</text></svg>')
    return "\n".join(out)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}:{seconds % 60:02d}"
