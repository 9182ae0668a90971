"""systemd/agentd@.service (one process per core) and agentd.target: what each instance gets, and that
systemd itself accepts the units."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agentd.config import load_config

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
TEMPLATE, SINGLE, TARGET = SYSTEMD / "agentd@.service", SYSTEMD / "agentd.service", SYSTEMD / "agentd.target"
# What an instance sets beyond the single unit: its ops port and telemetry directory, the shared port.
INSTANCE_LINES = {
    "Environment=AGENTD__SERVER__TELEMETRY_DIR=/var/lib/agentd/telemetry/%i",
    "Environment=AGENTD__OPS__LISTEN=127.0.0.1:%i",
    "Environment=AGENTD__SERVER__REUSE_PORT=true",
}


def section(path: Path, name: str) -> list[str]:
    """The setting lines of one [section] of a unit file, comments and blank lines left out."""
    lines, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("["):
            inside = line == f"[{name}]"
        elif inside and line.strip() and not line.startswith("#"):
            lines.append(line.strip())
    return lines


def test_an_instance_runs_exactly_as_the_single_unit_but_for_its_own_lines():
    single = [line for line in section(SINGLE, "Service") if "AGENTD__SERVER__TELEMETRY_DIR" not in line]
    template = section(TEMPLATE, "Service")
    assert [line for line in template if line not in INSTANCE_LINES] == single
    assert INSTANCE_LINES <= set(template)


def test_an_instance_name_is_its_ops_port_and_every_instance_shares_the_twilio_port():
    env = {}
    for line in section(TEMPLATE, "Service"):
        if line.startswith("Environment=AGENTD__"):
            name, _, value = line.removeprefix("Environment=").partition("=")
            env[name] = value.replace("%i", "9092")
    config = load_config(None, env=env)
    assert config.ops.listen == "127.0.0.1:9092"
    assert config.server.telemetry_dir == "/var/lib/agentd/telemetry/9092"
    assert config.server.reuse_port is True
    assert config.server.port == load_config(None, env={}).server.port


def test_the_target_starts_and_stops_every_enabled_instance():
    assert "PartOf=agentd.target" in section(TEMPLATE, "Unit")
    assert section(TEMPLATE, "Install") == ["WantedBy=agentd.target"]
    assert section(TARGET, "Install") == ["WantedBy=multi-user.target"]


def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    # verify checks that ExecStart exists: point it at this checkout's agentd instead of /opt/agentd.
    agentd = Path(sys.executable).with_name("agentd")
    for unit in (TEMPLATE, SINGLE, TARGET):
        text = unit.read_text(encoding="utf-8").replace("/opt/agentd/.venv/bin/agentd", str(agentd))
        (tmp_path / unit.name).write_text(text, encoding="utf-8")
    result = subprocess.run([analyze, "verify", "--man=no", "agentd@9091.service", "agentd.service", "agentd.target"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    # systemd-analyze exits 0 after "ignoring" a bad line; any output is a problem.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
