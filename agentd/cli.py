"""The ``agentd`` command: serve, localcloud, call, demo."""

from __future__ import annotations

import argparse
import logging
import sys

_COMMANDS = {
    "serve": "run the daemon: accept Twilio Media Streams (config: etc/agentd.toml)",
    "localcloud": "serve Google Speech/TTS and OpenAI chat on 127.0.0.1 with offline engines",
    "call": "place a call to an agent like Twilio would (a softphone)",
    "demo": "a whole phone call on this machine, printing each turn's latency timeline",
}


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _serve(argv: list[str]) -> int:
    import trio

    from agentd.config import config_summary, load_config
    from agentd.errors import ConfigError
    from agentd.server import serve
    from google.auth.exceptions import DefaultCredentialsError

    parser = argparse.ArgumentParser(prog="agentd serve", description=_COMMANDS["serve"])
    parser.add_argument("--config", default=None, help="path to agentd.toml (default: etc/agentd.toml)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"agentd: invalid configuration: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.server.log_level)
    logging.getLogger("agentd").info("config:\n%s", config_summary(config))
    status = 0
    try:
        trio.run(serve, config)
    except* ConfigError as group:  # e.g. a check enabled without its secret
        print(f"agentd: invalid configuration: {group.exceptions[0]}", file=sys.stderr)
        status = 2
    except* DefaultCredentialsError as group:  # TLS endpoints need Google credentials
        print(f"agentd: no Google credentials: {group.exceptions[0]}", file=sys.stderr)
        status = 2
    except* KeyboardInterrupt:  # Ctrl-C arrives from inside serve's nursery, wrapped in a group
        pass
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in _COMMANDS:
        print("usage: agentd {" + ",".join(_COMMANDS) + "} [options]\n", file=sys.stderr)
        for name, text in _COMMANDS.items():
            print(f"  {name:<11} {text}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return _serve(rest)
    if command == "localcloud":
        from agentd.localcloud import main as localcloud_main
        return localcloud_main(rest)
    if command == "call":
        from agentd.softphone import main as call_main
        return call_main(rest)
    from agentd.demo import main as demo_main
    return demo_main(rest)


if __name__ == "__main__":
    sys.exit(main())
