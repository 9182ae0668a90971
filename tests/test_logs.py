"""Log formats: one JSON object per line carrying the call it belongs to; httpx quiet."""

from __future__ import annotations

import datetime
import json
import logging

import trio

from agentd.logs import set_call, setup_logging


def test_json_lines_carry_time_level_call_and_business(capsys):
    setup_logging("INFO", "json")
    log = logging.getLogger("agentd.test")

    async def call_task() -> None:
        set_call("CA0123", "acme")
        async def turn() -> None:
            log.info("turn %d answered", 3)

        async with trio.open_nursery() as nursery:  # tasks the call starts inherit it
            nursery.start_soon(turn)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_task)
        log.warning("outside any call")

    try:
        trio.run(main)
    finally:
        setup_logging("INFO", "text")
    inside, outside = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert {k: inside[k] for k in ("level", "logger", "event", "call_sid", "business")} == {
        "level": "INFO", "logger": "agentd.test", "event": "turn 3 answered", "call_sid": "CA0123",
        "business": "acme"}
    assert datetime.datetime.fromisoformat(inside["time"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0
    assert "call_sid" not in outside and outside["level"] == "WARNING"


def test_httpx_request_lines_are_off_by_default():
    setup_logging("INFO", "text")
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
    assert logging.getLogger("agentd").isEnabledFor(logging.INFO)
