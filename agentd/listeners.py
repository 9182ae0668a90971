"""TCP listeners that several agentd processes can share (SO_REUSEPORT).

One Trio process uses about one core. To use N cores, N ``agentd serve``
processes bind the same host:port with ``SO_REUSEPORT`` set on every socket
(``server.reuse_port = true``); Linux then keeps one accept queue per socket
and hashes each new connection's addresses and ports onto one of them. No
process hands connections to another, and none is special: any of them can
restart while the others take the calls.

The kernel only spreads connections over sockets that are *listening*. A
process that is draining but still listening keeps receiving its share of
new connections, which it could only refuse, so with ``reuse_port`` a drain
closes the Twilio listener (agentd.server): its siblings take every new call
while its own calls go on. Connections already waiting in the closed socket's
queue are reset unless the ``net.ipv4.tcp_migrate_req`` sysctl (Linux 5.14+)
is set, which moves them to a sibling; a load balancer retries a reset
connection on another node (etc/haproxy.cfg).

Linux lets only sockets of the same effective user join one port's group,
so a stray process of another user cannot steal calls.
"""

from __future__ import annotations

import errno
import socket

import trio

__all__ = ["open_shared_tcp_listeners"]

# Linux caps the backlog at net.core.somaxconn; asking for the most lets that sysctl decide.
_BACKLOG = 0xFFFF


async def open_shared_tcp_listeners(port: int, *, host: str) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners(port, host=host)``, with SO_REUSEPORT set before each bind.

    One listener per address ``host`` resolves to; raises OSError as
    ``trio.open_tcp_listeners`` does (a port held by a process that did not set
    SO_REUSEPORT, or by another user, is EADDRINUSE).
    """
    addresses = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[trio.SocketListener] = []
    try:
        for family, type_, proto, _, sockaddr in addresses:
            listeners.append(trio.SocketListener(await _bound_socket(family, type_, proto, sockaddr)))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


async def _bound_socket(family: int, type_: int, proto: int, sockaddr) -> trio.socket.SocketType:
    """A listening socket with SO_REUSEADDR and SO_REUSEPORT, closed again if binding fails."""
    sock = trio.socket.socket(family, type_, proto)
    try:
        # SO_REUSEADDR as trio sets it: a restart may bind while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # "::" must not also take IPv4, which "0.0.0.0" may hold
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind(sockaddr)
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"{exc.strerror} (held by a process without SO_REUSEPORT, "
                                     "or by another user)") from exc
        raise
    except BaseException:
        sock.close()
        raise
    return sock
