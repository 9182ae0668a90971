"""Several `agentd serve` child processes as the nodes of one deployment (service_harness starts each).

A node is a real daemon with its own ops port and telemetry directory,
pointed at a localcloud child process over loopback. A test learns which node
took a call from the node's call records (the softphone's call_sid), and how
many calls a node holds from its /metrics.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio
from service_harness import AgentdProcess, agent_env, config_file, running_agentd

POLL_S = 0.1


@dataclass(eq=False)
class Node:
    """One running `agentd serve` child process, named for the test's messages."""

    name: str
    agent: AgentdProcess
    telemetry_dir: Path

    @property
    def process(self) -> trio.Process:
        return self.agent.process

    @property
    def port(self) -> int:
        return self.agent.port

    @property
    def ops_port(self) -> int:
        return self.agent.ops_port

    @property
    def url(self) -> str:
        return self.agent.url

    async def ops_get(self, path: str) -> httpx.Response:
        return await self.agent.ops_get(path)

    def call_records(self) -> list[dict]:
        """The calls this node has recorded as ended (its calls-*.jsonl)."""
        return [json.loads(line) for path in self.telemetry_dir.glob("calls-*.jsonl")
                for line in path.read_text().splitlines() if line]

    async def calls_active(self) -> int:
        """agentd_calls_active from the node's /metrics."""
        text = (await self.ops_get("/metrics")).text
        line = next(line for line in text.splitlines() if line.startswith("agentd_calls_active "))
        return round(float(line.split()[1]))


@contextlib.asynccontextmanager
async def agentd_node(cloud, name: str, tmp_path: Path, *, port: int = 0,
                      reuse_port: bool = False) -> AsyncIterator[Node]:
    """Start `agentd serve` as node `name` against ``cloud``; yield it once its /readyz says 200.

    ``port`` 0: a free port of its own. Leaving the block kills a node still running.
    """
    node_dir = tmp_path / name
    node_dir.mkdir()
    telemetry_dir = node_dir / "telemetry"
    env = agent_env(cloud, telemetry_dir, **{"server.port": port, "server.reuse_port": reuse_port})
    async with running_agentd(config_file(node_dir), env) as agent:
        node = Node(name, agent, telemetry_dir)
        while (await node.ops_get("/readyz")).status_code != 200:  # greetings cached
            await trio.sleep(POLL_S)
        yield node


async def wait_until_recorded(call_sid: str, nodes: list[Node]) -> Node:
    """The node whose call records hold ``call_sid``, once one does (bounded by the caller's deadline)."""
    while True:
        for node in nodes:
            if any(record["call_sid"] == call_sid for record in node.call_records()):
                return node
        await trio.sleep(POLL_S)


async def wait_calls_active(nodes: list[Node], count: int) -> None:
    """Return once ``nodes`` hold ``count`` calls in all (bounded by the caller's deadline)."""
    while sum([await node.calls_active() for node in nodes]) != count:
        await trio.sleep(POLL_S)
