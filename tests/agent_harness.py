"""Running `agentd serve` inside a test and reading what it recorded."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator

import trio

from agentd.config import Config, load_config
from agentd.testbed.demo import demo_config
from agentd.server import Server, serve

GUARD_S = 30  # a guard against hangs, not a performance assertion


async def start_agent(nursery: trio.Nursery, config, records: list[dict]) -> str:
    """Start the daemon in ``nursery``; its turn and call records land in ``records``."""
    server = await nursery.start(functools.partial(serve, config, observers=[records.append]))
    return f"ws://127.0.0.1:{server.port}{config.server.path}"


def acme_config(cloud, telemetry_dir: str, **overrides) -> Config:
    """The shipped config on localcloud with `overrides`, the short acme greeting and acme by default."""
    base = load_config(None).with_overrides(**{
        "businesses.acme.greeting": "Acme Plumbing, hello.", "default_business": "acme", **overrides})
    return demo_config(base, cloud, telemetry_dir)


@contextlib.asynccontextmanager
async def serving(config: Config, records: list[dict] | None = None) -> AsyncIterator[Server]:
    """Serve `config` for the block (under a GUARD_S guard); yields the Server. Records go to `records`."""
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            observers = [records.append] if records is not None else []
            yield await nursery.start(functools.partial(serve, config, observers=observers))
            nursery.cancel_scope.cancel()


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
