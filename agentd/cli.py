"""The ``agentd`` command: serve, check-config, report, localcloud, call, demo.

Exit status: 0 done, 1 a runtime failure (a port that cannot be bound), 2 a
usage or configuration error (systemd's ``RestartPreventExitStatus=2``: a bad
file is not retried in a loop).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from agentd.logs import setup_logging

__all__ = ["main", "setup_logging"]

_COMMANDS = {
    "serve": "run the daemon: accept Twilio Media Streams (config: etc/agentd.toml)",
    "check-config": "validate a config file: list every problem, or print the effective config",
    "report": "latency percentiles, failure and fallback rates from a telemetry directory",
    "localcloud": "serve Google Speech/TTS and OpenAI chat on 127.0.0.1 with offline engines",
    "call": "place a call to an agent like Twilio would (a softphone)",
    "demo": "a whole phone call on this machine, printing each turn's latency timeline",
}
EXIT_RUNTIME, EXIT_CONFIG = 1, 2


def _usage() -> str:
    lines = ["usage: agentd [--version] {" + ",".join(_COMMANDS) + "} [options]", ""]
    lines += [f"  {name:<13} {text}" for name, text in _COMMANDS.items()]
    lines += ["", "agentd COMMAND --help describes a command's options."]
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("agentd")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _config_error(exc: Exception) -> int:
    print(f"agentd: invalid configuration: {exc}", file=sys.stderr)
    return EXIT_CONFIG


def _load_config(command: str, argv: list[str]):
    """(path, Config) for a command whose one option is --config; (path, None) after printing every problem."""
    from agentd.config import load_config
    from agentd.errors import ConfigError

    parser = argparse.ArgumentParser(prog=f"agentd {command}", description=_COMMANDS[command])
    parser.add_argument("--config", default=None, help="path to agentd.toml (default: etc/agentd.toml)")
    path = parser.parse_args(argv).config
    try:
        return path, load_config(path)
    except ConfigError as exc:
        _config_error(exc)
        return path, None


def _serve(argv: list[str]) -> int:
    import trio
    from google.auth.exceptions import DefaultCredentialsError

    from agentd.config import config_summary, load_config
    from agentd.errors import ConfigError
    from agentd.notify import Notifier
    from agentd.server import ListenError, serve

    path, config = _load_config("serve", argv)
    if config is None:
        return EXIT_CONFIG
    setup_logging(config.server.log_level, config.server.log_format)
    logging.getLogger("agentd").info("agentd %s, config:\n%s", _version(), config_summary(config))
    notifier = Notifier.from_environment(os.environ)
    status = 0
    try:
        trio.run(lambda: serve(config, notifier=notifier, handle_signals=True,
                               reload_config=lambda: load_config(path)))
    except* ConfigError as group:  # e.g. a check enabled without its secret, a missing LLM key
        status = _config_error(group.exceptions[0])
    except* DefaultCredentialsError as group:  # TLS endpoints need Google credentials
        print(f"agentd: no Google credentials: {group.exceptions[0]}", file=sys.stderr)
        status = EXIT_CONFIG
    except* ListenError as group:
        print(f"agentd: {group.exceptions[0]}", file=sys.stderr)
        status = EXIT_RUNTIME
    except* KeyboardInterrupt:  # Ctrl-C during startup, before the drain's signal handling is up
        status = 130
    return status


def _check_config(argv: list[str]) -> int:
    from agentd.config import config_tree

    _, config = _load_config("check-config", argv)
    if config is None:
        return EXIT_CONFIG
    secrets = {config.llm.api_key_env: config.llm_api_key(), config.server.auth_token_env: config.twilio_auth_token(),
               config.server.call_token_secret_env: config.call_token_secret()}
    print(json.dumps(config_tree(config), indent=2, ensure_ascii=False))
    for name, value in secrets.items():
        if name:
            print(f"# {name}: {'set (hidden)' if value else 'not set'}")
    return 0


def _report(argv: list[str]) -> int:
    from agentd.report import main as report_main
    return report_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv and argv[0] == "--version":
        print(f"agentd {_version()}")
        return 0
    if not argv or argv[0] not in _COMMANDS:
        print(_usage(), file=sys.stderr)
        return EXIT_CONFIG
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return _serve(rest)
    if command == "check-config":
        return _check_config(rest)
    if command == "report":
        return _report(rest)
    if command == "localcloud":
        from agentd.testbed.localcloud import main as localcloud_main
        return localcloud_main(rest)
    if command == "call":
        from agentd.testbed.softphone import main as call_main
        return call_main(rest)
    from agentd.testbed.demo import main as demo_main
    return demo_main(rest)


if __name__ == "__main__":
    sys.exit(main())
