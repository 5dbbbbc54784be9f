"""Which addresses are loopback: the one rule the server (binding without TLS) and the clients
(sending tokens without TLS) both apply. Import-light: standard library only."""

from __future__ import annotations

import ipaddress
from typing import Sequence

LOCAL_SCHEMES = ("unix:", "unix-abstract:")  # gRPC targets that never leave this machine


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8, ``::1`` (and ``::ffff:127.x.y.z``); a host in [brackets] too."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) is not part of it
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def target_hosts(address: str) -> list[str]:
    """The host(s) a gRPC target connects to: ``HOST:PORT``, ``[V6]:PORT``, ``HOST``, ``dns:[//AUTH/]HOST:PORT``,
    ``ipv4:A:P,B:P``, ``ipv6:[V6]:P,...``; ``[]`` for a unix socket (local by nature)."""
    target = address.strip()
    lower = target.lower()
    if lower.startswith(LOCAL_SCHEMES):
        return []
    if lower.startswith("dns:"):
        target = target[4:]
        if target.startswith("//"):  # dns://AUTHORITY/HOST:PORT: the authority is the DNS server
            target = target[2:].partition("/")[2]
    elif lower.startswith(("ipv4:", "ipv6:")):
        target = target[5:]
    hosts = []
    for part in target.split(",") if lower.startswith(("ipv4:", "ipv6:")) else [target]:
        part = part.strip()
        if part.startswith("["):
            host = part[1:part.find("]")] if "]" in part else part
        elif part.count(":") == 1:
            host = part.rsplit(":", 1)[0]
        else:  # no port, or a bare IPv6 address
            host = part
        hosts.append(host)
    return hosts


def is_loopback_target(address: str) -> bool:
    """Whether every host the gRPC target ``address`` names is loopback (or it is a unix socket)."""
    return all(is_loopback(host) for host in target_hosts(address))


def _user_error(message: str) -> Exception:
    from dlheir.errors import UserError

    return UserError(message)


def parse_addresses(address: str | Sequence[str]) -> list[str]:
    """The cloud server addresses in ``address``: one ``HOST:PORT``, several comma-separated
    (``"h1:p1,h2:p2"``) or a list. A gRPC ``ipv4:``/``ipv6:`` target stays one address (gRPC
    balances it itself). An empty element or a name given twice is a one-line UserError."""
    if isinstance(address, str):
        text = address.strip()
        parts = [text] if text.lower().startswith(("ipv4:", "ipv6:")) else text.split(",")
    else:
        parts = [str(a) for a in address]
    parts = [a.strip() for a in parts]
    shown = address if isinstance(address, str) else ",".join(parts)
    if not parts or parts == [""]:
        raise _user_error("no cloud server address given: give HOST:PORT, or several as HOST:PORT,HOST:PORT")
    for n, part in enumerate(parts, 1):
        if not part:
            raise _user_error(f"cloud server addresses {shown!r}: element {n} is empty (give HOST:PORT,HOST:PORT)")
        if parts.index(part) != n - 1:
            raise _user_error(f"cloud server addresses {shown!r}: {part} is given twice")
        if len(parts) > 1 and not _has_port(part):
            raise _user_error(f"cloud server addresses {shown!r}: {part!r} is not HOST:PORT")
    return parts


def _has_port(address: str) -> bool:
    if "/" in address or address.lower().startswith(("unix:", "unix-abstract:", "dns:")):
        return True  # a gRPC target URI: gRPC checks it
    host, sep, port = address.rpartition(":")
    if not sep or not host or (":" in host and not host.endswith("]")):
        return False  # no port, or a bare IPv6 address
    return port.isdigit() and 0 < int(port) < 65536
