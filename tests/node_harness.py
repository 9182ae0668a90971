"""`agentd serve` as child processes: the nodes of the multi-process and load-balancer tests.

Each node is a real daemon (`python -m agentd serve`) with its own ops port and
telemetry directory, pointed at a localcloud child process over loopback. A
test learns which node took a call from the node's call records (the
softphone's call_sid), and how many calls a node holds from its /metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from agentd.config import DEFAULT_CONFIG_PATH
from bench.common import REPO, LocalCloudProcess, agentd_overrides, env_overrides, free_port

STOP_LIMIT_S = 20.0
POLL_S = 0.1
# The shipped greeting takes ~4 s to play; the tests need a greeting, not that one.
SHORT_GREETING = "Acme Plumbing, hello."


@dataclass
class Node:
    """One running `agentd serve` child process."""

    name: str
    process: trio.Process
    port: int
    ops_port: int
    telemetry_dir: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/media"

    def call_sids(self) -> set[str]:
        """The calls this node has recorded as ended (its calls-*.jsonl)."""
        sids = set()
        for path in self.telemetry_dir.glob("calls-*.jsonl"):
            sids |= {json.loads(line)["call_sid"] for line in path.read_text().splitlines() if line}
        return sids

    def call_records(self) -> list[dict]:
        return [json.loads(line) for path in self.telemetry_dir.glob("calls-*.jsonl")
                for line in path.read_text().splitlines() if line]

    async def ops_get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=5) as client:
            return await client.get(f"http://127.0.0.1:{self.ops_port}{path}")

    async def calls_active(self) -> int:
        """agentd_calls_active from the node's /metrics."""
        text = (await self.ops_get("/metrics")).text
        line = next(line for line in text.splitlines() if line.startswith("agentd_calls_active "))
        return round(float(line.split()[1]))

    async def wait_exit(self) -> int:
        """The node's exit status, once it has exited (bounded by the caller's deadline)."""
        return await self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def short_greeting_config(tmp_path: Path) -> Path:
    """The shipped agentd.toml with a short greeting for `acme` (businesses live only in the file)."""
    text = DEFAULT_CONFIG_PATH.read_text(encoding="utf-8")
    long_greeting = "Hello, you've reached Acme Plumbing. How can I help you today?"
    assert long_greeting in text, "the shipped acme greeting changed; update SHORT_GREETING's replacement"
    path = tmp_path / "agentd.toml"
    path.write_text(text.replace(long_greeting, SHORT_GREETING), encoding="utf-8")
    return path


@contextlib.asynccontextmanager
async def agentd_node(lc: LocalCloudProcess, name: str, tmp_path: Path, *, port: int | None = None,
                      reuse_port: bool = False) -> AsyncIterator[Node]:
    """Start `agentd serve` as node `name`; yield it once its /readyz says 200; stop it (SIGTERM) on exit.

    ``port`` None: a free port of its own. Raises RuntimeError, with the node's
    log, if it exits before it is ready.
    """
    port = free_port() if port is None else port
    node_dir = tmp_path / name
    node_dir.mkdir()
    overrides = agentd_overrides(lc, port=port, telemetry_dir=str(node_dir / "telemetry"))
    ops_port = free_port()
    overrides |= {"ops.listen": f"127.0.0.1:{ops_port}", "server.reuse_port": reuse_port,
                  "server.stats_interval_s": 0}
    env = {**os.environ, **env_overrides(overrides)}
    log_path = node_dir / "agentd.log"
    config = short_greeting_config(node_dir)
    with open(log_path, "wb") as log:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "agentd", "serve", "--config", str(config)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    node = Node(name, process, port, ops_port, node_dir / "telemetry", log_path)
    try:
        await _wait_ready(node)
        yield node
    finally:
        with trio.CancelScope(shield=True):
            await _stop(node)


async def _wait_ready(node: Node) -> None:
    while True:
        if node.process.returncode is not None:
            raise RuntimeError(f"node {node.name} exited with {node.process.returncode}:\n{node.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if (await node.ops_get("/readyz")).status_code == 200:
                return
        await trio.sleep(POLL_S)


async def _stop(node: Node) -> None:
    if node.process.returncode is None:
        node.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_LIMIT_S):
            await node.process.wait()
    if node.process.returncode is None:
        node.process.kill()
        await node.process.wait()


async def wait_until_recorded(call_sid: str, nodes: list[Node]) -> Node:
    """The node whose call records hold ``call_sid``, once one does (bounded by the caller's deadline)."""
    while True:
        for node in nodes:
            if call_sid in node.call_sids():
                return node
        await trio.sleep(POLL_S)


async def wait_calls_active(nodes: list[Node], count: int) -> None:
    """Return once ``nodes`` hold ``count`` calls in all (bounded by the caller's deadline)."""
    while sum([await node.calls_active() for node in nodes]) != count:
        await trio.sleep(POLL_S)
