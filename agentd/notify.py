"""systemd's notify protocol: READY, WATCHDOG, STOPPING and STATUS datagrams.

When systemd runs agentd as ``Type=notify`` it sets ``NOTIFY_SOCKET`` to a
unix datagram socket (a path, or ``@name`` in the abstract namespace) and,
with ``WatchdogSec=``, ``WATCHDOG_USEC``. Each message is one datagram of
``KEY=value`` lines. ``WATCHDOG=1`` must arrive at least every
``WATCHDOG_USEC``; sending it from a task of the Trio loop itself at half that
period means a wedged loop (not just a dead process) gets restarted.

Without ``NOTIFY_SOCKET`` (a shell, a test) every send is a no-op. A send
that fails is logged once and never raised: systemd going away must not end
calls.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping

import trio

__all__ = ["Notifier"]

log = logging.getLogger(__name__)

# How often the STATUS line is refreshed when it changed.
STATUS_INTERVAL_S = 1.0


class Notifier:
    """Sends notify messages to systemd (or to nothing, when not run by it)."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        # "@name" is the abstract namespace: the kernel's name starts with a NUL byte.
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        self.watchdog_s = watchdog_usec / 1e6 if watchdog_usec else None
        self._sock: trio.socket.SocketType | None = None
        self._failed = False
        self._status = ""

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> "Notifier":
        """From systemd's variables (NOTIFY_SOCKET, WATCHDOG_USEC); a no-op notifier without them."""
        watchdog = env.get("WATCHDOG_USEC", "")
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_usec=int(watchdog) if watchdog.isdigit() else None)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    async def send(self, *lines: str) -> None:
        """Send one datagram of ``KEY=value`` lines, e.g. ``send("READY=1", "STATUS=ready")``."""
        if not self.enabled or self._failed:
            return
        try:
            if self._sock is None:
                self._sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            await self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            self._failed = True
            log.warning("systemd notify socket %r failed (%s); no more notify messages", self.address, exc)

    async def run(self, status: Callable[[], str], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep systemd informed until cancelled: WATCHDOG=1 at half the watchdog period
        (when one is set) and STATUS= whenever ``status()`` changes."""
        task_status.started()
        if not self.enabled:
            return
        async with trio.open_nursery() as nursery:
            if self.watchdog_s:
                nursery.start_soon(self._pet_watchdog)
            while True:
                await self.status(status())
                await trio.sleep(STATUS_INTERVAL_S)

    async def status(self, text: str) -> None:
        """STATUS=text, if it differs from the last one sent."""
        if text != self._status:
            self._status = text
            await self.send(f"STATUS={text}")

    async def _pet_watchdog(self) -> None:
        while True:
            await self.send("WATCHDOG=1")
            await trio.sleep(self.watchdog_s / 2)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
