"""``python -m bench.ws_cost``: the CPU floor under agentd's capacity -- one WebSocket message on Trio.

agentd receives 50 Twilio messages a second per call and sends up to 50;
whatever agentd does with them, each one first costs what trio, trio-websocket
and wsproto charge to move it. This measures that charge alone, over real
loopback sockets, at the real cadence:

* ``receive``: a server on core 0 accepts --connections WebSockets and only
  reads (``get_message``); a client process on core 1 sends each connection a
  Twilio-sized media message every 20 ms.
* ``send``: the server sends each connection such a message every 20 ms,
  paced the way agentd paces (agentd.metronome), and the client reads.

Each for two server sides (``--transport``, default both): trio-websocket's own
connection (its reader task hands each message to ``get_message`` through a
memory channel), and what ``agentd serve`` uses, trio-websocket's handshake
handed over to agentd.media_socket's ``MediaSocket`` (the socket read and
written by the reading task itself, simple frames parsed by
agentd.codecs.ws_frames, anything else by wsproto).

Reported: the server's CPU microseconds per message (/proc utime+stime over a
steady window / messages), and what that alone costs at 200 calls
(200 x 50 received + 200 x 25 sent a second: the agent speaks about half the
time). No agentd code runs on the receive side, and only the pacer on the send
side, so this is a floor for agentd, not an estimate of it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import trio
import trio_websocket

from agentd import media_socket, wsconn
from agentd.codecs import twilio
from agentd.metronome import Metronome
from bench import common

FRAME_S = 0.02
TRANSPORTS = {"trio-websocket": "trio-websocket's connection (reader task + message channel)",
              "agentd": "agentd's MediaSocket after trio-websocket's handshake (what agentd serve uses)"}
MESSAGE = twilio.render_inbound_media(stream_sid="MZ" + "0" * 32, sequence=7, chunk=6, timestamp_ms=120,
                                      payload=bytes(range(160)))


async def serve(mode: str, transport: str, connections: int, warmup_s: float, measure_s: float) -> None:
    """The measured side: prints its port, then one JSON line with the result."""
    counted, accepted = [0], [0]
    started = trio.Event()
    metronome = Metronome()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        if transport == "agentd":
            async with media_socket.accepted(request, max_message_size=1 << 20) as ws:
                await exchange(ws)
        else:
            await exchange(await request.accept())

    async def exchange(ws) -> None:
        accepted[0] += 1
        try:
            if mode == "receive":
                while True:
                    await ws.get_message()
                    counted[0] += 1
            else:
                await started.wait()
                due = metronome.align(trio.current_time())
                while True:
                    due += FRAME_S
                    await metronome.alarm(due).wait()
                    await ws.send_message(MESSAGE)
                    counted[0] += 1
        except trio_websocket.ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        await nursery.start(metronome.run)
        port = await nursery.start(_listen, handler, transport)
        print(port, flush=True)
        with trio.move_on_after(30):
            while accepted[0] < connections:
                await trio.sleep(0.05)
        started.set()
        await trio.sleep(warmup_s)
        cpu0, n0, t0 = common.cpu_seconds(os.getpid()), counted[0], time.monotonic()
        await trio.sleep(measure_s)
        cpu1, n1, t1 = common.cpu_seconds(os.getpid()), counted[0], time.monotonic()
        print(json.dumps({"messages_per_s": (n1 - n0) / (t1 - t0), "cpu_s": cpu1 - cpu0,
                          "us_per_message": 1e6 * (cpu1 - cpu0) / max(1, n1 - n0)}), flush=True)
        nursery.cancel_scope.cancel()


async def _listen(handler, transport: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """trio-websocket's server alone, or with agentd's handover to a MediaSocket after the handshake."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    if transport == "agentd":
        await trio.serve_listeners(lambda stream: wsconn.serve_websocket(
            stream, handler, max_message_bytes=1 << 20, handshake_timeout_s=30, close_timeout_s=1), listeners)
    else:
        await trio_websocket.WebSocketServer(handler, listeners).run()


async def dial(mode: str, port: int, connections: int, duration_s: float) -> None:
    """The load side: `connections` sockets, one message per 20 ms each way that is measured."""
    async def one(index: int) -> None:
        async with trio_websocket.open_websocket("127.0.0.1", port, "/media", use_ssl=False) as ws:
            end = trio.current_time() + duration_s
            due = trio.current_time() + index * FRAME_S / connections  # spread over the 20 ms
            while trio.current_time() < end:
                if mode == "receive":
                    due += FRAME_S
                    await trio.sleep_until(due)
                    await ws.send_message(MESSAGE)
                else:
                    with trio.move_on_at(end):
                        await ws.get_message()

    async with trio.open_nursery() as nursery:
        for index in range(connections):
            nursery.start_soon(one, index)


def measure(mode: str, transport: str, connections: int, warmup_s: float, measure_s: float) -> dict:
    server = subprocess.Popen(common.pinned([common.PYTHON, "-m", "bench.ws_cost", "--role", "server", "--mode", mode,
                                             "--transport", transport,
                                             "--connections", str(connections), "--warmup-s", str(warmup_s),
                                             "--measure-s", str(measure_s)], 0),
                              cwd=common.REPO, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        client = subprocess.Popen(common.pinned([common.PYTHON, "-m", "bench.ws_cost", "--role", "client", "--mode",
                                                 mode, "--connections", str(connections), "--port", str(port),
                                                 "--duration-s", str(warmup_s + measure_s + 30)], 1), cwd=common.REPO)
        try:
            result = json.loads(server.stdout.readline())
        finally:
            common.stop_child(client)
    finally:
        common.stop_child(server)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ws_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--measure-s", type=float, default=10.0)
    parser.add_argument("--role", choices=("main", "server", "client"), default="main", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("receive", "send"), default="receive", help=argparse.SUPPRESS)
    parser.add_argument("--transport", choices=TRANSPORTS, default=None,
                        help="measure only this server side (default: both)")
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--duration-s", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "server":
        trio.run(serve, args.mode, args.transport, args.connections, args.warmup_s, args.measure_s)
        return 0
    if args.role == "client":
        trio.run(dial, args.mode, args.port, args.connections, args.duration_s)
        return 0
    print(f"WebSocket cost on Trio ({args.connections} connections, one message per 20 ms each, server on core 0):")
    for transport in [args.transport] if args.transport else TRANSPORTS:
        results = {mode: measure(mode, transport, args.connections, args.warmup_s, args.measure_s)
                   for mode in ("receive", "send")}
        receive_us, send_us = results["receive"]["us_per_message"], results["send"]["us_per_message"]
        at_200 = (200 * 50 * receive_us + 200 * 25 * send_us) / 1e6
        print(f" {TRANSPORTS[transport]}:")
        for mode, result in results.items():
            print(f"  {mode:<8} {result['us_per_message']:6.1f} us CPU per message "
                  f"({result['messages_per_s']:.0f} messages/s measured)")
        print(f"  at 200 calls (10,000 received + 5,000 sent a second) that alone is {100 * at_200:.0f} % of one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
