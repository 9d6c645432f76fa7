"""Refusing URLs that reach loopback, private, link-local or metadata addresses, redirects included.

The check runs when a connection is opened, on the address actually dialled, so a public name
that resolves (or re-resolves, or redirects) to an internal address is refused before any byte is
sent. img2dataset fetches with `urllib.request.urlopen`, which uses the process-wide opener that
`install_safe_opener` replaces.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import urllib.request
from typing import Literal

Policy = Literal["public", "allow_loopback", "allow_private"]
POLICIES: tuple[str, ...] = ("public", "allow_loopback", "allow_private")


class UnsafeAddressError(OSError):
    """Raised instead of connecting to an address the policy forbids."""


def address_problem(ip: str, policy: Policy) -> str | None:
    """Why `ip` may not be dialled under `policy`, or None if it may."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback:
        return None if policy in ("allow_loopback", "allow_private") else "a loopback address"
    if addr.is_link_local:  # 169.254.0.0/16 holds the cloud metadata service (169.254.169.254)
        return "a link-local or cloud metadata address"
    if addr.is_unspecified or addr.is_multicast or addr.is_reserved:
        return "a reserved address"
    if addr.is_private or not addr.is_global:
        return None if policy == "allow_private" else "a private address"
    return None


def _vetted_connection(host: str, port: int, timeout: float | None, policy: Policy) -> socket.socket:
    last_err: OSError | None = None
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for family, socktype, proto, _, sockaddr in infos:
        ip = str(sockaddr[0])
        problem = address_problem(ip, policy)
        if problem:
            raise UnsafeAddressError(f"refused: {host} resolves to {problem} ({ip})")
        sock = socket.socket(family, socktype, proto)
        try:
            if timeout is not None:
                sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            last_err = err
    raise last_err or OSError(f"could not connect to {host}:{port}")


def _connection_classes(policy: Policy) -> tuple[type, type]:
    class SafeHTTPConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = _vetted_connection(self.host, self.port, self.timeout, policy)

    class SafeHTTPSConnection(http.client.HTTPSConnection):
        def connect(self) -> None:
            sock = _vetted_connection(self.host, self.port, self.timeout, policy)
            ctx = getattr(self, "_context", None) or ssl.create_default_context()
            self.sock = ctx.wrap_socket(sock, server_hostname=self.host)

    return SafeHTTPConnection, SafeHTTPSConnection


def safe_opener(policy: Policy = "public") -> urllib.request.OpenerDirector:
    """An opener whose every connection (redirects too) is vetted against `policy`. Proxies are
    not used: a proxy would dial on our behalf, past the check."""
    http_cls, https_cls = _connection_classes(policy)

    class SafeHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):  # type: ignore[no-untyped-def]
            return self.do_open(http_cls, req)

    class SafeHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):  # type: ignore[no-untyped-def]
            return self.do_open(https_cls, req)

    return urllib.request.build_opener(urllib.request.ProxyHandler({}), SafeHTTPHandler, SafeHTTPSHandler)


def install_safe_opener(policy: Policy = "public") -> None:
    """Make `urllib.request.urlopen` in this process vet every address against `policy`."""
    urllib.request.install_opener(safe_opener(policy))
