"""Who may read and act: the Host rule, the token, the page's cookie.

- **Host, on every request**: the ``Host`` header must name this machine: a loopback name or
  address, any IP address, this machine's host name (also ``NAME.local``), or a name listed in
  ``web_hosts``. A page from elsewhere whose DNS name is rebound to this machine still sends
  its own name, so it is refused whatever it knows (403).
- **The token** (``web_token``), when one is set, guards reading and acting alike (one token):
  every request but the page's own files (HTML, CSS, script, icon: they hold no data) needs
  ``Authorization: Bearer <token>``, or, for reads only, the cookie ``POST /api/login`` sets
  (images and event streams cannot send a header). The cookie holds an HMAC of the token, never
  the token itself. Actions take only the header.
- **Without a token**, reading is open to whoever reaches the port and actions are taken only
  from a loopback peer that names the server by a loopback host.

Tokens are compared in constant time. :class:`Auth` is swapped whole on SIGHUP (the new token
applies to the next request).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from dataclasses import dataclass, field

from nightstack.address import is_loopback_host

COOKIE = "nightstack"
"""Name of the read cookie set by ``POST /api/login``."""

COOKIE_MAX_AGE_S = 30 * 86400  # a month of nights on one phone without typing the token again


def _host_name(host_header: str) -> str:
    """The name or address part of a ``Host`` header, lower case, without port or brackets."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


def own_names() -> frozenset[str]:
    """This machine's names as a browser may send them: ``hostname`` and ``hostname.local``
    (mDNS, a Pi's usual name on a hotspot). No DNS lookup (none at a dark site): a fully
    qualified name goes in ``web_hosts``."""
    name = socket.gethostname().lower().rstrip(".")
    return frozenset(n for n in (name, name.split(".", 1)[0] + ".local") if n)


@dataclass(frozen=True)
class Auth:
    """The web settings that decide access (see the module docstring).

    Parameters
    ----------
    token : str or None
        ``web_token`` (or its file / credential), None for none.
    hosts : frozenset of str
        Extra host names (``web_hosts``), lower case.
    """

    token: str | None = None
    hosts: frozenset[str] = frozenset()
    names: frozenset[str] = field(default_factory=own_names)

    def host_allowed(self, host_header: str | None) -> bool:
        """Does the ``Host`` header name this machine (see the module docstring)?"""
        if not host_header:
            return False
        if is_loopback_host(host_header):
            return True
        name = _host_name(host_header).rstrip(".")
        return bool(name) and (_is_ip(name) or name in self.names or name in self.hosts)

    def bearer_ok(self, authorization: str | None) -> bool:
        """``Authorization: Bearer <token>`` with the right token (False when none is set)."""
        if not self.token:
            return False
        scheme, _, given = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8", "replace"), self.token.encode()
        )

    def cookie_value(self) -> str:
        """The read cookie's value: HMAC-SHA256 of a fixed label under the token (hex)."""
        assert self.token
        return hmac.new(self.token.encode(), b"nightstack read", hashlib.sha256).hexdigest()

    def may_read(self, authorization: str | None, cookie: str | None) -> bool:
        """Reading: anyone without a token; else the Bearer header or the read cookie."""
        if not self.token:
            return True
        if self.bearer_ok(authorization):
            return True
        return cookie is not None and hmac.compare_digest(
            cookie.encode("utf-8", "replace"), self.cookie_value().encode()
        )
