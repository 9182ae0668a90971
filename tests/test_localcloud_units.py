"""localcloud's pure parts (segmenter, engines, rules, settings) and its lifecycle."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from agentd.codecs import riff
from agentd.testbed.localcloud import LocalCloud, LocalCloudSettings, read_script
from agentd.testbed.localcloud.chat import has_word, status_error, tokens, validate_chat_request
from agentd.testbed.localcloud.cli import build_parser, settings_from_args
from agentd.testbed.localcloud.espeak import espeak_voice, espeak_words_per_minute, ssml_to_text
from agentd.testbed.localcloud.segmenter import EnergySegmenter, Framer, SegmentEnded, SegmentStarted
from agentd.testbed.localcloud.settings import CloudState
from agentd.testbed.localcloud.stt_engines import (
    Hypothesis,
    ScriptCursor,
    ScriptDecoder,
    SpeechActivity,
    StreamRecognizer,
    upsample_2x,
)
from agentd.testbed.localcloud.tts_service import corrupt_riff

FRAME = 160


def voiced(frames: int) -> np.ndarray:
    """`frames` 20 ms frames of a 200 Hz tone at about -20 dBFS."""
    t = np.arange(frames * FRAME) / 8000
    return (np.sin(2 * np.pi * 200 * t) * 4600).astype(np.int16)


def quiet(frames: int) -> np.ndarray:
    return np.zeros(frames * FRAME, dtype=np.int16)


def push_all(segmenter: EnergySegmenter, pcm: np.ndarray) -> list:
    events = (segmenter.push(pcm[i : i + FRAME]) for i in range(0, len(pcm), FRAME))
    return [e for e in events if e is not None]


# --- segmenter ---------------------------------------------------------------------------------------


def test_segment_starts_at_the_first_voiced_frame_and_ends_after_the_gap():
    segmenter = EnergySegmenter(threshold_dbfs=-45, gap_ms=300)
    events = push_all(segmenter, np.concatenate([quiet(5), voiced(10), quiet(15), voiced(3), quiet(14)]))
    assert events == [
        SegmentStarted(start_s=0.1),
        SegmentEnded(start_s=0.1, end_s=0.3),
        SegmentStarted(start_s=0.6),
    ]
    assert segmenter.in_segment and segmenter.voiced_ms == 60


def test_pauses_shorter_than_the_gap_stay_in_one_segment():
    segmenter = EnergySegmenter(gap_ms=300)
    events = push_all(segmenter, np.concatenate([voiced(5), quiet(14), voiced(5), quiet(15)]))
    assert events == [SegmentStarted(start_s=0.0), SegmentEnded(start_s=0.0, end_s=0.48)]


def test_a_single_loud_frame_is_not_speech():
    assert push_all(EnergySegmenter(), np.concatenate([quiet(3), voiced(1), quiet(30)])) == []


def test_close_ends_an_open_segment():
    segmenter = EnergySegmenter()
    push_all(segmenter, voiced(4))
    assert segmenter.close() == SegmentEnded(start_s=0.0, end_s=0.08)
    assert segmenter.close() is None


def test_framer_keeps_the_remainder_and_pads_it_on_drain():
    framer = Framer()
    assert [len(f) for f in framer.push(np.ones(250, dtype=np.int16))] == [160]
    assert [len(f) for f in framer.push(np.ones(100, dtype=np.int16))] == [160]
    (last,) = framer.drain()
    assert list(last[:30]) == [1] * 30 and not last[30:].any()
    assert framer.drain() == []


# --- engines -----------------------------------------------------------------------------------------


def script_recognizer(lines: tuple[str, ...]) -> StreamRecognizer:
    decoder = ScriptDecoder(lines, partial_interval_ms=120)
    return StreamRecognizer(decoder, threshold_dbfs=-45, gap_ms=300, cpu_bound=False)


def test_script_recognizer_reveals_words_with_voiced_time():
    recognizer = script_recognizer(("one two three",))
    events = recognizer.feed(np.concatenate([voiced(25), quiet(16)]))
    hypotheses = [e for e in events if isinstance(e, Hypothesis)]
    assert [(h.transcript, h.is_final) for h in hypotheses] == [
        ("one", False), ("one two", False), ("one two three", False), ("one two three", True),
    ]
    assert [h.end_s for h in hypotheses] == [0.12, 0.24, 0.36, 0.5]
    assert [e for e in events if isinstance(e, SpeechActivity)] == [
        SpeechActivity(begin=True, at_s=0.0), SpeechActivity(begin=False, at_s=0.5),
    ]


def test_script_recognizer_finish_finalizes_the_open_segment():
    recognizer = script_recognizer(("only",))
    recognizer.feed(voiced(10))
    (final,) = [e for e in recognizer.finish() if isinstance(e, Hypothesis)]
    assert (final.transcript, final.is_final, final.end_s) == ("only", True, 0.2)


def transcripts(events: list) -> list[tuple[str, bool]]:
    return [(e.transcript, e.is_final) for e in events if isinstance(e, Hypothesis)]


def test_without_a_continuation_mark_each_pause_closes_a_result():
    recognizer = script_recognizer(("book a table.", "for four."))
    events = recognizer.feed(np.concatenate([voiced(20), quiet(25), voiced(20), quiet(16)]))
    assert transcripts(events) == [
        ("book", False), ("book a", False), ("book a table.", False), ("book a table.", True),
        ("for", False), ("for four.", False), ("for four.", True),
    ]


def test_a_continued_line_makes_one_result_of_two_segments():
    recognizer = script_recognizer(("book a table", "+ for four.", "next"))
    events = recognizer.feed(np.concatenate([voiced(20), quiet(25), voiced(20), quiet(16), voiced(10)]))
    assert transcripts(events) == [
        ("book", False), ("book a", False), ("book a table", False),  # the first pause ends no result
        ("book a table for", False), ("book a table for four.", False), ("book a table for four.", True),
        ("next", False),  # a line without the mark starts afresh
    ]
    assert [e.begin for e in events if isinstance(e, SpeechActivity)] == [True, False, True, False, True]


def test_a_continued_line_moves_a_shared_cursor_past_the_line_it_continues():
    cursor = ScriptCursor()
    decoder = ScriptDecoder(("book a table", "+ for four."), partial_interval_ms=120, cursor=cursor)
    recognizer = StreamRecognizer(decoder, threshold_dbfs=-45, gap_ms=300, cpu_bound=False)
    recognizer.feed(np.concatenate([voiced(20), quiet(25)]))
    assert cursor.peek() == 1  # no final is coming for line 0: nothing left to deliver
    events = recognizer.feed(np.concatenate([voiced(20), quiet(16)]))
    assert transcripts(events)[-1] == ("book a table for four.", True)


def test_closed_recognizer_ignores_audio():
    recognizer = script_recognizer(("x",))
    recognizer.close()
    assert recognizer.feed(voiced(20)) == [] and recognizer.finish() == []


def test_upsampling_is_continuous_across_blocks():
    signal_8k = (np.sin(np.arange(400) / 7) * 10000).astype(np.int16)
    whole, _ = upsample_2x(signal_8k, 0)
    first, previous = upsample_2x(signal_8k[:150], 0)
    second, _ = upsample_2x(signal_8k[150:], previous)
    assert np.array_equal(np.concatenate([first, second]), whole)
    assert np.array_equal(whole[1::2], signal_8k)


# --- chat rules and errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "keyword", "found"),
    [
        ("Are you OPEN?", "open", True),
        ("reopen", "open", False),
        ("open-minded", "open", True),  # a hyphen is a word boundary
        ("מה השעות שלכם", "השעות", True),
        ("בשעות הבוקר", "שעות", False),  # Hebrew prefixes make another word
        ("are you open late", "open late", True),
        ("anything", "", False),
    ],
)
def test_keywords_match_whole_words_in_any_case(text, keyword, found):
    assert has_word(text, keyword) is found


def test_tokens_are_words_with_their_trailing_space():
    assert tokens("We open  at 8. ") == ["We ", "open  ", "at ", "8. "]
    assert "".join(tokens("שלום, מה שלומך?")) == "שלום, מה שלומך?"


def test_validation_names_the_missing_parameter():
    assert validate_chat_request({"messages": []}).body["error"]["param"] == "model"
    assert validate_chat_request({"model": "m", "messages": []}).body["error"]["code"] == "empty_array"
    assert validate_chat_request([1]).status == 400
    assert validate_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}) is None


def test_status_errors_look_like_openai():
    assert status_error(429).body["error"]["code"] == "rate_limit_exceeded"
    assert status_error(502).body["error"]["type"] == "server_error"


# --- espeak mapping --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("language", "voice"), [("he-IL", "he"), ("iw-IL", "he"), ("en-US", "en-us"), ("en-GB", "en"), ("fr-FR", "fr")]
)
def test_espeak_voice_for_a_language_code(language, voice):
    assert espeak_voice(language) == voice


def test_speaking_rate_maps_to_words_per_minute():
    assert [espeak_words_per_minute(r) for r in (0, 1.0, 2.0, 0.25, 4.0)] == [175, 175, 350, 80, 450]


def test_ssml_to_text_drops_tags_and_decodes_entities():
    assert ssml_to_text('<speak>Fish &amp; chips<break time="200ms"/> now</speak>') == "Fish & chips now"


def test_corrupted_riff_is_refused_by_the_parser():
    good = riff.build_wav(b"\xff" * 80, format_tag=riff.MULAW, channels=1, sample_rate_hz=8000, bits_per_sample=8)
    assert riff.parse_wav(good).data == b"\xff" * 80
    with pytest.raises(riff.RiffError):
        riff.parse_wav(corrupt_riff(good))


# --- settings, state, CLI ----------------------------------------------------------------------------------


def test_settings_are_validated():
    with pytest.raises(ValueError, match="stt_engine"):
        LocalCloudSettings(stt_engine="whisper")
    with pytest.raises(ValueError):
        LocalCloudSettings(stt_stream_limit_s=0)


def test_settings_are_frozen_and_hold_a_read_only_business_map():
    settings = LocalCloudSettings(businesses={"a": object()}, script_lines=["x"])
    assert settings.script_lines == ("x",)
    with pytest.raises(TypeError):
        settings.businesses["b"] = object()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.stt_engine = "pocketsphinx"


def test_fail_opens_count_down():
    state = CloudState(LocalCloudSettings())
    state.set_faults(stt_fail_opens=2, tts_error=True)
    assert [state.take_stt_fail_open() for _ in range(3)] == [True, True, False]
    assert state.faults.tts_error, "other faults are untouched"


def test_configure_rejects_invalid_changes_and_keeps_the_old_settings():
    state = CloudState(LocalCloudSettings())
    with pytest.raises(ValueError):
        state.configure(stt_engine="nope")
    assert state.settings.stt_engine == "script"


def test_cli_arguments_become_settings(tmp_path):
    script = tmp_path / "script.txt"
    script.write_text("שלום\n\nwhat time do you open\n", encoding="utf-8")
    args = build_parser().parse_args(["--script", str(script), "--stt-engine", "pocketsphinx", "--llm-ttft-ms", "250"])
    settings = settings_from_args(args, businesses={})
    assert settings.script_lines == ("שלום", "what time do you open") == read_script(str(script))
    assert (settings.stt_engine, settings.llm_ttft_ms, settings.grpc_port, settings.http_port) == (
        "pocketsphinx", 250, 50051, 8081,
    )


def test_cli_serves_until_sigterm():
    command = [sys.executable, "-m", "agentd", "localcloud", "--grpc-port", "0", "--http-port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = process.stdout.readline()
        assert line.startswith("localcloud grpc=127.0.0.1:") and "http=http://127.0.0.1:" in line
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()


# --- lifecycle ---------------------------------------------------------------------------------------


def test_stop_ends_every_thread_it_started():
    before = set(threading.enumerate())
    with LocalCloud(LocalCloudSettings()) as cloud:
        assert cloud.grpc_target.startswith("127.0.0.1:")
        assert cloud.http_base_url.endswith("/v1")
    leftover = {t for t in set(threading.enumerate()) - before if t.name.startswith("localcloud")}
    assert leftover == set()


def test_endpoints_are_unknown_when_not_running():
    cloud = LocalCloud()
    with pytest.raises(RuntimeError):
        cloud.grpc_target
    cloud.stop()  # stopping a cloud that never started is harmless


def test_a_busy_port_fails_start_loudly():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match="failed to start"):
            LocalCloud(LocalCloudSettings(http_port=port)).start()
