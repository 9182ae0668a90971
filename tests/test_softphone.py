"""The softphone behaves like Twilio's side of a Media Streams call, and measures the agent.

Whole-call tests run a tiny scripted agent on 127.0.0.1 under `autojump_clock`,
so 20 ms pacing, settle times and timeouts cost no real time and every latency
is exact: the fake agent acts at chosen instants off the 20 ms grid (e.g. 310 ms),
so the slot that plays its audio is unambiguous.
"""

import base64
import hashlib
import hmac
import io
import json
import math
import shutil
import socket
import threading
import wave
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, serve_websocket

from agentd.testbed import softphone
from agentd.testbed.softphone.caller_audio import CallerAudioError, last_voiced_offset_ms, load_caller_wav, synthesize_caller_turns
from agentd.codecs import twilio
from agentd.codecs.mulaw import FRAME_BYTES, SILENCE_BYTE, silence, ulaw_decode, ulaw_encode
from agentd.codecs.pcm import rms_dbfs
from agentd.codecs.riff import MULAW, build_wav
from agentd.testbed.softphone import CallerTurn, place_call, twilio_signature
from agentd.testbed.softphone.playback import PlaybackBuffer, Recording
from agentd.testbed.softphone.script import CallScript, Phase, SlotFacts

# -- audio fixtures ---------------------------------------------------------------------------


def tone(frames: int, amplitude: int = 8000) -> bytes:
    """`frames` 20 ms frames of a 440 Hz tone, well above the -40 dBFS voicing threshold."""
    t = np.arange(frames * FRAME_BYTES)
    return ulaw_encode((amplitude * np.sin(2 * np.pi * 440 * t / 8000)).astype(np.int16))


def speech(voiced_frames: int, trailing_silent_frames: int) -> bytes:
    return tone(voiced_frames) + silence(trailing_silent_frames)


def is_silent(payload: bytes) -> bool:
    return payload == bytes([SILENCE_BYTE]) * len(payload)


def loud(frames: np.ndarray) -> np.ndarray:
    """Per-20 ms-slot flags: is this slot of a PCM channel above -40 dBFS?"""
    return np.array([rms_dbfs(frames[i : i + FRAME_BYTES]) > -40 for i in range(0, len(frames), FRAME_BYTES)])


# -- the fake agent ---------------------------------------------------------------------------


@dataclass
class Heard:
    at_ms: float  # trio time since the agent received `start` (== the softphone's media time)
    msg: dict


class FakeAgent:
    """The agent end of the socket. `behaviour(agent)` scripts it; everything heard is logged."""

    def __init__(self, behaviour=None) -> None:
        self.behaviour = behaviour
        self.heard: list[Heard] = []
        self.headers: dict[str, str] = {}
        self.stream_sid = ""
        self.finished = trio.Event()
        self._ws = None
        self._t_start: float | None = None
        # Unbounded on purpose: a test agent must never push back on the softphone.
        self._inbox_send, self._inbox = trio.open_memory_channel(math.inf)

    async def handle(self, request) -> None:
        self.headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        self._ws = await request.accept()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._log_everything)
                if self.behaviour is not None:
                    await self.behaviour(self)
        except* ConnectionClosed:
            pass
        finally:
            self.finished.set()

    async def _log_everything(self) -> None:
        """Log each message at its arrival time (the behaviour may be busy sleeping)."""
        async with self._inbox_send:
            while True:
                msg = json.loads(await self._ws.get_message())
                if msg["event"] == "start":
                    self._t_start = trio.current_time()
                    self.stream_sid = msg["streamSid"]
                self.heard.append(Heard(at_ms=self.now_ms(), msg=msg))
                self._inbox_send.send_nowait(msg)

    async def receive(self) -> dict:
        """The next message, in order, whenever the behaviour gets round to it."""
        return await self._inbox.receive()

    async def receive_until(self, predicate) -> dict:
        while not predicate(msg := await self.receive()):
            pass
        return msg

    def now_ms(self) -> float:
        return 0.0 if self._t_start is None else round((trio.current_time() - self._t_start) * 1000, 6)

    async def sleep_until_ms(self, ms: float) -> None:
        await trio.sleep_until(self._t_start + ms / 1000)

    async def send_media(self, payload: bytes) -> None:
        await self._ws.send_message(twilio.render_media(self.stream_sid, payload))

    async def send_mark(self, name: str) -> None:
        await self._ws.send_message(twilio.render_mark(self.stream_sid, name))

    async def send_clear(self) -> None:
        await self._ws.send_message(twilio.render_clear(self.stream_sid))

    async def send_raw(self, message: str | bytes) -> None:
        await self._ws.send_message(message)

    async def hang_up(self) -> None:
        await self._ws.aclose()

    def events(self, kind: str) -> list[Heard]:
        return [h for h in self.heard if h.msg["event"] == kind]


def event_is(kind: str):
    return lambda msg: msg["event"] == kind


def end_of_speech():
    """A predicate that fires on the first silent media frame after a voiced one."""
    voiced = False

    def check(msg: dict) -> bool:
        nonlocal voiced
        if msg["event"] != "media":
            return False
        if not is_silent(base64.b64decode(msg["media"]["payload"])):
            voiced = True
            return False
        return voiced

    return check


@asynccontextmanager
async def serving(agent: FakeAgent):
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, agent.handle, "127.0.0.1", 0, None))
        yield f"ws://127.0.0.1:{server.port}/media"
        nursery.cancel_scope.cancel()


async def call(agent: FakeAgent, turns, **kwargs):
    """Place one call against `agent`; return the report once the agent has heard everything."""
    with trio.fail_after(600):  # Trio time: a hang fails fast under autojump_clock
        async with serving(agent) as url:
            report = await place_call(url, turns, **kwargs)
            await agent.finished.wait()
    return report


async def greet_then_reply(agent: FakeAgent) -> None:
    """Greet at 310 ms (25 frames + mark); reply 105 ms after the caller stops (10 frames + mark)."""
    await agent.receive_until(event_is("start"))
    await agent.sleep_until_ms(310)
    await agent.send_media(tone(25))  # one 4000-byte message: chunk size is free
    await agent.send_mark("greeting")
    await agent.receive_until(end_of_speech())
    await trio.sleep(0.105)
    await agent.send_media(tone(10))
    await agent.send_mark("reply")


# -- whole calls --------------------------------------------------------------------------------


async def test_stream_opens_and_flows_exactly_like_twilio(autojump_clock):
    agent = FakeAgent(greet_then_reply)
    turn = CallerTurn(audio=speech(10, 15), label="hello")
    with trio.fail_after(600):
        async with serving(agent) as url:
            report = await place_call(url, [turn], business="acme", extra_parameters={"lang": "he"},
                                      extra_headers={"x-twilio-signature": twilio_signature("tok", url)})
            await agent.finished.wait()

    messages = [h.msg for h in agent.heard]
    assert messages[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert "sequenceNumber" not in messages[0]
    start = messages[1]
    assert start["event"] == "start" and start["sequenceNumber"] == "1"
    assert start["start"]["customParameters"] == {"business": "acme", "lang": "he"}
    assert start["start"]["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    assert start["streamSid"].startswith("MZ") and start["start"]["callSid"].startswith("CA")
    assert start["start"]["accountSid"].startswith("AC") and start["start"]["streamSid"] == start["streamSid"]
    assert messages[-1]["event"] == "stop" and messages[-1]["stop"]["callSid"] == start["start"]["callSid"]
    # Every message after `connected` carries the stream sid and the next sequence number, as a string.
    assert [m["sequenceNumber"] for m in messages[1:]] == [str(n) for n in range(1, len(messages))]
    assert {m["streamSid"] for m in messages[1:]} == {start["streamSid"]}
    # Media: one 160-byte frame per 20 ms slot from t=0, chunk/timestamp counting media time.
    media = agent.events("media")
    assert [h.msg["media"]["chunk"] for h in media] == [str(k + 1) for k in range(len(media))]
    assert [h.msg["media"]["timestamp"] for h in media] == [str(20 * k) for k in range(len(media))]
    assert [h.at_ms for h in media] == [20.0 * k for k in range(len(media))]
    assert {h.msg["media"]["track"] for h in media} == {"inbound"}
    assert {len(base64.b64decode(h.msg["media"]["payload"])) for h in media} == {FRAME_BYTES}
    assert agent.headers["x-twilio-signature"] == base64.b64encode(
        hmac.new(b"tok", report.url.encode(), hashlib.sha1).digest()).decode()
    assert report.ended_by == "softphone" and report.violation_count == 0
    assert json.loads(json.dumps(report.to_dict()))["turns"][0]["label"] == "hello"


async def test_latencies_are_exact_on_the_trio_clock(autojump_clock):
    agent = FakeAgent(greet_then_reply)
    report = await call(agent, [CallerTurn(audio=speech(10, 15))])

    # Greeting arrives at 310 ms and plays from the next slot: 320 ms, for 25 frames (to 820 ms).
    assert report.greeting_latency_ms == 320
    assert report.greeting.audio_ms == 500 and report.greeting.settled
    # 700 ms of quiet after 820 ms: the caller starts at 1520 ms and stops speaking 200 ms later.
    (turn,) = report.turns
    assert (turn.started_ms, turn.speech_end_ms) == (1520, 1720)
    # The agent hears the first silent frame at 1720, answers at 1825, heard from the 1840 slot.
    assert turn.answered and turn.v2v_ms == 120
    assert (turn.reply_audio_ms, turn.reply_frames, turn.settled) == (200, 10, True)
    # The reply ends at 2040 ms; 700 ms of quiet later the caller hangs up.
    assert report.total_call_ms == 2740
    assert agent.events("stop")[0].at_ms == 2740


async def test_marks_are_echoed_when_playback_reaches_them(autojump_clock):
    agent = FakeAgent(greet_then_reply)
    report = await call(agent, [CallerTurn(audio=speech(10, 15))])

    echoes = [(h.msg["mark"]["name"], h.at_ms) for h in agent.events("mark")]
    assert echoes == [("greeting", 820.0), ("reply", 2040.0)]  # the end of each audio, not its arrival
    assert report.marks_echoed == ("greeting", "reply")
    assert report.greeting.marks_echoed == ("greeting",) and report.turns[0].marks_echoed == ("reply",)


async def test_clear_empties_the_buffer_and_echoes_pending_marks_at_once(autojump_clock):
    async def behaviour(agent):
        await agent.receive_until(event_is("start"))
        await agent.sleep_until_ms(310)
        await agent.send_media(tone(50))
        await agent.send_mark("a")
        await agent.send_media(tone(50))
        await agent.send_mark("b")
        await agent.sleep_until_ms(510)
        await agent.send_clear()

    agent = FakeAgent(behaviour)
    report = await call(agent, [CallerTurn(dtmf="1", expect_reply=False)])

    assert [(h.msg["mark"]["name"], h.at_ms) for h in agent.events("mark")] == [("a", 510.0), ("b", 510.0)]
    assert report.clears_received == 1 and report.greeting.clears == 1
    assert report.frames_played == 10 and report.greeting.audio_ms == 200  # slots 320..500 ms, then silence
    agent_slots = loud(ulaw_decode(report.recording.agent_mulaw))
    assert agent_slots.nonzero()[0].tolist() == list(range(16, 26))


async def test_header_binary_and_garbage_from_the_agent_are_flagged_not_fatal(autojump_clock):
    riff = b"RIFF" + (36 + 800).to_bytes(4, "little") + b"WAVEfmt " + bytes(24) + b"data" + bytes(4)

    async def behaviour(agent):
        await agent.receive_until(event_is("start"))
        await agent.sleep_until_ms(10)
        await agent.send_media(riff + tone(5))
        await agent.send_raw(b"\x00\x01binary")
        await agent.send_raw("not json")
        await agent.send_raw(twilio.render_media("MZ-someone-else", tone(1)))

    agent = FakeAgent(behaviour)
    report = await call(agent, [CallerTurn(dtmf="1", expect_reply=False)])

    assert [v.code for v in report.violations] == ["31924", "31950", "codec", "codec"]
    assert "streamSid" in report.violations[3].detail
    assert report.violation_count == 4 and report.ended_by == "softphone"
    assert report.media_messages_received == 1  # the RIFF one was still queued and played, as Twilio would


async def test_a_turn_without_reply_times_out_and_the_call_goes_on(autojump_clock):
    async def behaviour(agent):
        await agent.receive_until(event_is("start"))
        await agent.sleep_until_ms(10)
        await agent.send_media(tone(5))  # greeting at slots 20..100 ms; then nothing, ever

    agent = FakeAgent(behaviour)
    report = await call(agent, [CallerTurn(audio=speech(5, 5)), CallerTurn(dtmf="9", expect_reply=False)],
                        reply_timeout_s=2)

    first, second = report.turns
    # Greeting ends at 120 ms, settles at 820; the turn's audio runs to 1020; 2 s later, give up.
    assert (first.started_ms, first.answered, first.v2v_ms, first.settled) == (820, False, None, False)
    assert second.started_ms == 3020
    assert [h.msg["dtmf"] for h in agent.events("dtmf")] == [{"track": "inbound_track", "digit": "9"}]


async def test_no_greeting_waits_reply_timeout_then_speaks(autojump_clock):
    agent = FakeAgent()
    report = await call(agent, [CallerTurn(dtmf="5", expect_reply=False)], reply_timeout_s=1)

    assert report.greeting_latency_ms is None and not report.greeting.settled
    assert report.turns[0].started_ms == 1000
    assert agent.events("dtmf")[0].at_ms == 1000.0


async def test_dtmf_turn_is_timed_from_the_last_key(autojump_clock):
    async def behaviour(agent):
        await agent.receive_until(event_is("start"))
        await agent.sleep_until_ms(10)
        await agent.send_media(tone(1))
        await agent.receive_until(lambda m: m["event"] == "dtmf" and m["dtmf"]["digit"] == "2")
        await trio.sleep(0.05)
        await agent.send_media(tone(3))

    agent = FakeAgent(behaviour)
    report = await call(agent, [CallerTurn(dtmf="12")])

    (turn,) = report.turns
    digits = agent.events("dtmf")
    assert [(h.msg["dtmf"]["digit"], h.at_ms) for h in digits] == [("1", 740.0), ("2", 760.0)]
    # One digit per slot with a silent media frame; the reply is heard at 760 + 50 -> the 820 ms slot.
    assert (turn.speech_end_ms, turn.v2v_ms, turn.reply_audio_ms) == (780, 40, 60)
    seqs = [int(h.msg["sequenceNumber"]) for h in agent.heard[1:]]
    assert seqs == sorted(seqs)


async def test_agent_hanging_up_ends_the_call_with_a_report(autojump_clock):
    async def behaviour(agent):
        await agent.receive_until(event_is("start"))
        await agent.sleep_until_ms(10)
        await agent.send_media(tone(5))
        await agent.sleep_until_ms(500)
        await agent.hang_up()

    agent = FakeAgent(behaviour)
    report = await call(agent, [CallerTurn(audio=speech(5, 5))])

    assert report.ended_by == "agent"
    assert report.greeting_latency_ms == 20 and report.turns == ()
    assert report.total_call_ms == 500
    assert agent.events("stop") == []


async def test_recording_is_stereo_caller_left_agent_right(autojump_clock):
    agent = FakeAgent(greet_then_reply)
    report = await call(agent, [CallerTurn(audio=speech(10, 15))])

    with wave.open(io.BytesIO(report.recording.stereo_wav())) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, 8000)
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)
    assert len(pcm) == 137 * FRAME_BYTES  # slots 0..136; the stop goes out at slot 137 (2740 ms)
    caller, agent_side = loud(pcm[:, 0]), loud(pcm[:, 1])
    assert caller.nonzero()[0].tolist() == list(range(76, 86))  # the 10 voiced frames from 1520 ms
    assert agent_side.nonzero()[0].tolist() == list(range(16, 41)) + list(range(92, 102))


# -- the playback buffer, by hand --------------------------------------------------------------


def test_mark_after_audio_is_echoed_once_that_audio_has_played():
    buffer = PlaybackBuffer()
    buffer.append_audio(tone(2), at_ms=5)
    assert buffer.add_mark("m") == ()
    assert [buffer.play_slot(t).marks for t in (20, 40, 60)] == [(), (), ("m",)]


def test_mark_on_an_idle_buffer_is_echoed_immediately():
    assert PlaybackBuffer().add_mark("now") == ("now",)


def test_mark_while_the_last_frame_plays_waits_for_it_to_end():
    buffer = PlaybackBuffer()
    buffer.append_audio(tone(1), at_ms=0)
    assert buffer.play_slot(0).audio_bytes == FRAME_BYTES
    assert buffer.add_mark("tail") == ()
    assert buffer.play_slot(20).marks == ("tail",)


def test_mark_inside_a_frame_is_echoed_when_that_frame_ends():
    buffer = PlaybackBuffer()
    buffer.append_audio(tone(1)[:100], at_ms=0)
    buffer.add_mark("mid")
    buffer.append_audio(tone(1), at_ms=0)
    first = buffer.play_slot(0)
    assert (first.audio_bytes, first.marks) == (FRAME_BYTES, ())
    second = buffer.play_slot(20)
    assert (second.audio_bytes, second.marks) == (100, ("mid",))
    assert second.frame[100:] == bytes([SILENCE_BYTE]) * 60  # a short tail is padded with line silence


def test_clear_returns_every_pending_mark_and_stops_playback():
    buffer = PlaybackBuffer()
    buffer.append_audio(tone(1)[:80], at_ms=0)
    buffer.add_mark("crossed")
    buffer.append_audio(tone(3), at_ms=0)
    buffer.add_mark("queued")
    buffer.play_slot(0)
    assert buffer.clear() == ("crossed", "queued")
    assert buffer.queued_bytes == 0 and buffer.play_slot(20).frame is None
    assert buffer.add_mark("after") == ("after",)


def test_quiet_counts_from_the_end_of_the_last_frame_or_the_last_media():
    buffer = PlaybackBuffer()
    assert buffer.quiet_ms(0) == float("inf")
    buffer.append_audio(tone(1), at_ms=3)
    assert buffer.quiet_ms(10) == 0
    buffer.play_slot(20)
    assert buffer.quiet_ms(30) == 0  # still playing
    buffer.play_slot(40)
    assert buffer.quiet_ms(100) == 60


@given(st.lists(st.one_of(st.integers(min_value=1, max_value=500), st.text(min_size=1, max_size=3)), max_size=30))
def test_playback_conserves_audio_and_echoes_every_mark_once_in_order(items):
    buffer, echoed, played = PlaybackBuffer(), [], 0
    for item in items:
        if isinstance(item, int):
            buffer.append_audio(bytes([0x10]) * item, at_ms=0)
        else:
            echoed += buffer.add_mark(item)
    for slot in range(200):
        playback = buffer.play_slot(slot * 20)
        played += playback.audio_bytes
        echoed += playback.marks
    assert played == sum(i for i in items if isinstance(i, int))
    assert echoed == [i for i in items if isinstance(i, str)]


# -- the caller script, by hand --------------------------------------------------------------


def test_script_waits_for_the_greeting_to_settle_before_speaking():
    script = CallScript([CallerTurn(audio=tone(1))], settle_ms=100)
    plans = [script.on_slot(SlotFacts(at_ms=0, played_bytes=160, agent_quiet_ms=0)),
             script.on_slot(SlotFacts(at_ms=20, played_bytes=0, agent_quiet_ms=80))]
    assert [p.caller_frame for p in plans] == [silence(1), silence(1)]
    assert script.phase is Phase.GREETING
    spoken = script.on_slot(SlotFacts(at_ms=40, played_bytes=0, agent_quiet_ms=100))
    assert spoken.caller_frame == tone(1) and script.phase is Phase.AWAITING


def test_script_pauses_gap_ms_after_the_agent_settles():
    script = CallScript([CallerTurn(audio=tone(1))], settle_ms=20, gap_ms=40)
    script.on_slot(SlotFacts(at_ms=0, played_bytes=160, agent_quiet_ms=0))
    frames = [script.on_slot(SlotFacts(at_ms=t, played_bytes=0, agent_quiet_ms=t - 20)).caller_frame
              for t in (20, 40, 60, 80)]
    assert frames == [silence(1), silence(1), silence(1), tone(1)]  # settled at 40, gap 40..80
    assert script.turn_reports()[0].started_ms == 80


def test_a_reply_that_never_ends_is_cut_at_max_reply_ms():
    script = CallScript([CallerTurn(audio=tone(1))], settle_ms=100, max_reply_ms=200)
    script.on_slot(SlotFacts(at_ms=0, played_bytes=0, agent_quiet_ms=float("inf")))  # no greeting yet
    plans = {t: script.on_slot(SlotFacts(at_ms=t, played_bytes=160, agent_quiet_ms=0)) for t in range(20, 460, 20)}
    # The endless greeting (from 20 ms) is cut at 220; the turn's endless reply (from 240) at 440.
    assert plans[220].caller_frame == tone(1)
    assert [t for t, plan in plans.items() if plan.hang_up] == [440]
    (turn,) = script.turn_reports()
    assert not script.greeting_report().settled and turn.answered and not turn.settled


def test_caller_turn_needs_audio_or_valid_digits():
    with pytest.raises(ValueError, match="audio or dtmf"):
        CallerTurn()
    with pytest.raises(ValueError, match="CallerTurn.dtmf"):
        CallerTurn(dtmf="1x")


def test_recording_fills_missing_frames_with_line_silence():
    recording = Recording()
    recording.add_slot(caller=tone(1), agent=None)
    assert recording.slots == 1 and recording.agent_mulaw == silence(1)


# -- caller audio ----------------------------------------------------------------------------------


def write_wav(path, samples: np.ndarray, rate: int, width: int = 2) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(samples.shape[1] if samples.ndim == 2 else 1)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(samples.astype("<i2" if width == 2 else "u1").tobytes())


def test_stereo_16khz_wav_becomes_8khz_mono_mulaw(tmp_path):
    t = np.arange(16000)
    left = (10000 * np.sin(2 * np.pi * 300 * t / 16000)).astype(np.int16)
    write_wav(tmp_path / "s.wav", np.stack([left, np.zeros_like(left)], axis=1), 16000)
    mulaw = load_caller_wav(tmp_path / "s.wav")
    assert len(mulaw) == 8000
    level = rms_dbfs(ulaw_decode(mulaw))
    assert level == pytest.approx(rms_dbfs(left) - 6.02, abs=0.5)  # averaged with a silent channel


def test_mulaw_wav_at_8khz_passes_through_unchanged(tmp_path):
    path = tmp_path / "u.wav"
    path.write_bytes(build_wav(tone(3), format_tag=MULAW, channels=1, sample_rate_hz=8000, bits_per_sample=8))
    assert np.array_equal(ulaw_decode(load_caller_wav(path)), ulaw_decode(tone(3)))


def test_non_16_bit_or_non_wav_input_is_refused_naming_the_file(tmp_path):
    write_wav(tmp_path / "8bit.wav", np.full(800, 128), 8000, width=1)
    with pytest.raises(CallerAudioError, match="8bit.wav.*16"):
        load_caller_wav(tmp_path / "8bit.wav")
    (tmp_path / "junk.wav").write_bytes(b"not a wav")
    with pytest.raises(CallerAudioError, match="junk.wav"):
        load_caller_wav(tmp_path / "junk.wav")


def test_last_voiced_offset_is_where_trailing_silence_begins():
    assert last_voiced_offset_ms(speech(10, 15)) == 200
    assert last_voiced_offset_ms(silence(5)) == 0
    assert last_voiced_offset_ms(silence(2) + tone(1)[:40]) == 45  # capped at the audio's end


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_espeak_turns_start_with_200ms_of_silence(tmp_path):
    (path,) = synthesize_caller_turns(["hello, I would like a table"], out_dir=tmp_path)
    mulaw = load_caller_wav(path)
    assert path.name == "turn_01.wav"
    assert set(mulaw[: 8 * 200]) == {SILENCE_BYTE}
    assert 200 < last_voiced_offset_ms(mulaw) < len(mulaw) // 8


# -- the command line (real time, about half a second) ---------------------------------------


def serve_one_call_in_a_thread(agent_behaviour) -> tuple[str, threading.Thread]:
    ready: list[str] = []
    got_port = threading.Event()

    async def serve():
        agent = FakeAgent(agent_behaviour)
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(serve_websocket, agent.handle, "127.0.0.1", 0, None))
            ready.append(f"ws://127.0.0.1:{server.port}/media")
            got_port.set()
            with trio.fail_after(30):
                await agent.finished.wait()
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    assert got_port.wait(10)
    return ready[0], thread


def test_cli_calls_prints_a_table_and_writes_wav_and_json(tmp_path, capsys):
    async def behaviour(agent):
        await agent.receive_until(event_is("start"))
        await agent.send_media(tone(3))
        await agent.receive_until(event_is("dtmf"))
        await agent.send_media(tone(3))

    url, thread = serve_one_call_in_a_thread(behaviour)
    code = softphone.main([url, "--dtmf", "7", "--business", "acme", "--settle-ms", "100",
                           "--out", str(tmp_path / "call.wav"), "--json", str(tmp_path / "call.json")])
    thread.join(10)

    assert code == 0
    report = json.loads((tmp_path / "call.json").read_text())
    assert report["parameters"] == {"business": "acme"} and report["turns"][0]["answered"]
    with wave.open(str(tmp_path / "call.wav")) as wav:
        assert wav.getnchannels() == 2
    out = capsys.readouterr().out
    assert "dtmf 7" in out and "answered" in out


def test_cli_reports_an_unreachable_agent_with_exit_code_2(capsys):
    with socket.socket() as sock:  # bound but not listening: connecting is refused
        sock.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}/media"
        assert softphone.main([url, "--dtmf", "1"]) == 2
    assert "cannot open" in capsys.readouterr().err
