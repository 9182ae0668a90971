"""`agentd localcloud`: serve the cloud double until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from agentd.errors import ConfigError
from agentd.testbed.localcloud.server import LocalCloud
from agentd.testbed.localcloud.settings import STT_ENGINES, LocalCloudSettings, read_script


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentd localcloud",
        description="Google Speech/TTS (gRPC) and OpenAI chat (HTTP) doubles with real local engines.",
    )
    parser.add_argument("--config", help="agentd TOML config; its businesses drive the rules LLM")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=50051)
    parser.add_argument("--http-port", type=int, default=8081)
    parser.add_argument("--stt-engine", choices=STT_ENGINES, default="script")
    parser.add_argument("--script", help="UTF-8 file, one transcript line per voiced segment; "
                        "a line starting with '+ ' continues the result of the segment before it")
    parser.add_argument("--stt-final-delay-ms", type=int, default=150)
    parser.add_argument("--stt-stream-limit-s", type=float, default=305.0)
    parser.add_argument("--llm-ttft-ms", type=int, default=0)
    parser.add_argument("--llm-tokens-per-s", type=float, default=0.0)
    parser.add_argument("--tts-ttfb-ms", type=int, default=0)
    parser.add_argument("--tts-cache", action="store_true",
                        help="synthesize each text once (load generation: espeak-ng's CPU is not what is measured)")
    return parser


def settings_from_args(args: argparse.Namespace, businesses: Any) -> LocalCloudSettings:
    """LocalCloudSettings for parsed command-line arguments."""
    return LocalCloudSettings(
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        stt_engine=args.stt_engine,
        script_lines=read_script(args.script) if args.script else (),
        stt_final_delay_ms=args.stt_final_delay_ms,
        stt_stream_limit_s=args.stt_stream_limit_s,
        llm_ttft_ms=args.llm_ttft_ms,
        llm_tokens_per_s=args.llm_tokens_per_s,
        tts_ttfb_ms=args.tts_ttfb_ms,
        tts_cache=args.tts_cache,
        businesses=businesses,
    )


def _businesses(config_path: str | None) -> Any:
    from agentd.config import load_config  # deferred: only the CLI needs agentd's config

    return load_config(config_path).businesses


def main(argv: list[str] | None = None) -> int:
    """Run localcloud in the foreground; prints one line with the endpoints."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args, _businesses(args.config))
    except (OSError, ValueError, ConfigError) as exc:  # unreadable script/config, bad values
        print(f"agentd localcloud: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    cloud = LocalCloud(settings)
    try:
        cloud.start()
    except RuntimeError as exc:  # e.g. a port already in use
        print(f"agentd localcloud: {exc}", file=sys.stderr)
        return 1
    try:
        endpoints = f"grpc={cloud.grpc_target} http={cloud.http_base_url} stt={settings.stt_engine}"
        print(f"localcloud {endpoints}", flush=True)
        stop.wait()
    finally:
        cloud.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
