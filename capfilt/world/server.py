"""A local HTTP server for a shapes world (images and bad inputs), and the URL list users would have."""

from __future__ import annotations

import csv
import json
import logging
import math
import mimetypes
import posixpath
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

# Special paths, for bad inputs that fail (or succeed the hard way) on the server's side:
#   status/<code>/<any>         answers with that HTTP status (400..599)
#   slow/<seconds>/<path>       waits that long (at most MAX_DELAY_S), then answers for <path>:
#                               a timeout for any downloader whose timeout is shorter
#   redirect/<n>/<path>         302 to redirect/<n-1>/<path>, and redirect/0/<path> to /<path>:
#                               a chain of n + 1 redirects
#   redirect/loop/<any>         302 to itself, forever
#   redirect/host/<host[:port]>/<path>
#                               302 to http://<host[:port]>/<path>: another server, or an
#                               internal address a URL policy must refuse
_STATUS_PREFIX = "status/"
_SLOW_PREFIX = "slow/"
_REDIRECT_PREFIX = "redirect/"
MAX_DELAY_S = 30.0


def _content_type(path: Path, head: bytes) -> str:
    """Sniff the body first, as a web server serving user uploads would not, so that an HTML
    page named .jpg is served as text/html, like a real site's error page at an image URL."""
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html")):
        return "text/html; charset=utf-8"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 makes a downloader with dozens of threads see refused
    # connections on a busy moment: spurious failures of good rows.
    request_queue_size = 256

    def __init__(self, addr: tuple[str, int], root: Path, owner: WorldServer) -> None:
        super().__init__(addr, _Handler)
        self.root = root
        self.owner = owner

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        # A client that hangs up early (a downloader's timeout) is routine here; socketserver
        # would print a traceback to stderr for each one.
        log.debug("error serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "capfilt-world/1"

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

    def _serve(self, body: bool) -> None:
        status, data, ctype, location = self._resolve()
        self.server.owner._record(self.command, self.path, status)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        if location is not None:
            self.send_header("Location", location)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _resolve(self) -> tuple[int, bytes, str, str | None]:
        rel = unquote(urlsplit(self.path).path)
        if not rel.startswith("/"):
            return (*_error(HTTPStatus.BAD_REQUEST), None)
        rel = rel[1:]
        parts = rel.split("/")
        # Refuse rather than normalise: a request with .. or an absolute path is never one of ours.
        if rel.startswith("/") or "\\" in rel or any(p in ("..", ".") for p in parts) or "\x00" in rel:
            return (*_error(HTTPStatus.FORBIDDEN), None)
        if rel.startswith(_SLOW_PREFIX) and len(parts) >= 3:
            try:
                delay = float(parts[1])
            except ValueError:
                delay = math.nan
            if math.isnan(delay):
                return (*_error(HTTPStatus.NOT_FOUND), None)
            # Waits on the server's stop event, so stop() never waits for a slow answer.
            self.server.owner._stopping.wait(min(max(delay, 0.0), MAX_DELAY_S))
            rel, parts = "/".join(parts[2:]), parts[2:]
        if rel.startswith(_REDIRECT_PREFIX) and len(parts) >= 3:
            location = _redirect_target(parts)
            if location is not None:
                return HTTPStatus.FOUND.value, b"", "text/plain; charset=utf-8", location
        return (*self._file(rel, parts), None)

    def _file(self, rel: str, parts: list[str]) -> tuple[int, bytes, str]:
        if rel.startswith(_STATUS_PREFIX) and len(parts) >= 3 and parts[1].isdigit():
            code = int(parts[1])
            if 400 <= code <= 599:
                return _error(HTTPStatus(code))
        root = self.server.root
        path = (root / posixpath.normpath(rel)).resolve() if rel else root
        if not path.is_relative_to(root):  # a symlink leading outside the world
            return _error(HTTPStatus.FORBIDDEN)
        if not path.is_file():
            return _error(HTTPStatus.NOT_FOUND)
        data = path.read_bytes()
        return HTTPStatus.OK, data, _content_type(path, data[:64])


def _redirect_target(parts: list[str]) -> str | None:
    """Location of a redirect/ path (split on "/"), or None if it is not a well-formed one."""
    how, rest = parts[1], quote("/".join(parts[2:]))
    if how == "loop":
        return "/" + quote("/".join(parts))
    if how == "host" and len(parts) >= 4:
        return f"http://{parts[2]}/" + quote("/".join(parts[3:]))
    if how.isdigit():
        n = int(how)
        return f"/{_REDIRECT_PREFIX}{n - 1}/{rest}" if n > 0 else f"/{rest}"
    return None


def _error(status: HTTPStatus) -> tuple[int, bytes, str]:
    return status.value, f"{status.value} {status.phrase}\n".encode(), "text/plain; charset=utf-8"


class WorldServer:
    """Serves a world directory on 127.0.0.1 (ephemeral port by default) from a daemon thread.

    Use as a context manager, or call start() and stop(). `access_log` holds
    (method, request path, status) of every request, in arrival order.
    """

    def __init__(self, world_dir: str | Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = Path(world_dir).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"world directory {self.root} does not exist; make one with `capfilt world make`"
            )
        self.host, self.port = host, port
        self.access_log: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> WorldServer:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _Server((self.host, self.port), self.root, self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="world-server", daemon=True
        )
        self._thread.start()
        log.info("serving %s at %s", self.root, self.base_url)
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd, self._thread = None, None
        log.info("stopped serving %s", self.root)

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running; call start() or use it as a context manager")
        return f"http://{self.host}:{self.port}"

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.access_log.append((method, path, status))

    def __enter__(self) -> WorldServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


URL_LIST_FORMATS = (".parquet", ".csv", ".tsv", ".jsonl")


def write_url_list(world_dir: str | Path, base_url: str, out_path: str | Path) -> Path:
    """Write the world's web rows as a user's URL list (columns url, caption, in web.parquet's
    order) in the format named by `out_path`'s extension."""
    out = Path(out_path)
    ext = out.suffix.lower()
    if ext not in URL_LIST_FORMATS:
        raise ValueError(f"cannot write a URL list as {out.name!r}; name it with one of {URL_LIST_FORMATS}")
    web = pq.read_table(Path(world_dir) / "web.parquet")
    prefix = base_url.rstrip("/") + "/"
    urls = [prefix + p for p in web.column("path").to_pylist()]
    captions = web.column("caption").to_pylist()
    out.parent.mkdir(parents=True, exist_ok=True)
    if ext == ".parquet":
        pq.write_table(pa.table({"url": urls, "caption": captions}), out)
    elif ext == ".jsonl":
        with out.open("w", encoding="utf-8") as f:
            for url, caption in zip(urls, captions, strict=True):
                f.write(json.dumps({"url": url, "caption": caption}, ensure_ascii=False) + "\n")
    else:
        with out.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t" if ext == ".tsv" else ",", lineterminator="\n")
            writer.writerow(["url", "caption"])
            writer.writerows(zip(urls, captions, strict=True))
    return out
