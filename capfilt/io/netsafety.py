"""Refusing URLs that reach loopback, private, link-local or metadata addresses, redirects included.

The check runs when a connection is opened, on the address actually dialled, so a public name
that resolves (or re-resolves, or redirects) to an internal address is refused before any byte is
sent. img2dataset fetches with `urllib.request.urlopen`, which uses the process-wide opener that
`install_safe_opener` replaces; the download stage installs it around each shard with
`safe_urlopen` and puts the old opener back afterwards.

A refused connection raises `UnsafeAddressError`, whose message starts with "blocked: ", e.g.
"blocked: loopback address 127.0.0.1" or "blocked: private address 10.0.0.5 (resolved from
cdn.example.com)"; `blocked_reason` finds it in the text urllib wraps it in.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import re
import socket
import ssl
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Literal

Policy = Literal["public", "allow_loopback", "allow_private"]
POLICIES: tuple[str, ...] = ("public", "allow_loopback", "allow_private")

BLOCKED = "blocked"


class UnsafeAddressError(OSError):
    """Raised instead of connecting to an address the policy forbids."""


def address_problem(ip: str, policy: Policy) -> str | None:
    """What kind of address `ip` is, if `policy` forbids dialling it ("loopback address", ...);
    None if it may be dialled."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback:
        return None if policy in ("allow_loopback", "allow_private") else "loopback address"
    if addr.is_link_local:  # 169.254.0.0/16 holds the cloud metadata service (169.254.169.254)
        return "link-local or cloud metadata address"
    if addr.is_unspecified or addr.is_multicast or addr.is_reserved:
        return "reserved address"
    if addr.is_private or not addr.is_global:
        return None if policy == "allow_private" else "private address"
    return None


def blocked_message(host: str, ip: str, problem: str) -> str:
    """The message of a refused connection: "blocked: <problem> <ip>[ (resolved from <host>)]"."""
    bare_host = host.strip("[]")
    via = "" if bare_host == ip else f" (resolved from {host})"
    return f"{BLOCKED}: {problem} {ip}{via}"


PROBLEMS: tuple[str, ...] = (
    "loopback address",
    "link-local or cloud metadata address",
    "reserved address",
    "private address",
)
# Only our own message, alone or as urllib wraps it: a server's reason phrase cannot pass for one.
_BLOCKED = rf"({BLOCKED}: ({'|'.join(PROBLEMS)}) ([0-9A-Fa-f:.%\w]+)(?: \(resolved from [^()<>\s]+\))?)"
_BLOCKED_IN_TEXT = re.compile(rf"{_BLOCKED}|<urlopen error {_BLOCKED}>")


def blocked_reason(text: str | None) -> str | None:
    """The "blocked: ..." message inside an error text (urllib wraps it as "<urlopen error ...>"),
    or None if the text is about something else."""
    m = _BLOCKED_IN_TEXT.fullmatch(text or "")
    return (m.group(1) or m.group(4)) if m else None


def blocked_kind(reason: str) -> str:
    """A blocked reason without its address, for counting: "blocked: loopback address"."""
    m = _BLOCKED_IN_TEXT.fullmatch(reason)
    return f"{BLOCKED}: {m.group(2) or m.group(5)}" if m else reason


# ---------------------------------------------------------------------------------------------
# Test-only name overrides. Tests stand up servers on 127.0.0.1 but need some of them to look
# public (a CDN that redirects to an internal address). `resolve_as` maps a hostname to the
# address the policy sees and the address actually dialled, in this process only, for the
# duration of a `with` block. Nothing else sets it: it is empty in every real run, and it is
# not read from the environment or from any config.
# ---------------------------------------------------------------------------------------------

_TEST_ROUTES: dict[str, tuple[str, str]] = {}


@contextlib.contextmanager
def resolve_as(routes: Mapping[str, tuple[str, str]]) -> Iterator[None]:
    """For tests: `{hostname: (address the policy checks, address dialled)}` while in the block."""
    saved = dict(_TEST_ROUTES)
    _TEST_ROUTES.update(routes)
    try:
        yield
    finally:
        _TEST_ROUTES.clear()
        _TEST_ROUTES.update(saved)


def _vetted_connection(host: str, port: int, timeout: float | None, policy: Policy) -> socket.socket:
    last_err: OSError | None = None
    seen_as, dial = _TEST_ROUTES.get(host, (None, host))
    infos = socket.getaddrinfo(dial, port, type=socket.SOCK_STREAM)
    for family, socktype, proto, _, sockaddr in infos:
        ip = seen_as or str(sockaddr[0])
        problem = address_problem(ip, policy)
        if problem:
            raise UnsafeAddressError(blocked_message(host, ip, problem))
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
    """An opener whose every connection (redirects too) is vetted against `policy`.

    It speaks http and https only: urllib's ftp, file and data handlers are left out, so a
    redirect to ftp://10.0.0.1/ or file:///etc/passwd fails as an unknown url type instead of
    dialling past the check. Proxies are not used either: a proxy would dial on our behalf."""
    if policy not in POLICIES:
        raise ValueError(f"unknown url policy {policy!r}; use one of {', '.join(POLICIES)}")
    http_cls, https_cls = _connection_classes(policy)

    class SafeHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):  # type: ignore[no-untyped-def]
            return self.do_open(http_cls, req)

    class SafeHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):  # type: ignore[no-untyped-def]
            return self.do_open(https_cls, req, context=getattr(self, "_context", None))

    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler({}),
        urllib.request.UnknownHandler(),
        SafeHTTPHandler(),
        SafeHTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def install_safe_opener(policy: Policy = "public") -> None:
    """Make `urllib.request.urlopen` in this process vet every address against `policy`."""
    urllib.request.install_opener(safe_opener(policy))


@contextlib.contextmanager
def safe_urlopen(policy: Policy = "public") -> Iterator[None]:
    """`urllib.request.urlopen` vets every address against `policy` inside the block (every
    thread of this process), and behaves as before after it."""
    previous = getattr(urllib.request, "_opener", None)
    install_safe_opener(policy)
    try:
        yield
    finally:
        # urllib keeps the installed opener in a module global; None means "build the default".
        urllib.request._opener = previous  # type: ignore[attr-defined]
