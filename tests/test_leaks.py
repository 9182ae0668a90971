"""Leaks: after ~200 calls hung up at random moments, agentd holds what it held before.

A raw Twilio side (trio_websocket over a TCP stream we own) dials ``agentd
serve`` -- ``connected``, ``start``, then caller audio every 20 ms: some line
silence, a real spoken question, silence again -- and hangs up at a random
moment of the call: during the greeting, mid-utterance, while the agent
thinks, while it speaks. It hangs up in one of three ways: ``stop`` then a
close (Twilio's normal end), a close frame without ``stop``, or closing the
TCP connection with no WebSocket close at all (a proxy that died). The
randomness is seeded, so a run is repeatable up to scheduling. A peer that
vanishes without even a FIN is the last test of this module.

What must come back to its level before the calls (polled, under a Trio-clock
guard; after a warm-up, because pools and caches fill on first use):
Trio tasks (a walk of the task tree from the root), threads, open file
descriptors, and gRPC streams open at localcloud. Each call must also have
ended in the agent (its call record, final state ENDED), and the hang-ups must
have landed in the phases they are meant to cover.
"""

from __future__ import annotations

import enum
import functools
import os
import random
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass

import trio
import trio_websocket

from agentd.codecs import twilio
from agentd.codecs.mulaw import FRAME_BYTES, silence, split_frames
from agentd.server import Server, serve

SEED = 20261121
CALLS = 200
CONCURRENCY = 25
WARM_UP_CALLS = 3  # every path once (greeting, STT stream, LLM, TTS, telemetry) before the baseline
LEAD_MAX_MS = 1500  # line silence before the caller speaks (the greeting plays meanwhile)
AFTER_SPEECH_MS = 4000  # hang-ups land up to this long after the question: thinking and speaking
LLM_TTFT_MS = 1500  # localcloud's model "thinks" this long, so hang-ups can land in THINKING
TEST_LIMIT_S = 150  # guards against hangs, not performance assertions
SETTLE_LIMIT_S = 30
SETTLED_AFTER_S = 11  # Trio's idle worker threads retire after 10 s; the baseline waits them out
FRAME_S = 0.02


class HangUp(enum.Enum):
    STOP = "stop, then close"
    CLOSE = "close frame, no stop"
    DROP = "TCP closed, no close frame"


@dataclass(frozen=True, slots=True, kw_only=True)
class CallPlan:
    """One caller: silence for ``lead_frames``, the question, then silence until ``hang_up_frame``."""

    call_sid: str
    lead_frames: int
    hang_up_frame: int
    hang_up: HangUp


@dataclass(frozen=True, slots=True, kw_only=True)
class Footprint:
    """What a leak would make grow.

    ``fds`` leaves out the sockets of the LLM client's keep-alive pool: httpx
    keeps idle connections (up to a bound) and closes expired ones only when
    the pool is next used, so their number follows the recent peak of
    concurrent LLM requests, not leaks. They are counted in ``llm_connections``
    and only bounded. So are sockets with no TCP connection left (not in
    /proc/net/tcp: reset by the peer, the owner not yet told): localcloud runs
    in this process, and a pooled connection it reset stays an fd until httpx
    next looks at its pool. A leak of those would grow past the bound.
    """

    tasks: int
    threads: int
    fds: int
    grpc_streams: int
    llm_connections: int
    unconnected_sockets: int

    def settled_to(self, baseline: Footprint) -> bool:
        return (self.tasks, self.threads, self.fds, self.grpc_streams) == (
            baseline.tasks, baseline.threads, baseline.fds, baseline.grpc_streams)


def count_tasks() -> int:
    """Every Trio task alive now, found by walking the task tree from the root."""
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return walk(trio.lowlevel.current_root_task())


def _tcp_ports_by_inode() -> dict[str, tuple[int, int]]:
    """Socket inode -> (local port, remote port), from /proc/net/tcp and tcp6."""
    ports = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                ports[fields[9]] = (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16))
    return ports


def open_fds() -> list[tuple[str, str, tuple[int, int] | None]]:
    """Every open fd as (fd, target, (local port, remote port) if a connected TCP socket, else None)."""
    ports = _tcp_ports_by_inode()
    found = []
    for fd in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the fd listing itself, closed by now
            continue
        found.append((fd, target, ports.get(target.removeprefix("socket:[").removesuffix("]"))))
    return found


def describe_fds() -> list[str]:
    """Every open fd as 'fd -> target [local port, remote port]', for a failure message."""
    return [f"{fd} -> {target} {'' if ends is None else ends}" for fd, target, ends in open_fds()]


def footprint(cloud) -> Footprint:
    llm_port = urllib.parse.urlsplit(cloud.http_base_url).port
    fds = llm_sockets = unconnected = 0
    for _, target, ends in open_fds():
        if target.startswith("socket:[") and ends is None:
            unconnected += 1  # not TCP (a socketpair, a unix socket) or no longer connected
        elif ends is not None and llm_port in ends and 0 not in ends:  # a connection to localcloud's HTTP port
            llm_sockets += 1
        else:
            fds += 1
    return Footprint(tasks=count_tasks(), threads=threading.active_count(), fds=fds,
                     grpc_streams=cloud.stats()["active_streams"], llm_connections=llm_sockets // 2,
                     unconnected_sockets=unconnected)


async def settled_footprint(cloud) -> Footprint:
    """The footprint once it has not changed for SETTLED_AFTER_S (bounded by the caller)."""
    settled, since = footprint(cloud), trio.current_time()
    while trio.current_time() - since < SETTLED_AFTER_S:
        await trio.sleep(0.5)
        now = footprint(cloud)
        if now != settled:
            settled, since = now, trio.current_time()
    return settled


async def wait_for_footprint(cloud, baseline: Footprint) -> Footprint:
    """Poll until tasks, threads, fds and gRPC streams are back to ``baseline`` (bounded by the caller)."""
    try:
        while not (now := footprint(cloud)).settled_to(baseline):
            await trio.sleep(0.1)
    except trio.Cancelled:
        print(f"footprint never settled: baseline {baseline}, last {footprint(cloud)}")
        print("open fds now:", describe_fds())
        raise
    return now


def random_plans(rng: random.Random, count: int, speech_frames: int) -> list[CallPlan]:
    """``count`` callers who hang up anywhere from their first frame to AFTER_SPEECH_MS after the question."""
    batch = []
    for n in range(count):
        lead = rng.randrange(LEAD_MAX_MS // 20)
        batch.append(CallPlan(call_sid=f"CA{n:032x}", lead_frames=lead,
                              hang_up_frame=rng.randrange(lead + speech_frames + AFTER_SPEECH_MS // 20),
                              hang_up=rng.choice(list(HangUp))))
    return batch


async def _drain(ws: trio_websocket.WebSocketConnection) -> None:
    """Read what the agent sends (and ignore it: marks are never echoed, as on a bad line)."""
    try:
        while True:
            await ws.get_message()
    except trio_websocket.ConnectionClosed:
        pass


async def place_doomed_call(port: int, path: str, plan: CallPlan, speech: list[bytes]) -> None:
    """Speak Twilio's side of one call and hang up as ``plan`` says."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    sid = "MZ" + plan.call_sid[2:]
    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "127.0.0.1", path)
        nursery.start_soon(_drain, ws)
        frames = [silence(1)] * plan.lead_frames + speech
        try:
            await ws.send_message(twilio.render_connected())
            await ws.send_message(twilio.render_start(stream_sid=sid, call_sid=plan.call_sid, account_sid="AC1",
                                                      custom_parameters={"business": "acme"}))
            t0 = trio.current_time()
            for n in range(plan.hang_up_frame):
                await trio.sleep_until(t0 + n * FRAME_S)
                frame = frames[n] if n < len(frames) else silence(1)
                await ws.send_message(twilio.render_inbound_media(
                    stream_sid=sid, chunk=n + 1, timestamp_ms=n * 20, payload=frame, sequence=n + 2))
            await _hang_up(ws, stream, sid, plan)
        except trio_websocket.ConnectionClosed:
            pass  # the agent hung up first (it may, e.g. after a goodbye); the call is over either way
        nursery.cancel_scope.cancel()


async def _hang_up(ws, stream: trio.SocketStream, sid: str, plan: CallPlan) -> None:
    if plan.hang_up is HangUp.STOP:
        await ws.send_message(twilio.render_stop(sid, plan.call_sid, "AC1", plan.hang_up_frame + 2))
    if plan.hang_up is HangUp.DROP:
        await stream.aclose()
    else:
        with trio.move_on_after(2):  # the close handshake; a late answer is the agent's business
            await ws.aclose()


async def run_calls(server: Server, config, batch: list[CallPlan], speech: list[bytes]) -> None:
    """All of ``batch``, at most CONCURRENCY at a time."""
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def one(plan: CallPlan) -> None:
        async with limiter:
            await place_doomed_call(server.port, config.server.path, plan, speech)

    async with trio.open_nursery() as nursery:
        for plan in batch:
            nursery.start_soon(one, plan)


async def wait_for_call_records(records: list[dict], call_sids: set[str]) -> None:
    while not call_sids <= {r["call_sid"] for r in records if r["kind"] == "call"}:
        await trio.sleep(0.05)


def hang_up_phase(record: dict) -> str:
    """The agent's state when the caller hung up: the last one before ENDED (GREETING if none)."""
    states = record["states"]
    return states[-2] if len(states) >= 2 else "GREETING"


async def test_calls_hung_up_at_random_moments_leave_nothing_behind(config, cloud, caller):
    cloud.configure(llm_ttft_ms=LLM_TTFT_MS)
    rng = random.Random(SEED)
    speech = split_frames(caller["hours"].audio)
    assert all(len(frame) == FRAME_BYTES for frame in speech)
    records: list[dict] = []
    with trio.fail_after(TEST_LIMIT_S):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(serve, config, observers=[records.append]))
            warm_up = [CallPlan(call_sid=f"CA{'a' * 28}{n:04d}", lead_frames=0, hang_up_frame=len(speech) + 150,
                                hang_up=HangUp.STOP) for n in range(WARM_UP_CALLS)]
            await run_calls(server, config, warm_up, speech)
            await wait_for_call_records(records, {p.call_sid for p in warm_up})
            with trio.fail_after(SETTLE_LIMIT_S):
                baseline = await settled_footprint(cloud)

            batch = random_plans(rng, CALLS, len(speech))
            await run_calls(server, config, batch, speech)
            await wait_for_call_records(records, {p.call_sid for p in batch})
            with trio.fail_after(SETTLE_LIMIT_S):
                after = await wait_for_footprint(cloud, baseline)
            active_calls = server.active_calls
            nursery.cancel_scope.cancel()

    print(f"baseline {baseline}\nafter    {after}")
    assert baseline.grpc_streams == 0 and active_calls == 0
    assert after.llm_connections <= CONCURRENCY, "the LLM pool holds more connections than calls ever ran at once"
    assert after.unconnected_sockets <= baseline.unconnected_sockets + CONCURRENCY, "sockets pile up"
    calls = {r["call_sid"]: r for r in records if r["kind"] == "call"}
    assert all(calls[p.call_sid]["states"][-1] == "ENDED" for p in batch)
    phases = Counter(hang_up_phase(calls[p.call_sid]) for p in batch)
    print(f"hang-ups by agent state: {dict(phases)}; by style: {dict(Counter(p.hang_up.name for p in batch))}")
    assert {"GREETING", "LISTENING", "THINKING", "SPEAKING"} <= set(phases), phases


GONE_SID = "0" * 28 + "90ee"  # the hex part of the vanished call's SIDs
MEDIA_GONE_LIMIT_S = 10  # a guard; the agent ends such calls after server.media_timeout_ms (5 s) without media


async def test_a_call_whose_media_stops_without_a_close_is_ended(config, cloud):
    # Twilio sends media every 20 ms for the whole call, silence included, so a stream that stops
    # while its socket stays open is a peer that vanished without a FIN (a half-open connection).
    records: list[dict] = []
    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(serve, config, observers=[records.append]))
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{server.port}{config.server.path}",
                                                     disconnect_timeout=5) as ws:
            await ws.send_message(twilio.render_connected())
            await ws.send_message(twilio.render_start(stream_sid="MZ" + GONE_SID, call_sid="CA" + GONE_SID,
                                                      account_sid="AC1", custom_parameters={"business": "acme"}))
            for n in range(25):
                await ws.send_message(twilio.render_inbound_media(
                    stream_sid="MZ" + GONE_SID, chunk=n + 1, timestamp_ms=n * 20, payload=silence(1), sequence=n + 2))
            with trio.move_on_after(MEDIA_GONE_LIMIT_S):  # then nothing more; only the agent may close now
                await _drain(ws)
            ended = any(r["kind"] == "call" and r["call_sid"] == "CA" + GONE_SID for r in records)
        nursery.cancel_scope.cancel()
    assert ended, "the call is still up"
