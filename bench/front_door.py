"""``python -m bench.front_door``: hostile clients against ``agentd serve`` for a while; do real calls still get in?

The long version of tests/test_front_door.py. One ``agentd serve`` child
(signature checks on, optionally a low fd limit: ``--nofile``) and localcloud;
this process attacks from 127.0.0.2 and places a healthy call from 127.0.0.1
every ``--call-every-s``, for ``--seconds``. Attacks (``--attack``):

- ``refused``: unsigned upgrades, and the client keeps every socket open (the
  old front door never closed them);
- ``silent``: upgrades with a valid (replayed) signature that never send
  ``start`` (the old one let them hold every call slot);
- ``leave``: unsigned upgrades reset at once (the old one logged a traceback).

Reported: attempted and achieved opens per second; attacker sockets the
server still held at the end and at most at once (from the client's side);
agentd's open fds at most (from /proc); healthy calls greeted, refused or
failed and their greeting latency; agentd's log lines, bytes, tracebacks and
"refused N more" summary lines. Everything listens on 127.0.0.1; every wait
is bounded; child processes are stopped by their own pid.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from agentd.security import twilio_signature
from agentd.testbed.softphone import place_call
from bench import common

ATTACKER = "127.0.0.2"
PUBLIC_URL = "wss://bench.example.com/media"
AUTH_TOKEN = "bench-front-door-token"
TOKEN_ENV = "AGENTD_BENCH_TWILIO_TOKEN"


def upgrade(signed: bool) -> bytes:
    lines = ["GET /media HTTP/1.1", "Host: bench.example.com", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    if signed:
        lines.append(f"X-Twilio-Signature: {twilio_signature(AUTH_TOKEN, PUBLIC_URL)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Attack:
    """Opens attacker connections at a rate and keeps count of what the server did with them."""

    def __init__(self, port: int, kind: str) -> None:
        self.port = port
        self.kind = kind
        self.attempted = self.opened = self.failed = 0
        self.open_now = self.open_max = 0

    async def run(self, rate: float, nursery: trio.Nursery) -> None:
        while True:
            self.attempted += 1
            nursery.start_soon(self._one)
            await trio.sleep(1 / rate)

    async def _one(self) -> None:
        try:
            sock = trio.socket.socket()
            await sock.bind((ATTACKER, 0))
            await sock.connect(("127.0.0.1", self.port))
        except OSError:
            self.failed += 1
            return
        stream = trio.SocketStream(sock)
        self.opened += 1
        self.open_now += 1
        self.open_max = max(self.open_max, self.open_now)
        try:
            await stream.send_all(upgrade(signed=self.kind == "silent"))
            if self.kind == "leave":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            while await stream.receive_some():  # hold it until the server closes it
                pass
        except (trio.BrokenResourceError, OSError):
            pass
        finally:
            self.open_now -= 1
            await trio.aclose_forcefully(stream)


async def healthy_calls(url: str, every_s: float, results: list[dict]) -> None:
    headers = {"x-twilio-signature": twilio_signature(AUTH_TOKEN, PUBLIC_URL)}
    while True:
        began = time.monotonic()
        try:
            report = await place_call(url, [], extra_headers=headers, connect_timeout_s=10)
            results.append({"greeted": report.greeting.audio_ms > 0, "greeting_ms": report.greeting_latency_ms,
                             "ended_by": report.ended_by, "detail": report.close_detail})
        except Exception as exc:  # a refused call is a result here, not a crash of the bench
            results.append({"greeted": False, "greeting_ms": None, "ended_by": "error", "detail": repr(exc)[:200]})
        await trio.sleep(max(0.0, began + every_s - time.monotonic()))


async def watch_fds(pid: int, peak: list[int]) -> None:
    while True:
        try:
            peak[0] = max(peak[0], len(os.listdir(f"/proc/{pid}/fd")))
        except OSError:
            return
        await trio.sleep(0.2)


async def attack_and_call(port: int, pid: int, args: argparse.Namespace) -> dict:
    attack = Attack(port, args.attack)
    calls: list[dict] = []
    fds = [0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_fds, pid, fds)
        nursery.start_soon(attack.run, args.rate, nursery)
        nursery.start_soon(healthy_calls, f"ws://127.0.0.1:{port}/media", args.call_every_s, calls)
        await trio.sleep(args.seconds)
        held_at_end = attack.open_now
        nursery.cancel_scope.cancel()
    return {"attack": args.attack, "seconds": args.seconds, "rate_per_s": args.rate,
            "opens_per_s": attack.opened / args.seconds, "connect_failures": attack.failed,
            "attacker_sockets_open_max": attack.open_max, "attacker_sockets_open_at_end": held_at_end,
            "agentd_fds_max": fds[0], "healthy_calls": len(calls),
            "healthy_greeted": sum(c["greeted"] for c in calls),
            "greeting_ms_p50": common.percentile([c["greeting_ms"] for c in calls], 50),
            "greeting_ms_max": max((c["greeting_ms"] for c in calls if c["greeting_ms"] is not None), default=None),
            "failed_calls": [c for c in calls if not c["greeted"]][:5]}


def read_log(path: Path) -> dict:
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    return {"log_lines": len(lines), "log_bytes": len(text.encode()),
            "tracebacks": sum("Traceback" in line for line in lines),
            "summary_lines": sum("more connections in the last" in line for line in lines)}


def start_agentd(lc: common.LocalCloudProcess, run_dir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    port = common.free_port()
    overrides = common.agentd_overrides(lc, port=port) | {
        "server.public_url": PUBLIC_URL, "server.auth_token_env": TOKEN_ENV, "server.max_calls": args.max_calls,
        "server.stats_interval_s": 0}
    env = os.environ | common.env_overrides(overrides) | {TOKEN_ENV: AUTH_TOKEN}

    def limit_fds() -> None:
        if args.nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))

    with open(run_dir / "agentd.log", "ab") as log_file:
        process = subprocess.Popen([common.PYTHON, "-m", "agentd", "serve"], cwd=common.REPO, env=env,
                                   stdout=log_file, stderr=log_file, preexec_fn=limit_fds)
    common.wait_for_port(port, process, timeout_s=60)
    return process, port


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.front_door", description=__doc__.split("\n")[0])
    parser.add_argument("--attack", choices=("refused", "silent", "leave"), default="silent")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=20.0, help="attacker connections opened per second")
    parser.add_argument("--call-every-s", type=float, default=3.0)
    parser.add_argument("--max-calls", type=int, default=10)
    parser.add_argument("--nofile", type=int, default=0, help="agentd's fd limit (0: inherited)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-front-door-"))
    delays = common.Delays(stt_final_ms=150)
    with common.LocalCloudProcess([common.HOURS.script], delays, log_path=run_dir / "localcloud.log") as lc:
        process, port = start_agentd(lc, run_dir, args)
        try:
            result = trio.run(attack_and_call, port, process.pid, args)
        finally:
            common.stop_child(process)
    result |= read_log(run_dir / "agentd.log")
    result["run_dir"] = str(run_dir)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0 if result["healthy_greeted"] == result["healthy_calls"] and not result["tracebacks"] else 1


if __name__ == "__main__":
    sys.exit(main())
