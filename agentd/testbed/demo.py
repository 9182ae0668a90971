"""``agentd demo``: a whole phone call on this one machine, no cloud account.

Three processes' worth of real parts in one: ``localcloud`` (pocketsphinx
STT, espeak-ng TTS, the keyword ``rules`` LLM, on 127.0.0.1, in a thread),
``agentd serve`` (the production daemon, its real gRPC/HTTP clients), and the
softphone (Twilio's side of Media Streams, real-time pacing and playback).
The caller's three turns are spoken by espeak-ng. For every turn it prints
what the caller said (as transcribed), what the agent answered and the stage
timeline, then saves the conversation as a stereo WAV (caller left, agent right).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import tempfile
from pathlib import Path

import trio

from agentd import telemetry
from agentd.testbed.softphone.caller_audio import synthesize_caller_turns
from agentd.logs import setup_logging
from agentd.config import Config, load_config
from agentd.testbed.localcloud import LocalCloud
from agentd.testbed.localcloud.settings import settings_from_config
from agentd.server import serve
from agentd.testbed.softphone import CallReport, place_call
from agentd.testbed.softphone.script import CallerTurn

DEMO_TURNS = (
    "What time do you open tomorrow?",
    "How much does it cost to fix a leaking pipe?",
    "Thank you, goodbye.",
)


def demo_config(base: Config, lc: LocalCloud, telemetry_dir: str) -> Config:
    """``base`` pointed at localcloud over plaintext loopback."""
    return base.with_overrides(**{
        "server.host": "127.0.0.1", "server.port": 0, "server.telemetry_dir": telemetry_dir,
        "server.stats_interval_s": 0,
        "stt.endpoint": lc.grpc_target, "stt.tls": False,
        "tts.endpoint": lc.grpc_target, "tts.tls": False,
        "llm.base_url": lc.http_base_url, "llm.api_key_env": "",
        "ops.listen": "127.0.0.1:0",
    })


async def run_call(config: Config, turns: list[CallerTurn], business: str) -> tuple[CallReport, list[dict]]:
    """Start agentd, place one call to it, stop it; returns the softphone's and agentd's views."""
    records: list[dict] = []
    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(serve, config, observers=[records.append]))
        url = f"ws://127.0.0.1:{server.port}{config.server.path}"
        report = await place_call(url, turns, business=business)
        await trio.sleep(0.2)  # let agentd record the call's end
        nursery.cancel_scope.cancel()
    return report, records


def print_turns(report: CallReport, records: list[dict]) -> None:
    print(f"\nGreeting: first audio played {report.greeting_latency_ms} ms after `start`\n")
    by_turn = {r["turn"]: r for r in records if r["kind"] == "turn"}
    for index, turn in enumerate(report.turns, start=1):
        record = by_turn.get(index, {})
        print(f"Turn {index}")
        print(f"  caller said : {turn.label}")
        print(f"  agent heard : {record.get('caller_text', '(nothing)')!r}")
        print(f"  agent said  : {record.get('reply_text', '(no reply)')!r}")
        if record:
            print(telemetry.format_timeline(record))
            print(f"  turn ended  : after {record.get('required_silence_ms', '?')} ms of required silence; "
                  f"speculative reply: {record.get('speculation', 'none')}; breath {record.get('breath_ms', '?')} ms")
        print(f"  softphone   : voice-to-voice {turn.v2v_ms} ms (caller's last voiced frame -> first agent audio played)\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentd demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="agentd.toml (default: etc/agentd.toml)")
    parser.add_argument("--business", default="acme", help="business section to call (English)")
    parser.add_argument("--stt-engine", default="pocketsphinx", choices=["pocketsphinx", "script"])
    parser.add_argument("--out", default="var/demo/call.wav", help="stereo WAV of the call")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    base = load_config(args.config)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="agentd-demo-") as scratch:
        wavs = synthesize_caller_turns(list(DEMO_TURNS), "en-us", out_dir=scratch)
        turns = [CallerTurn.from_wav(path) for path in wavs]
        turns = [CallerTurn(audio=t.audio, label=text) for t, text in zip(turns, DEMO_TURNS)]
        settings = settings_from_config(base, stt_engine=args.stt_engine, script_lines=DEMO_TURNS)
        with LocalCloud(settings) as lc:
            config = demo_config(base, lc, str(out.parent / "telemetry"))
            print(f"agentd demo: localcloud on {lc.grpc_target} (gRPC) and {lc.http_base_url} (HTTP); "
                  f"calling business {args.business!r} with {len(turns)} turns...", flush=True)
            report, records = trio.run(run_call, config, turns, args.business)
    out.write_bytes(report.recording.stereo_wav())
    print_turns(report, records)
    print(f"Saved the call as {out} (stereo: caller left, agent right); telemetry in {out.parent / 'telemetry'}")
    answered = sum(1 for r in records if r["kind"] == "turn" and r.get("reply_text"))
    if answered < len(turns):
        logging.getLogger("agentd.testbed.demo").error("only %d of %d turns were answered", answered, len(turns))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
