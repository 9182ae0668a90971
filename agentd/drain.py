"""Signals: drain on SIGTERM/SIGINT, end every call on a second one, reload on SIGHUP.

Theory of operation
-------------------
A deploy must not cut a caller off mid-sentence. The first SIGTERM or SIGINT
starts a *drain*:

1. ``server.draining`` turns True: the front door answers new upgrades 503,
   ``/readyz`` turns 503, systemd hears ``STOPPING=1``.
2. Calls in progress go on, untouched (a call cannot tell), until they end or
   ``server.drain_timeout_s`` passes.
3. Each call still up then gets ``Call.wind_down("drain timeout")``: it hears
   its business's goodbye line and ends cleanly; one that is still up
   ``GOODBYE_GRACE_S`` later is ended at once.
4. When no call is left, ``run_until_drained`` returns and ``serve`` exits 0.

A second SIGTERM or SIGINT during the drain ends every call at once
(``Call.end_now("shutdown")``); each still writes its record. SIGHUP asks the
server to reload its configuration (``Server.reload``) and never stops it.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

import trio

__all__ = ["GOODBYE_GRACE_S", "LiveCalls", "drain", "run_until_drained"]

log = logging.getLogger(__name__)

# After wind_down, the goodbye line's length plus Twilio's playout; a call still up then is cut.
GOODBYE_GRACE_S = 30.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Endable(Protocol):
    """What the drain asks of a live call."""

    def wind_down(self, reason: str) -> None: ...

    def end_now(self, reason: str) -> None: ...


class LiveCalls:
    """The calls up now; ``wait_empty`` wakes when the last one leaves."""

    def __init__(self) -> None:
        self._calls: set[Endable] = set()
        self._lot = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._calls)

    def __iter__(self) -> Iterator[Endable]:
        return iter(list(self._calls))  # a snapshot: ending a call removes it

    def add(self, call: Endable) -> None:
        self._calls.add(call)

    def discard(self, call: Endable) -> None:
        self._calls.discard(call)
        self._lot.unpark_all()

    async def wait_empty(self) -> None:
        """Return once no call is left."""
        while self._calls:
            await self._lot.park()

    def end_all(self, reason: str) -> None:
        """``end_now(reason)`` on every call up now."""
        for call in self:
            call.end_now(reason)


class Drainable(Protocol):
    """What the drain needs of the server."""

    draining: bool
    calls: LiveCalls


async def drain(server: Drainable, timeout_s: float, on_start: Callable[[], Awaitable[None]]) -> None:
    """Take no new calls, let those up now finish (see the module docstring); return when none is left."""
    server.draining = True
    log.info("draining: %d calls in progress, no new calls; they have %gs (server.drain_timeout_s)",
             len(server.calls), timeout_s)
    await on_start()
    started = trio.current_time()
    with trio.move_on_after(timeout_s):
        await server.calls.wait_empty()
    if len(server.calls):
        log.warning("drain timeout: %d calls still up hear their goodbye and end", len(server.calls))
        for call in server.calls:
            call.wind_down("drain timeout")
        with trio.move_on_after(GOODBYE_GRACE_S):
            await server.calls.wait_empty()
        server.calls.end_all("shutdown")
        await server.calls.wait_empty()
    log.info("drained in %.1fs; exiting", trio.current_time() - started)


async def run_until_drained(server: Drainable, timeout_s: float, *,
                            on_drain: Callable[[], Awaitable[None]],
                            reload: Callable[[], Awaitable[None]],
                            task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Handle SIGTERM, SIGINT and SIGHUP until a drain has finished.

    Must run in the main thread (Python delivers signals only there).
    ``on_drain`` runs as the drain begins (systemd's STOPPING=1); ``reload``
    on each SIGHUP, in its own task (it serializes itself), so a stop signal
    is never kept waiting by a slow reload.
    """
    with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as signals:
        task_status.started()
        async with trio.open_nursery() as nursery:
            async def drain_then_stop() -> None:
                await drain(server, timeout_s, on_drain)
                nursery.cancel_scope.cancel()

            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: reloading the configuration")
                    nursery.start_soon(reload)
                elif not server.draining:
                    log.info("%s: draining", signal.Signals(signum).name)
                    nursery.start_soon(drain_then_stop)
                else:
                    log.warning("%s again: ending %d calls now", signal.Signals(signum).name, len(server.calls))
                    server.calls.end_all("shutdown")
