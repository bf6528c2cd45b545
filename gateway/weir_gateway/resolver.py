"""Backends named by DNS (`dns:///name:port`, e.g. a Kubernetes headless service): parsing the name and resolving
it to the servers' addresses, with the resolver a plain function so tests can stand in for DNS."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable

# (host, port) -> every "ip:port" the name stands for now; raises OSError when the name cannot be resolved.
Resolver = Callable[[str, int], Awaitable[list[str]]]


def dns_target(address: str) -> tuple[str, int] | None:
    """(host, port) of a `dns:[//authority]/host:port` backend, None for any other form; a missing or bad port is a
    ValueError."""
    if not address.startswith("dns:"):
        return None
    rest = address.removeprefix("dns:")
    if rest.startswith("//"):
        rest = rest[2:].partition("/")[2]  # the DNS server's authority is gRPC's business; we use the system's
    host, sep, port = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"backend {address!r}: a dns: backend needs a name and a port (dns:///NAME:PORT)")
    return host, int(port)


def host_port(ip: str, port: int) -> str:
    """`ip:port` as gRPC wants it (IPv6 in brackets)."""
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system's resolver (getaddrinfo) gives for `host`, sorted."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({host_port(str(info[4][0]), port) for info in infos})
