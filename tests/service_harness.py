"""`agentd serve` as a real child process, as systemd runs it: signals, exit status, log lines.

The child is pointed at the test's localcloud with AGENTD__ variables (the
config file stays a plain copy of etc/agentd.toml that a test may rewrite
before a SIGHUP). Its stderr is read line by line; ``wait_for_line`` is how a
test knows a moment has come (listening, draining, reloaded), always under
the test's own ``trio.fail_after``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from agentd.config import DEFAULT_CONFIG_PATH

ACME_GREETING = "Acme Plumbing, hello."


def agent_env(cloud, telemetry_dir: Path, **overrides: object) -> dict[str, str]:
    """The child's environment: the test's localcloud, free ports, telemetry on, plus `overrides`."""
    dotted = {"server.host": "127.0.0.1", "server.port": 0, "server.telemetry_dir": str(telemetry_dir),
              "server.stats_interval_s": 0, "ops.listen": "127.0.0.1:0",
              "stt.endpoint": cloud.grpc_target, "stt.tls": False,
              "tts.endpoint": cloud.grpc_target, "tts.tls": False,
              "llm.base_url": cloud.http_base_url, "llm.api_key_env": "", **overrides}
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD__") and k != "NOTIFY_SOCKET"}
    for key, value in dotted.items():
        env["AGENTD__" + key.replace(".", "__").upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def config_file(directory: Path, *, acme_greeting: str = ACME_GREETING) -> Path:
    """A copy of the shipped etc/agentd.toml with acme's greeting replaced (short ones keep tests quick)."""
    path = directory / "agentd.toml"
    shutil.copy(DEFAULT_CONFIG_PATH, path)
    write_acme_greeting(path, acme_greeting)
    return path


def write_acme_greeting(path: Path, greeting: str) -> None:
    text = path.read_text(encoding="utf-8")
    acme = text.index("[businesses.acme]")
    head, tail = text[:acme], text[acme:]
    tail = re.sub(r'(?m)^greeting = ".*"$', f'greeting = "{greeting}"', tail, count=1)
    path.write_text(head + tail, encoding="utf-8")


class AgentdProcess:
    """A running ``agentd serve`` child and what it has printed so far."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._lot = trio.lowlevel.ParkingLot()
        self.port = 0
        self.ops_port = 0

    async def _read_stderr(self) -> None:
        buffer = b""
        async for chunk in self.process.stderr:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            self.lines += [line.decode(errors="replace") for line in complete]
            self._lot.unpark_all()
        self.lines.append("<EOF>")
        self._lot.unpark_all()

    async def wait_for_line(self, pattern: str, *, after: int = 0) -> re.Match:
        """The first line (from index `after`) matching regex `pattern`; AssertionError if the child exits first."""
        index = after
        while True:
            while index < len(self.lines):
                line = self.lines[index]
                if line == "<EOF>":
                    raise AssertionError(f"agentd exited before printing /{pattern}/:\n" + "\n".join(self.lines))
                match = re.search(pattern, line)
                if match:
                    return match
                index += 1
            await self._lot.park()

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    async def wait(self) -> int:
        return await self.process.wait()

    async def ops_get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient() as client:
            return await client.get(f"http://127.0.0.1:{self.ops_port}{path}")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/media"


@asynccontextmanager
async def running_agentd(config: Path, env: Mapping[str, str]):
    """Start ``agentd serve --config config``; yield once it listens (Twilio and ops ports known).

    On leaving, a child still running is killed (a test that wanted it to exit has waited for that).
    """
    command = [sys.executable, "-m", "agentd", "serve", "--config", str(config)]
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(command, env=dict(env), stderr=subprocess.PIPE,
                                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        agent = AgentdProcess(process)
        nursery.start_soon(agent._read_stderr)
        try:
            agent.port = int((await agent.wait_for_line(r"agentd listening on ws://[^:]+:(\d+)/"))[1])
            agent.ops_port = int((await agent.wait_for_line(r"ops listening on http://[^:]+:(\d+)"))[1])
            yield agent
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
            nursery.cancel_scope.cancel()


__all__ = ["ACME_GREETING", "AgentdProcess", "agent_env", "config_file", "running_agentd", "signal",
           "write_acme_greeting"]
