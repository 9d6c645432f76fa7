"""URL safety: internal addresses are refused before any connection, redirects included."""

from __future__ import annotations

import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from capfilt.netsafety import UnsafeAddressError, address_problem, safe_opener


class _Handler(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        _Handler.hits.append(self.path)
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", "http://" + self.path.removeprefix("/redirect/"))
            self.end_headers()
            return
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Handler.hits = []
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.mark.parametrize(
    "ip, policy, refused",
    [
        ("127.0.0.1", "public", True),
        ("::1", "public", True),
        ("127.0.0.1", "allow_loopback", False),
        ("10.1.2.3", "allow_loopback", True),
        ("192.168.0.7", "public", True),
        ("172.16.5.5", "public", True),
        ("169.254.169.254", "allow_private", True),  # cloud metadata: never
        ("fe80::1", "allow_private", True),
        ("::ffff:127.0.0.1", "public", True),  # IPv4-mapped loopback
        ("0.0.0.0", "allow_private", True),
        ("10.1.2.3", "allow_private", False),
        ("93.184.216.34", "public", False),
        ("2606:4700::1111", "public", False),
    ],
)
def test_address_policy(ip, policy, refused):
    assert (address_problem(ip, policy) is not None) == refused


def test_loopback_is_refused_without_a_request_reaching_the_server(server):
    with pytest.raises(urllib.error.URLError) as err:
        safe_opener("public").open(server + "/img.jpg", timeout=5)
    assert isinstance(err.value.reason, UnsafeAddressError)
    assert "loopback" in str(err.value.reason)
    assert _Handler.hits == [], "the unsafe URL was fetched"


def test_loopback_allowed_by_the_flag(server):
    with safe_opener("allow_loopback").open(server + "/img.jpg", timeout=5) as r:
        assert r.read() == b"ok"
    assert _Handler.hits == ["/img.jpg"]


@pytest.mark.parametrize("target", ["169.254.169.254/latest/meta-data/", "10.0.0.1/internal"])
def test_a_redirect_to_an_internal_address_is_refused_before_connecting(server, target):
    with pytest.raises(urllib.error.URLError) as err:
        safe_opener("allow_loopback").open(f"{server}/redirect/{target}", timeout=5)
    assert isinstance(err.value.reason, UnsafeAddressError)
    assert _Handler.hits == [f"/redirect/{target}"]  # only the first hop was served
