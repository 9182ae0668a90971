"""VoiceActivity: when the caller speaks, from mu-law telephone audio.

Two kinds of voice: a synthetic vowel (harmonics of 140 Hz shaped by /a/
formants), whose edges are exact to the sample, for the run-length rules; and
espeak-ng speech, for realism. Every call "opens" on a short stretch of line
noise followed by silence (`LINE`), as real calls do, so that webrtcvad's
warm-up is behind us; the warm-up itself has its own tests.
"""

import dataclasses
import shutil
import subprocess
import wave

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.codecs.mulaw import ulaw_encode
from agentd.codecs.pcm import resample
from agentd.errors import ConfigError
from agentd.vad import VadSettings, VoiceActivity, VoiceEnded, VoiceStarted
from shipped import SHIPPED

SHIPPED_VAD = VadSettings.from_config(SHIPPED)

RATE = 8000
FRAME = 0.020
T0 = 1000.0  # call-clock time of the first byte: events must be on the caller's clock


def silence(ms: int) -> bytes:
    return b"\xff" * (ms * 8)


def noise(ms: int, dbfs: float, seed: int = 0) -> bytes:
    x = np.random.default_rng(seed).normal(0.0, 32768 * 10 ** (dbfs / 20), ms * 8)
    return ulaw_encode(np.clip(x, -32768, 32767).astype(np.int16))


def hum(ms: int, dbfs: float) -> bytes:
    t = np.arange(ms * 8) / RATE
    x = np.sin(2 * np.pi * 50 * t) + 0.4 * np.sin(2 * np.pi * 150 * t)
    return ulaw_encode((x * 32768 * 10 ** (dbfs / 20) / np.sqrt(np.mean(x**2))).astype(np.int16))


def vowel(ms: int, dbfs: float = -20.0) -> bytes:
    """A sustained, speech-like /a/ that webrtcvad calls voiced in every frame."""
    t = np.arange(ms * 8) / RATE
    x = np.zeros(len(t))
    for k in range(1, 27):
        f = 140.0 * k
        gain = sum(np.exp(-(((f - formant) / width) ** 2)) for formant, width in ((700, 130), (1220, 150), (2600, 250)))
        x += gain * np.sin(2 * np.pi * f * t)
    return ulaw_encode((x * 32768 * 10 ** (dbfs / 20) / np.sqrt(np.mean(x**2))).astype(np.int16))


LINE = noise(200, -50.0, seed=99) + silence(300)  # how the call opens: 0.5 s
SPEECH_AT = T0 + 0.5  # where the first part after LINE begins


def run(audio: bytes, chunk: int = 160, vad_settings: VadSettings | None = None) -> list:
    """Feed `audio` in `chunk`-byte pieces, each stamped with its own start time; all events."""
    vad = VoiceActivity(vad_settings or SHIPPED_VAD)
    events = []
    for offset in range(0, len(audio), chunk):
        events += vad.feed(audio[offset : offset + chunk], T0 + offset / RATE)
    return events


def times(events: list) -> list[tuple[str, float]]:
    return [(type(e).__name__, round(e.at, 6)) for e in events]


# --- the run-length rules, with exact edges ---------------------------------------------------


def test_a_vowel_gives_one_start_at_its_first_frame_and_one_end_at_its_last():
    assert run(LINE + vowel(1000) + silence(400)) == [
        VoiceStarted(at=pytest.approx(SPEECH_AT)),
        VoiceEnded(at=pytest.approx(SPEECH_AT + 1.0)),
    ]


def test_voice_shorter_than_speech_start_is_not_speech():
    assert run(LINE + vowel(40) + silence(400)) == []
    events = run(LINE + vowel(60) + silence(400))
    assert times(events) == [("VoiceStarted", SPEECH_AT), ("VoiceEnded", SPEECH_AT + 0.06)]


def test_the_voiced_run_must_be_consecutive():
    assert run(LINE + vowel(40) + silence(20) + vowel(40) + silence(400)) == []


def test_a_gap_shorter_than_the_hangover_is_bridged():
    events = run(LINE + vowel(500) + silence(200) + vowel(300) + silence(400))
    assert times(events) == [("VoiceStarted", SPEECH_AT), ("VoiceEnded", SPEECH_AT + 1.0)]


def test_a_gap_as_long_as_the_hangover_splits():
    events = run(LINE + vowel(500) + silence(220) + vowel(300) + silence(400))
    assert times(events) == [
        ("VoiceStarted", SPEECH_AT), ("VoiceEnded", SPEECH_AT + 0.5),
        ("VoiceStarted", SPEECH_AT + 0.72), ("VoiceEnded", SPEECH_AT + 1.02),
    ]


def test_the_end_is_reported_only_once_the_hangover_has_passed():
    vad = VoiceActivity(SHIPPED_VAD)
    audio = LINE + vowel(500)
    assert [type(e) for e in vad.feed(audio, T0)] == [VoiceStarted]
    assert vad.speaking
    assert vad.feed(silence(200), T0 + len(audio) / RATE) == []  # 10 frames: still speaking
    assert vad.speaking
    assert vad.feed(silence(20), T0 + len(audio) / RATE + 0.2) == [VoiceEnded(at=pytest.approx(SPEECH_AT + 0.5))]
    assert not vad.speaking


def test_settings_change_the_rules():
    strict = dataclasses.replace(SHIPPED_VAD, speech_start_ms=200, hangover_ms=500)
    assert run(LINE + vowel(180) + silence(600), vad_settings=strict) == []
    events = run(LINE + vowel(300) + silence(400) + vowel(300) + silence(600), vad_settings=strict)
    assert times(events) == [("VoiceStarted", SPEECH_AT), ("VoiceEnded", SPEECH_AT + 1.0)]


@pytest.mark.parametrize("frame_ms", [10, 30])
def test_other_frame_lengths_follow_the_same_rules(frame_ms):
    lead = LINE + silence(10)  # 510 ms: the vowel starts on a frame boundary for 10 and 30 ms frames
    events = run(lead + vowel(990) + silence(600), vad_settings=dataclasses.replace(SHIPPED_VAD, frame_ms=frame_ms))
    assert times(events) == [("VoiceStarted", SPEECH_AT + 0.01), ("VoiceEnded", SPEECH_AT + 1.0)]


# --- chunking and time ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 80, 159, 161, 240, 333, 4000])
def test_odd_chunk_sizes_give_the_same_events_as_160(chunk):
    audio = LINE + vowel(500) + silence(100) + vowel(300) + silence(300) + vowel(200) + silence(400)
    assert times(run(audio, chunk=chunk)) == times(run(audio))


def test_events_follow_the_times_given_with_each_chunk():
    # Chunks arriving late (network jitter): each frame takes its time from its own chunk.
    vad = VoiceActivity(SHIPPED_VAD)
    audio = LINE + vowel(200)
    frames = [audio[i : i + 160] for i in range(0, len(audio), 160)]
    events = [e for k, frame in enumerate(frames) for e in vad.feed(frame, T0 + k * FRAME + (0.5 if k >= 25 else 0))]
    assert events == [VoiceStarted(at=pytest.approx(SPEECH_AT + 0.5))]


# --- what is not speech ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [silence(5000), noise(5000, -62.0), noise(5000, -45.0), noise(5000, -38.0), hum(5000, -45.0)],
    ids=["digital-silence", "noise-below-gate", "white-noise-45dBFS", "white-noise-38dBFS", "mains-hum-45dBFS"],
)
def test_silence_and_line_noise_give_nothing(line):
    assert run(line) == []


def test_a_call_opening_on_noise_raises_no_start_during_the_warm_up():
    assert run(noise(1000, -50.0, seed=3) + vowel(500) + silence(400)) == [
        VoiceStarted(at=pytest.approx(T0 + 1.0)), VoiceEnded(at=pytest.approx(T0 + 1.5)),
    ]


def test_speech_as_the_very_first_sound_is_reported_at_most_the_warm_up_late():
    (started, ended) = run(vowel(500) + silence(400))
    assert T0 < started.at <= T0 + 0.1
    assert ended.at == pytest.approx(T0 + 0.5)


@pytest.mark.parametrize("dbfs", [-50.0, -45.0])
def test_in_line_noise_the_end_is_late_by_webrtcvads_own_hysteresis(dbfs):
    audio = noise(500, dbfs, seed=4) + vowel(500) + noise(1000, dbfs, seed=5)
    (started, ended) = run(audio)
    assert started.at == pytest.approx(T0 + 0.5)
    assert T0 + 1.0 <= ended.at <= T0 + 1.0 + 0.12  # 1 + 5 frames: see the vad module docstring


def test_a_quiet_voice_below_the_energy_floor_is_not_speech():
    assert run(LINE + vowel(1000, dbfs=-58.0) + silence(400)) == []


# --- real speech (espeak-ng) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def say(tmp_path_factory):
    """`say(text)` -> that text spoken by espeak-ng, as 8 kHz mu-law, trimmed to its audible edges."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    folder = tmp_path_factory.mktemp("espeak")

    def render(text: str) -> bytes:
        path = folder / f"{abs(hash(text))}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True, capture_output=True)
        with wave.open(str(path)) as wav:
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
            pcm = resample(pcm, wav.getframerate(), RATE)
        audible = np.flatnonzero(np.abs(pcm.astype(np.int32)) >= 64)  # trim espeak's own leading/trailing quiet
        return ulaw_encode(pcm[audible[0] : audible[-1] + 1])

    return render


def seconds(audio: bytes) -> float:
    return len(audio) / RATE


def test_a_spoken_phrase_gives_one_start_and_one_end_at_its_edges(say):
    phrase = say("Good morning and welcome")  # its word gaps are shorter than the hangover
    (started, ended) = run(LINE + phrase + silence(600))
    assert started.at == pytest.approx(SPEECH_AT, abs=2 * FRAME)
    assert ended.at == pytest.approx(SPEECH_AT + seconds(phrase), abs=2 * FRAME)


def test_a_short_pause_between_spoken_phrases_is_bridged(say):
    first, second = say("Good morning"), say("I would like an appointment")
    events = run(LINE + first + silence(120) + second + silence(600))
    assert [type(e) for e in events] == [VoiceStarted, VoiceEnded]
    assert events[1].at == pytest.approx(SPEECH_AT + seconds(first) + 0.12 + seconds(second), abs=2 * FRAME)


def test_a_long_pause_between_spoken_phrases_splits_them(say):
    first, second = say("Good morning"), say("I would like an appointment")
    events = run(LINE + first + silence(600) + second + silence(600))
    second_at = SPEECH_AT + seconds(first) + 0.6
    assert [type(e) for e in events] == [VoiceStarted, VoiceEnded, VoiceStarted, VoiceEnded]
    assert [e.at for e in events] == [
        pytest.approx(SPEECH_AT, abs=2 * FRAME), pytest.approx(SPEECH_AT + seconds(first), abs=2 * FRAME),
        pytest.approx(second_at, abs=2 * FRAME), pytest.approx(second_at + seconds(second), abs=2 * FRAME),
    ]


def test_spoken_phrase_in_80_and_240_byte_chunks_gives_the_same_events(say):
    audio = LINE + say("Good morning") + silence(600) + say("I would like an appointment") + silence(600)
    expected = times(run(audio))
    assert len(expected) == 4
    assert times(run(audio, chunk=80)) == expected
    assert times(run(audio, chunk=240)) == expected


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=40))
def test_any_chunking_gives_the_same_events(cuts):
    audio = LINE + vowel(300) + silence(100) + vowel(200) + silence(300) + vowel(100) + silence(300)
    vad = VoiceActivity(SHIPPED_VAD)
    events, offset = [], 0
    for size in cuts * (len(audio) // sum(cuts) + 1):
        if offset >= len(audio):
            break
        events += vad.feed(audio[offset : offset + size], T0 + offset / RATE)
        offset += size
    assert times(events) == times(run(audio))


# --- settings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("aggressiveness", 4), ("aggressiveness", -1), ("frame_ms", 25), ("speech_start_ms", 0), ("hangover_ms", -20),
     ("energy_floor_dbfs", 3.0)],
)
def test_bad_settings_raise_config_error_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"vad.{field}"):
        dataclasses.replace(SHIPPED_VAD, **{field: value})
