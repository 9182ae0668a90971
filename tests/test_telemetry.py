"""agentd.telemetry: timeline stamps and stages, log formatting, the JSONL sink."""

import datetime
import json

import pytest
import trio
import trio.testing

from agentd.telemetry import STAGES, TIMELINE_STAMPS, JsonlSink, TurnTimeline, format_stats_line, format_timeline

T0 = 100.0


def full_turn() -> TurnTimeline:
    """A turn whose caller stopped speaking at T0 + 10 s."""
    timeline = TurnTimeline()
    for name, at in [("ws_connected", 100.0), ("greeting_started", 100.25), ("speech_start", 108.5),
                     ("first_partial", 108.7), ("speech_end", 110.0), ("final_text", 110.312),
                     ("turn_committed", 110.32), ("ai_start", 110.32), ("ai_first_token", 110.68), ("ai_first_sentence", 110.7),
                     ("tts_start", 110.702), ("tts_first_audio", 110.95), ("first_reply_frame_sent", 111.04)]:
        timeline.stamp(name, at)
    return timeline


# --- TurnTimeline --------------------------------------------------------------------------------

def test_unknown_stamp_name_is_a_value_error():
    with pytest.raises(ValueError, match="speech_ended"):
        TurnTimeline().stamp("speech_ended", 1.0)


def test_first_stamp_wins_unless_asked_otherwise():
    timeline = TurnTimeline()
    timeline.stamp("first_partial", 101.0)
    timeline.stamp("first_partial", 102.0)
    assert timeline.get("first_partial") == 101.0
    timeline.stamp("first_partial", 103.0, first_only=False)
    assert timeline.get("first_partial") == 103.0
    assert timeline.get("final_text") is None


def test_stages_are_durations_between_their_stamps_in_ms():
    assert full_turn().stages() == {
        "greeting": 250.0, "stt_partial": 200.0, "stt_final": 312.0, "endpointing": 320.0, "ai_ttft": 360.0,
        "ai_sentence": 380.0, "tts_ttfb": 248.0, "playout": 90.0, "v2v": 1040.0,
    }


def test_stages_need_both_endpoints():
    timeline = TurnTimeline()
    timeline.stamp("speech_end", 110.0)
    timeline.stamp("turn_committed", 110.5)
    assert timeline.stages() == {"endpointing": 500.0}


def test_every_stage_is_defined_on_known_stamps():
    assert all(a in TIMELINE_STAMPS and b in TIMELINE_STAMPS for a, b in STAGES.values())


def test_record_has_stamps_relative_to_call_start_and_stages():
    timeline = TurnTimeline()
    timeline.stamp("final_text", 110.31236)
    timeline.stamp("speech_end", 110.00004)
    record = timeline.to_record("CA123", 2, T0, {"business": "acme", "text": "שלום"})
    assert record == {
        "call_sid": "CA123", "turn": 2, "business": "acme", "text": "שלום",
        "stamps_ms": {"speech_end": 10000.0, "final_text": 10312.4},
        "stages_ms": {"stt_final": 312.3},
    }
    assert list(record["stamps_ms"]) == ["speech_end", "final_text"]  # pipeline order
    json.dumps(record)


def test_record_extra_may_not_overwrite_its_own_keys():
    with pytest.raises(ValueError, match="turn"):
        full_turn().to_record("CA1", 1, T0, {"turn": 5})


# --- formatting ----------------------------------------------------------------------------------

def test_record_is_rendered_relative_to_speech_end_in_time_order():
    text = format_timeline(full_turn().to_record("CA1", 1, T0, {}))
    flat = " | ".join(line.strip() for line in text.splitlines())
    assert "speech_start -1500 | first_partial -1300 | speech_end +0 | final_text +312 | turn_committed +320 | ai_start +320" in flat
    assert flat.index("ws_connected -10000") < flat.index("greeting_started -9750") < flat.index("speech_start")
    assert "first_reply_frame_sent +1040 | v2v 1040 ms" in flat
    assert "stages ms: greeting 250 | stt_partial 200 | stt_final 312" in flat
    assert len(text.splitlines()) > 2 and all(line.startswith("  ") for line in text.splitlines())


def test_record_without_speech_end_is_relative_to_call_start():
    timeline = TurnTimeline()
    timeline.stamp("ws_connected", 100.0)
    timeline.stamp("greeting_started", 100.4)
    record = timeline.to_record("CA1", 0, T0, {})
    assert format_timeline(record) == "  ws_connected +0 | greeting_started +400\n  stages ms: greeting 400"


def test_record_read_back_from_jsonl_renders_the_same():
    record = full_turn().to_record("CA1", 1, T0, {"reply_text": "hi"})
    assert format_timeline(json.loads(json.dumps(record))) == format_timeline(record)


def test_empty_record_renders_as_such():
    assert format_timeline(TurnTimeline().to_record("CA1", 1, T0, {})) == "  (no stamps)"


def test_stats_line_format():
    line = format_stats_line(fps=50, queue=5, drops=0, stt_partial_s=0.7, stt_final_s=1.3, ai_s=0.4, tts_s=0.3,
                             total_s=1.9)
    assert line == "[TX] fps=50 q=5 drops=0 | [STT] p=0.70s f=1.30s | [AI]=0.40s | [TTS]=0.30s total=1.90s"


def test_stats_line_shows_unknown_values_as_dashes():
    line = format_stats_line(fps=49.6, queue=0, drops=None, stt_partial_s=None, stt_final_s=None, ai_s=None,
                             tts_s=None, total_s=None)
    assert line == "[TX] fps=50 q=0 drops=- | [STT] p=- f=- | [AI]=- | [TTS]=- total=-"


# --- JsonlSink -----------------------------------------------------------------------------------

def read_jsonl(path):
    """The file's records; each must carry `time`, an ISO 8601 UTC moment (popped, so the rest compares)."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for record in records:
        moment = datetime.datetime.fromisoformat(record.pop("time").replace("Z", "+00:00"))
        assert moment.utcoffset() == datetime.timedelta(0)
    return records


async def test_sink_appends_turn_and_call_records_to_daily_files(tmp_path):
    sink = JsonlSink(str(tmp_path / "telemetry"), day=lambda: "20261121")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            sink.emit_turn({"call_sid": "CA1", "turn": 1, "text": "שלום"})
            sink.emit_call({"call_sid": "CA1", "turns": 1})
            await trio.testing.wait_all_tasks_blocked()
            sink.emit_turn({"call_sid": "CA1", "turn": 2})
            sink.close()
    assert read_jsonl(tmp_path / "telemetry" / "turns-20261121.jsonl") == [
        {"call_sid": "CA1", "turn": 1, "text": "שלום"}, {"call_sid": "CA1", "turn": 2}]
    assert read_jsonl(tmp_path / "telemetry" / "calls-20261121.jsonl") == [{"call_sid": "CA1", "turns": 1}]
    assert "שלום" in (tmp_path / "telemetry" / "turns-20261121.jsonl").read_text(encoding="utf-8")
    assert (sink.written, sink.dropped) == (3, 0)


async def test_sink_drops_and_counts_when_full_instead_of_blocking(tmp_path):
    sink = JsonlSink(str(tmp_path), capacity=2, day=lambda: "20261121")
    for turn in range(5):  # nobody is draining yet: emit must return at once regardless
        sink.emit_turn({"turn": turn})
    assert sink.dropped == 3
    sink.close()
    with trio.fail_after(10):
        await sink.run()
    assert read_jsonl(tmp_path / "turns-20261121.jsonl") == [{"turn": 0}, {"turn": 1}]
    assert sink.written == 2


async def test_sink_writes_queued_records_when_cancelled(tmp_path):
    sink = JsonlSink(str(tmp_path), day=lambda: "20261121")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            for turn in range(3):
                sink.emit_turn({"turn": turn})
            nursery.cancel_scope.cancel()
    assert [r["turn"] for r in read_jsonl(tmp_path / "turns-20261121.jsonl")] == [0, 1, 2]


async def test_emit_after_close_is_counted_as_dropped(tmp_path):
    sink = JsonlSink(str(tmp_path))
    sink.close()
    sink.emit_call({"call_sid": "CA1"})
    assert sink.dropped == 1


async def test_disabled_sink_does_nothing(tmp_path):
    sink = JsonlSink("")
    assert not sink.enabled
    sink.emit_turn({"turn": 1})
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
    assert (sink.written, sink.dropped) == (0, 0)


async def test_sink_that_cannot_create_its_directory_fails_to_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    sink = JsonlSink(str(blocker / "telemetry"))
    with pytest.raises(NotADirectoryError):
        await sink.run()


async def test_write_failure_costs_the_batch_not_the_daemon(tmp_path, caplog):
    sink = JsonlSink(str(tmp_path), day=lambda: "20261121")
    (tmp_path / "turns-20261121.jsonl").mkdir()  # appending to a directory fails
    sink.emit_turn({"turn": 1})
    sink.emit_call({"call_sid": "CA1"})
    sink.close()
    with trio.fail_after(10):
        await sink.run()
    assert sink.dropped == 2 and sink.written == 0
    assert "telemetry: dropped 2 records" in caplog.text


def test_prune_deletes_only_the_sinks_files_older_than_keep_days(tmp_path):
    from agentd.telemetry import prune
    names = ["turns-20261101.jsonl", "calls-20261104.jsonl", "turns-20261105.jsonl", "calls-20261205.jsonl",
             "notes-20200101.jsonl", "turns-latest.jsonl"]
    for name in names:
        (tmp_path / name).write_text("{}\n")
    removed = prune(str(tmp_path), 30, datetime.date(2026, 12, 5))
    assert removed == ["calls-20261104.jsonl", "turns-20261101.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names) - set(removed))
