"""Loopback ports for servers a test starts and may start again on the same port.

``bind(("127.0.0.1", 0))`` hands out a port from the kernel's ephemeral range, the range every
outgoing connection's local port comes from too: a port picked that way for a broker node's
distribution port or a worker's metrics port, and bound again after a restart, can meanwhile be
the local end of some client connection (a RabbitMQ node then fails to boot with
``dist_port_already_used``). These ports come from below the ephemeral range, which the kernel
never hands out by itself; the choice is random (a CSPRNG, untouched by pytest-randomly's
reseeding) and checked free, so concurrent test runs rarely pick the same one."""
from __future__ import annotations

import secrets
import socket
from pathlib import Path

LOW = 20000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def reusable_port(tries: int = 200) -> int:
    """A free loopback port outside the ephemeral range."""
    high = max(LOW + 1000, _ephemeral_start())
    for _ in range(tries):
        port = LOW + secrets.randbelow(high - LOW)
        if _free(port):
            return port
    raise RuntimeError(f"no free port in {LOW}..{high} after {tries} tries")
