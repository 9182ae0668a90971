"""Running `agentd serve` inside a test and reading what it recorded."""

from __future__ import annotations

import functools

import trio

from agentd.server import serve


async def start_agent(nursery: trio.Nursery, config, records: list[dict]) -> str:
    """Start the daemon in ``nursery``; its turn and call records land in ``records``."""
    server = await nursery.start(functools.partial(serve, config, observers=[records.append]))
    return f"ws://127.0.0.1:{server.port}{config.server.path}"


def turns_of(records: list[dict], call_sid: str) -> list[dict]:
    return sorted((r for r in records if r["kind"] == "turn" and r["call_sid"] == call_sid),
                  key=lambda r: r["turn"])


def call_record(records: list[dict], call_sid: str) -> dict:
    return next(r for r in records if r["kind"] == "call" and r["call_sid"] == call_sid)


async def wait_for_call_record(records: list[dict], call_sid: str) -> dict:
    """agentd writes a call's record as the call ends; wait for it (bounded by the caller's fail_after)."""
    while not any(r["kind"] == "call" and r["call_sid"] == call_sid for r in records):
        await trio.sleep(0.05)
    return call_record(records, call_sid)
