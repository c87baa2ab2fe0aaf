"""``HOST:PORT`` of the web server, and which peers and host names are this machine (shared by
the settings' validation and the web server)."""

from __future__ import annotations

import ipaddress

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
"""Host names that always mean this machine (``/etc/hosts`` on Debian)."""


def parse_listen(value: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:8080"`` for IPv6) -> (host, port). Port 0: any free port.

    Raises ValueError with a one-line reason for anything else.
    """
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:8080, not {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets ([::1]:8080), not {value!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0-65535, not {port}")
    if not host or any(ch.isspace() or ch in "/[]" for ch in host):
        raise ValueError(f"bad host in {value!r}")
    return host, port


def is_loopback_ip(address: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (``::ffff:127.0.0.1``)."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def is_loopback_host(host_header: str | None) -> bool:
    """Does an HTTP ``Host`` header (``name[:port]``) name this machine by a loopback name or
    address? (A page from elsewhere that rebinds its DNS name to 127.0.0.1 still sends its own
    name, so this refuses DNS-rebinding attacks on the token-less loopback actions.)"""
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host in LOOPBACK_NAMES or is_loopback_ip(host)
