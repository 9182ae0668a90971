"""The shipped unit agrees with the daemon: notify, watchdog, reload, no restart loop on exit 2, a stop
timeout longer than the drain."""

from __future__ import annotations

import configparser
from pathlib import Path

from agentd.config import load_config
from agentd.drain import GOODBYE_GRACE_S

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "agentd.service"


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read(UNIT)
    return parser["Service"]


def test_the_unit_waits_for_ready_and_is_watched():
    unit = service()
    assert unit["Type"] == "notify" and int(unit["WatchdogSec"]) > 0
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_a_config_error_is_not_restarted_in_a_loop():
    assert service()["RestartPreventExitStatus"] == "2"


def test_systemd_never_kills_a_drain_in_progress():
    unit = service()
    assert unit["KillSignal"] == "SIGTERM"
    assert int(unit["TimeoutStopSec"]) > load_config(None).server.drain_timeout_s + GOODBYE_GRACE_S
