"""etc/haproxy.cfg in front of two agentd nodes: calls spread over both, and a node's drain loses no call.

The shipped file is used as it is but for what only a deployment knows: the
listening address (plain ws:// on loopback instead of TLS on :443), the two
nodes' addresses, and the daemon's global lines (user, chroot, log socket, and a maxconn
within an unprivileged process's file limit).
HAProxy, both nodes and localcloud are real processes on 127.0.0.1; which
node took a call is read from the nodes' own call records.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from node_harness import Node, agentd_node, wait_calls_active, wait_until_recorded

from agentd.testbed.softphone import CallReport, place_call
from bench.common import free_port

HAPROXY_CFG = Path(__file__).resolve().parent.parent / "etc" / "haproxy.cfg"
TEST_LIMIT_S = 90  # a guard against hangs, not a performance assertion
FIRST_WAVE, NEXT_WAVE = 20, 10


@pytest.fixture
def haproxy() -> str:
    path = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")  # sbin: not on every PATH
    if path is None:
        pytest.skip("haproxy is not installed (scripts/install.sh installs Debian's haproxy package)")
    return path


def test_the_shipped_file_passes_haproxys_own_check(haproxy, tmp_path):
    """`haproxy -c` on etc/haproxy.cfg as shipped, its certificate path pointed at a throwaway one."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (it makes the throwaway certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=voice.example.com", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    (tmp_path / "voice.pem").write_bytes(cert.read_bytes() + key.read_bytes())
    shipped = HAPROXY_CFG.read_text()
    config, count = re.subn(r"crt \S+", f"crt {tmp_path / 'voice.pem'}", shipped)
    assert count == 1
    (tmp_path / "haproxy.cfg").write_text(config)
    result = subprocess.run([haproxy, "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def loopback_config(shipped: str, *, port: int, nodes: list[Node], admin_socket: Path) -> str:
    """The shipped config listening on 127.0.0.1:``port`` in front of ``nodes``, run as this user."""
    rules = [
        (r"^\s*(chroot|user|group|daemon|log /dev/log)\b.*\n", ""),  # root-only or system-wide
        (r"^(\s*)maxconn \d+$", r"\g<1>maxconn 1000"),  # within an unprivileged process's file limit
        (r"stats socket \S+", f"stats socket {admin_socket}"),
        (r"^(\s*)bind .*$", rf"\g<1>bind 127.0.0.1:{port}"),
        (r"^\s*server .*\n", ""),
    ]
    for pattern, replacement in rules:
        shipped, count = re.subn(pattern, replacement, shipped, flags=re.MULTILINE)
        assert count, f"etc/haproxy.cfg no longer has a line matching {pattern!r}"
    sections = [line for line in shipped.splitlines() if line and not line[0].isspace() and line[0] != "#"]
    assert sections[-1] == "backend agentd", "the servers are appended: the backend must come last"
    servers = "".join(f"    server {n.name} 127.0.0.1:{n.port} check port {n.ops_port}\n" for n in nodes)
    return shipped.rstrip() + "\n" + servers


@contextlib.asynccontextmanager
async def running_haproxy(haproxy: str, tmp_path: Path, nodes: list[Node]) -> AsyncIterator[str]:
    """HAProxy in the foreground with the loopback config; yields its ws:// URL once both nodes are UP."""
    port, admin_socket = free_port(), tmp_path / "haproxy.sock"
    config = tmp_path / "haproxy.cfg"
    config.write_text(loopback_config(HAPROXY_CFG.read_text(), port=port, nodes=nodes, admin_socket=admin_socket))
    with open(tmp_path / "haproxy.log", "wb") as log:
        process = await trio.lowlevel.open_process([haproxy, "-db", "-f", str(config)],
                                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        while await servers_up(admin_socket) != {n.name for n in nodes}:
            assert process.returncode is None, (tmp_path / "haproxy.log").read_text()
            await trio.sleep(0.1)
        yield f"ws://127.0.0.1:{port}/media"
    finally:
        process.terminate()
        with trio.CancelScope(shield=True):
            await process.wait()


async def servers_up(admin_socket: Path) -> set[str]:
    """The backend's servers HAProxy's health checks hold UP (its stats socket's `show stat`)."""
    try:
        stream = await trio.open_unix_socket(str(admin_socket))
    except OSError:  # not listening yet
        return set()
    async with stream:
        await stream.send_all(b"show stat\n")
        chunks = [chunk async for chunk in stream]
    rows = [line.split(",") for line in b"".join(chunks).decode().splitlines()[1:] if line]
    servers = [row for row in rows if row[0] == "agentd" and row[1] != "BACKEND"]  # pxname, svname
    return {row[1] for row in servers if row[17] == "UP"}  # status


def finished_well(report: CallReport, turns: int) -> bool:
    """Every turn answered; the caller hung up, or (after a goodbye, the last of 2 turns) the agent did."""
    return (report.ended_by == ("agent" if turns == 2 else "softphone") and report.greeting.audio_ms > 0
            and report.violations == ()
            and [t.answered for t in report.turns] == [True] * turns)


async def test_a_draining_node_leaves_the_rotation_and_no_call_fails(haproxy, cloud_process, caller, tmp_path):
    first: list[CallReport] = []
    following: list[CallReport] = []
    with trio.fail_after(TEST_LIMIT_S):
        async with (agentd_node(cloud_process, "a", tmp_path) as a, agentd_node(cloud_process, "b", tmp_path) as b,
                    running_haproxy(haproxy, tmp_path, [a, b]) as url):
            async with trio.open_nursery() as nursery:
                async def dial(into: list[CallReport], turns: list) -> None:
                    into.append(await place_call(url, turns, business="acme"))

                for _ in range(FIRST_WAVE):
                    nursery.start_soon(dial, first, [caller["hours"], caller["bye"]])
                await wait_calls_active([a, b], FIRST_WAVE)
                on_a = await a.calls_active()
                assert 0 < on_a < FIRST_WAVE, "leastconn spread the calls over both nodes"

                a.process.send_signal(signal.SIGTERM)
                while (await a.ops_get("/readyz")).status_code != 503:
                    await trio.sleep(0.05)
                # HAProxy checks every second, so it may still send an upgrade to a: a's 503 is retried on b.
                for _ in range(NEXT_WAVE):
                    nursery.start_soon(dial, following, [])
            assert await a.agent.wait() == 0
            took_following = [(await wait_until_recorded(r.call_sid, [a, b])).name for r in following]
            following_on_b = [r for r in b.call_records() if r["call_sid"] in {f.call_sid for f in following}]

    assert len(first) == FIRST_WAVE and all(finished_well(report, 2) for report in first)
    assert len(following) == NEXT_WAVE and all(finished_well(report, 0) for report in following)
    assert took_following == ["b"] * NEXT_WAVE
    a_calls = {r["call_sid"]: r for r in a.call_records()}
    assert len([r for r in first if r.call_sid in a_calls]) == on_a, "a's calls all ran to their end on a"
    assert {a_calls[r.call_sid]["end_reason"] for r in first if r.call_sid in a_calls} == {"agent hung up"}
    assert max(r["time"] for r in a_calls.values()) > min(r["time"] for r in following_on_b), \
        "a was still up, draining its own calls, when b answered the first of the following calls"
