"""URL safety: internal addresses are refused before any connection, redirects included."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.core import schema as S
from capfilt.io.netsafety import (
    UnsafeAddressError,
    address_problem,
    blocked_kind,
    blocked_reason,
    resolve_as,
    safe_opener,
    safe_urlopen,
)
from capfilt.io.urllist import read_url_list
from capfilt.stages.download import DownloadConfig, download_shard, read_samples, run_download, screen_rows


class _Handler(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        _Handler.hits.append(self.path)
        if self.path.startswith(("/redirect/", "/goto/")):
            self.send_response(302)
            if self.path.startswith("/goto/"):  # any Location, e.g. another scheme
                self.send_header("Location", unquote(self.path.removeprefix("/goto/")))
            else:
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


@pytest.mark.parametrize("target", ["ftp%3A//127.0.0.1/x", "file%3A///etc/passwd", "data%3A,hello"])
def test_a_redirect_to_another_scheme_is_refused(server, target):
    """urllib's ftp, file and data handlers would reach past the address check."""
    with pytest.raises(urllib.error.URLError) as err:
        safe_opener("allow_loopback").open(f"{server}/goto/{target}", timeout=5)
    assert "not allowed" in str(err.value) or "unknown url type" in str(err.value)
    assert _Handler.hits == [f"/goto/{target}"]


def test_safe_urlopen_applies_inside_the_block_only(server):
    with safe_urlopen("public"), pytest.raises(urllib.error.URLError) as err:
        urllib.request.urlopen(server + "/inside", timeout=5)
    assert blocked_reason(str(err.value)) == "blocked: loopback address 127.0.0.1"
    with urllib.request.urlopen(server + "/after", timeout=5) as r:  # the old opener is back
        assert r.read() == b"ok"
    assert _Handler.hits == ["/after"]


def test_blocked_reasons_are_found_in_urllib_text_and_counted_without_the_address():
    text = "<urlopen error blocked: private address 10.0.0.5 (resolved from cdn.example.com)>"
    reason = blocked_reason(text)
    assert reason == "blocked: private address 10.0.0.5 (resolved from cdn.example.com)"
    assert blocked_kind(reason) == "blocked: private address"
    assert blocked_reason("HTTP Error 404: Not Found") is None
    # A server's own reason phrase cannot pass for one of ours.
    assert blocked_reason("HTTP Error 403: blocked: loopback address 127.0.0.1") is None
    assert blocked_kind("HTTP Error 404: Not Found") == "HTTP Error 404: Not Found"


def test_a_name_that_resolves_to_loopback_is_refused(server):
    port = server.rsplit(":", 1)[1]
    routes = {"rebind.example.com": ("127.0.0.1", "127.0.0.1")}
    with resolve_as(routes), pytest.raises(urllib.error.URLError) as err:
        safe_opener("public").open(f"http://rebind.example.com:{port}/x", timeout=5)
    assert str(err.value.reason) == "blocked: loopback address 127.0.0.1 (resolved from rebind.example.com)"
    assert _Handler.hits == []


# ---------------------------------------------------------------------------------------------
# The download stage: the policy is applied in the worker, before img2dataset fetches.
# ---------------------------------------------------------------------------------------------


def test_default_policy_blocks_every_row_of_the_local_world_without_a_request(
    ray_local, small_world: Path, tmp_path: Path
):
    from capfilt.world import WorldServer, write_url_list

    with WorldServer(small_world) as srv:
        urls = write_url_list(small_world, srv.base_url, tmp_path / "urls.parquet")
        cfg = DownloadConfig(image_size=32, shard_size=100, thread_count=8, timeout=5, source="shapes")
        assert cfg.url_policy == "public"
        summary = run_download(urls, tmp_path / "out", cfg, progress=False)
        assert srv.access_log == [], "a blocked URL reached the server"
    samples = read_samples(tmp_path / "out").to_pylist()
    assert len(samples) == pq.read_table(urls).num_rows == summary.rows_in
    fetched = [r for r in samples if r["status"] != S.DUPLICATE]  # exact repeats are never fetched
    assert fetched and len(fetched) > len(samples) * 0.9
    for r in fetched:
        assert r["status"] == S.FAILED_TO_DOWNLOAD, r["status"]
        assert r["reason"] == "blocked: loopback address 127.0.0.1"
        assert r["image"] is None
    assert summary.status_counts.get(S.SUCCESS, 0) == 0
    assert summary.reason_counts["failed_to_download: blocked: loopback address"] == len(fetched)


def _shard_input(rows: list[tuple[str, str]], path: Path) -> str:
    table = pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]})
    pq.write_table(table, path.with_suffix(".list.parquet"))
    pairs = read_url_list(path.with_suffix(".list.parquet"), source="t")
    status, reason = screen_rows(pairs)
    pairs = pairs.append_column("pre_status", pa.array(status, pa.string()))
    pairs = pairs.append_column("pre_reason", pa.array(reason, pa.string()))
    pq.write_table(pairs, path)
    return str(path)


def test_a_public_name_that_redirects_to_loopback_is_refused(small_world: Path, tmp_path: Path):
    """cdn.example.com looks public to the policy (the test-only resolve_as dials it on 127.0.0.1);
    its redirect to 127.0.0.1 must be refused before the second request."""
    from capfilt.world import WorldServer

    image = "images/web/w000000.jpg"
    with WorldServer(small_world) as srv:
        cdn = f"http://cdn.example.com:{srv.port}"
        rows = [
            (f"{cdn}/{image}", "served by the public-looking host"),
            (f"{cdn}/redirect/host/127.0.0.1:{srv.port}/{image}", "redirects to loopback"),
            (f"{cdn}/redirect/host/169.254.169.254/latest/meta-data/", "redirects to metadata"),
            (f"http://rebind.example.com:{srv.port}/{image}", "a name that resolves to loopback"),
        ]
        cfg = DownloadConfig(image_size=32, thread_count=4, timeout=5, source="t")
        routes = {
            "cdn.example.com": ("93.184.216.34", "127.0.0.1"),
            "rebind.example.com": ("127.0.0.1", "127.0.0.1"),
        }
        with resolve_as(routes):
            download_shard(
                0, _shard_input(rows, tmp_path / "in.parquet"), str(tmp_path / "out"), cfg.model_dump_json()
            )
        log = sorted(path for _, path, _ in srv.access_log)
    out = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert [r["status"] for r in out] == [S.SUCCESS] + [S.FAILED_TO_DOWNLOAD] * 3
    assert [r["reason"] for r in out[1:]] == [
        "blocked: loopback address 127.0.0.1",
        "blocked: link-local or cloud metadata address 169.254.169.254",
        "blocked: loopback address 127.0.0.1 (resolved from rebind.example.com)",
    ]
    # Only the public-looking host was asked: the image itself, and the two first hops.
    assert log == sorted(
        [
            f"/{image}",
            f"/redirect/host/127.0.0.1:{srv.port}/{image}",
            "/redirect/host/169.254.169.254/latest/meta-data/",
        ]
    )


def test_url_policy_is_checked():
    with pytest.raises(ValueError, match="url_policy"):
        DownloadConfig(url_policy="anything")
    with pytest.raises(ValueError, match="unknown url policy"):
        safe_opener("anything")  # type: ignore[arg-type]


def test_cli_download_documents_the_policy_flags_and_refuses_an_unknown_policy(tmp_path: Path):
    from typer.testing import CliRunner

    from capfilt.cli import app

    helptext = CliRunner().invoke(app, ["download", "--help"], terminal_width=200).output
    assert "--url-policy" in helptext and "--allow-loopback" in helptext
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://127.0.0.1:9/1.jpg,x\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["download", "--urls", str(urls), "--out", str(out), "--url-policy", "open"]
    )
    assert result.exit_code == 2 and "url_policy" in result.output
    assert not out.exists()


def test_cli_allow_loopback_reaches_the_local_world(ray_local, served_world, tmp_path: Path):
    from typer.testing import CliRunner

    from capfilt.cli import app

    _, urls, _ = served_world
    few = tmp_path / "few.parquet"
    pq.write_table(pq.read_table(urls).slice(0, 6), few)
    args = ["download", "--urls", str(few), "--image-size", "32", "--thread-count", "4", "--source", "shapes"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "on"), "--allow-loopback"])
    assert result.exit_code == 0, result.output
    assert read_samples(tmp_path / "on").column("status").to_pylist().count(S.SUCCESS) >= 5
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "off")])
    assert result.exit_code == 0, result.output
    assert set(read_samples(tmp_path / "off").column("reason").to_pylist()) == {
        "blocked: loopback address 127.0.0.1"
    }
