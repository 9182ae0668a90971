"""`agentd report` on a telemetry directory written by the real JsonlSink, with known answers."""

from __future__ import annotations

import datetime

import pytest
import trio

from agentd.cli import main
from agentd.report import build_report, load_records
from agentd.telemetry import JsonlSink

V2V_MS = [100.0, 200.0, 300.0, 400.0]  # p50 250 (linear interpolation), p95 385, max 400


def turn(call_sid: str, n: int, v2v_ms: float, **extra) -> dict:
    stamps = {"speech_end": 1000.0, "ai_start": 1000.0 + v2v_ms / 4, "first_reply_frame_sent": 1000.0 + v2v_ms}
    return {"call_sid": call_sid, "business": "acme", "turn": n, "stamps_ms": stamps,
            "stages_ms": {"endpointing": v2v_ms / 4, "v2v": v2v_ms}, "failed": False, "speculation": "none",
            "fallbacks": [], **extra}


async def write_telemetry(directory: str, turns: list[dict], calls: list[dict]) -> None:
    sink = JsonlSink(directory)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for record in turns:
            sink.emit_turn(record)
        for record in calls:
            sink.emit_call(record)
        sink.close()


@pytest.fixture
async def telemetry(tmp_path) -> str:
    turns = [turn("CA1", 1, V2V_MS[0], speculation="hit"), turn("CA1", 2, V2V_MS[1], fallbacks=["filler"]),
             turn("CA2", 1, V2V_MS[2], speculation="miss", failed=True, fallbacks=["apology", "filler"]),
             turn("CA2", 2, V2V_MS[3], speculation="hit"),
             turn("CA3", 1, 5000.0) | {"business": "other"}]
    calls = [{"call_sid": "CA1", "business": "acme", "end_reason": "stop", "greeting": {}},
             {"call_sid": "CA2", "business": "acme", "end_reason": "drain timeout", "greeting": {}},
             {"call_sid": "CA3", "business": "other", "end_reason": "stop", "greeting": {}}]
    await write_telemetry(str(tmp_path), turns, calls)
    return str(tmp_path)


async def test_report_gives_known_percentiles_and_rates(telemetry, capsys):
    assert main(["report", telemetry, "--business", "acme"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "2 calls, 4 turns"
    v2v = next(line for line in out if line.startswith("v2v")).split()
    assert v2v == ["v2v", "4", "250", "385", "400"]
    endpointing = next(line for line in out if line.startswith("endpointing")).split()
    assert endpointing == ["endpointing", "4", "62", "96", "100"]  # a quarter of each V2V
    assert "calls ended: drain timeout 1, stop 1" in out
    assert "failed turns: 1 (25.0%)" in out
    assert next(line for line in out if line.startswith("fallbacks")).startswith(
        "fallbacks (turns): apology 1 (25.0%), filler 2 (50.0%), mark_timeout 0 (0.0%)")
    assert next(line for line in out if line.startswith("speculation")).startswith(
        "speculation: 2 (66.7%) of 3 drafted turns hit")


async def test_since_keeps_only_later_records(telemetry):
    written = load_records(telemetry, "turns")
    assert all(datetime.datetime.fromisoformat(r["time"].replace("Z", "+00:00")).tzinfo for r in written)
    future = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
    assert load_records(telemetry, "turns", since=future) == []
    assert len(load_records(telemetry, "turns", since=future - datetime.timedelta(days=2))) == 5


async def test_plot_draws_a_png(telemetry, tmp_path, capsys):
    out = tmp_path / "report.png"
    assert main(["report", telemetry, "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert f"plot: {out}" in capsys.readouterr().out


def test_an_empty_directory_reports_nothing_without_failing(tmp_path):
    report = build_report([], [])
    assert (report.calls, report.turns, dict(report.stages)) == (0, 0, {})
    assert main(["report", str(tmp_path / "missing")]) == 2
