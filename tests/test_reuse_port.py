"""server.reuse_port: several `agentd serve` processes share one Twilio port (SO_REUSEPORT).

Two real daemons bind the same 127.0.0.1 port; the kernel hashes each new
connection onto one of them, so calls land on both. When one drains, it
closes its listener: every new call goes to the other while the drained
process's own calls go on to their end. Which process took a call is read
from the processes' own call records.
"""

from __future__ import annotations

import signal
import socket

import pytest
import trio
from node_harness import agentd_node, wait_calls_active, wait_until_recorded

from agentd.listeners import open_shared_tcp_listeners
from agentd.testbed.softphone import place_call

TEST_LIMIT_S = 90  # a guard against hangs, not a performance assertion
NEW_CALLS = 3  # placed while a drains: each must land on b
MAX_PROBE_CALLS = 16  # the chance that 16 hashed connections all pick one of two sockets is 1 in 32,768


@pytest.fixture
def shared_port():
    """A port both nodes may bind: held (bound, never listening) with SO_REUSEPORT until the test ends,
    so no other program takes it meanwhile."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


async def test_two_processes_on_one_port_both_take_calls_and_a_draining_one_takes_no_new_call(
        cloud_process, shared_port, caller, tmp_path):
    with trio.fail_after(TEST_LIMIT_S):
        async with (agentd_node(cloud_process, "a", tmp_path, port=shared_port, reuse_port=True) as a,
                    agentd_node(cloud_process, "b", tmp_path, port=shared_port, reuse_port=True) as b):
            url = a.url
            assert b.url == url

            # Greeting-only calls until each process has answered one.
            took = []
            while {a.name, b.name} - {node.name for node in took}:
                assert len(took) < MAX_PROBE_CALLS, f"{len(took)} calls all landed on {took[0].name}"
                report = await place_call(url, [], business="acme")
                assert report.greeting.audio_ms > 0 and report.ended_by == "softphone"
                took.append(await wait_until_recorded(report.call_sid, [a, b]))

            # Two-turn calls until one is in progress on a; then a drains.
            held = []
            async with trio.open_nursery() as nursery:
                async def long_call() -> None:
                    held.append(await place_call(url, [caller["hours"], caller["bye"]], business="acme"))

                dialed = 0
                while await a.calls_active() == 0:
                    nursery.start_soon(long_call)
                    dialed += 1
                    await wait_calls_active([a, b], dialed)
                on_a = await a.calls_active()
                a.process.send_signal(signal.SIGTERM)
                while (await a.ops_get("/readyz")).status_code != 503:
                    await trio.sleep(0.05)

                new_calls = [await place_call(url, [], business="acme") for _ in range(NEW_CALLS)]
                for report in new_calls:
                    assert report.greeting.audio_ms > 0 and report.ended_by == "softphone"
                    assert (await wait_until_recorded(report.call_sid, [a, b])).name == "b"

            assert await a.agent.wait() == 0
            assert len(held) == dialed
            for report in held:
                assert [t.answered for t in report.turns] == [True, True]
            ended_on_a = [r for r in a.call_records() if r["call_sid"] in {h.call_sid for h in held}]
            # Each held call ended as its caller said goodbye (the model's end_call), never by the drain.
            assert len(ended_on_a) == on_a and {r["end_reason"] for r in ended_on_a} == {"agent hung up"}
            new_on_b = [r for r in b.call_records() if r["call_sid"] in {n.call_sid for n in new_calls}]
            assert max(r["time"] for r in ended_on_a) > min(r["time"] for r in new_on_b), \
                "a was still up, draining its own calls, when b answered the first new call"


async def test_a_port_held_without_reuse_port_is_refused():
    with socket.socket() as plain:  # a process that did not ask to share
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        with pytest.raises(OSError, match="SO_REUSEPORT"):
            await open_shared_tcp_listeners(plain.getsockname()[1], host="127.0.0.1")
