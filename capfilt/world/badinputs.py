"""The bad-input matrix: one URL-list row per way a web row can go wrong, with the status the
download stage must give it, run through the real stage (HTTP server, img2dataset, Ray).

`write_matrix_files` writes the files the rows point at into a folder that `WorldServer` serves;
`matrix_rows` turns `MATRIX` into URL-list rows for a running server; `run_matrix` does both,
downloads the list and checks every row against its expectation and the accounting (every input
uid exactly once in the output). The test suite and `benchmarks/bad_inputs.py` both call it.

Unusual but valid images (alpha, 16-bit, palette, grayscale, CMYK, animated GIF, WebP) must come
out as 8-bit RGB JPEGs; broken ones fail with a reason; caption oddities never stop a row, and the
text comes out exactly as it went in (no truncation at this stage: CapFilt's `pre_caption`
shortens texts to `max_words` when it reads them).
"""

from __future__ import annotations

import io
import random
import re
import socket
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, features

SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"
FAILED_TO_RESIZE = "failed_to_resize"
DUPLICATE = "duplicate"
INVALID_INPUT = "invalid_input"

SOURCE = "badinputs"
SIDE = 80  # the valid images are SIDE x SIDE
SLOW_S = 3.0  # the slow endpoint's delay; the matrix downloads with a shorter timeout
LONG_CAPTION_CHARS = 10_000
OK_CAPTION = "a red circle above a blue square"


@dataclass(frozen=True)
class BadInput:
    """One row of the matrix. `url` is a template: {base} is the server's base URL and {closed}
    a base URL on which nothing listens. `reason` is a regular expression the row's reason must
    match (case-insensitive), None when the row must have no reason. `file` names the served
    file a successful row must look like."""

    kind: str
    url: str | None
    caption: str | None
    expect: str
    reason: str | None = None
    file: str | None = None


def _long_caption() -> str:
    phrase = "a red circle left of a small blue square on a green triangle, "
    return (phrase * (LONG_CAPTION_CHARS // len(phrase) + 1))[:LONG_CAPTION_CHARS]


MATRIX: tuple[BadInput, ...] = (
    # A plain good row first: later rows repeat its URL or its whole row.
    BadInput("ok_jpeg", "{base}/ok.jpg", OK_CAPTION, SUCCESS, file="ok.jpg"),
    # Server-side failures.
    BadInput("http_404", "{base}/missing.jpg", "a missing image", FAILED_TO_DOWNLOAD, r"\b404\b"),
    BadInput("http_500", "{base}/status/500/x.jpg", "a server error", FAILED_TO_DOWNLOAD, r"\b500\b"),
    BadInput("timeout", f"{{base}}/slow/{SLOW_S:g}/ok.jpg", "a slow server", FAILED_TO_DOWNLOAD, "timed out"),
    BadInput("connection_refused", "{closed}/ok.jpg", "nobody listens", FAILED_TO_DOWNLOAD, "refused"),
    BadInput("redirect_chain", "{base}/redirect/3/ok.jpg", "four redirects", SUCCESS, file="ok.jpg"),
    BadInput(
        "redirect_loop", "{base}/redirect/loop/x.jpg", "a redirect loop", FAILED_TO_DOWNLOAD, "redirect"
    ),
    BadInput(
        "redirect_too_many", "{base}/redirect/15/ok.jpg", "16 redirects", FAILED_TO_DOWNLOAD, "redirect"
    ),
    BadInput(
        "redirect_to_metadata",
        "{base}/redirect/host/169.254.169.254/latest/meta-data/",
        "a redirect to the cloud metadata service",
        FAILED_TO_DOWNLOAD,
        r"^blocked: link-local or cloud metadata address 169\.254\.169\.254$",
    ),
    # Bodies that are not images, or not whole ones.
    BadInput("html_body", "{base}/page.jpg", "an error page", FAILED_TO_RESIZE, "not a recognised image"),
    BadInput("empty_body", "{base}/empty.jpg", "nothing at all", FAILED_TO_RESIZE, "empty image body"),
    BadInput(
        "truncated_jpeg_header",
        "{base}/truncated_header.jpg",
        "cut in its headers",
        FAILED_TO_RESIZE,
        "not a recognised image|decoding error|truncated jpeg",
    ),
    BadInput(
        "truncated_jpeg_scan",
        "{base}/truncated_scan.jpg",
        "cut in its pixels",
        FAILED_TO_RESIZE,
        "truncated jpeg",
    ),
    BadInput(
        "corrupt_jpeg", "{base}/corrupt.jpg", "random bytes", FAILED_TO_RESIZE, "not a recognised image"
    ),
    BadInput("tiny_1x1", "{base}/tiny.png", "one pixel", FAILED_TO_RESIZE, "too small"),
    BadInput(
        "aspect_ratio", "{base}/banner.png", "a thin banner", FAILED_TO_RESIZE, "aspect ratio too large"
    ),
    BadInput("bomb_png", "{base}/bomb.png", "declares 10000x10000", FAILED_TO_RESIZE, "area too large"),
    BadInput(
        "bomb_png_huge", "{base}/bomb_huge.png", "declares 100000x100000", FAILED_TO_RESIZE, "area too large"
    ),
    # Valid but unusual images: must come out as RGB.
    BadInput("png_alpha", "{base}/alpha.png", "half transparent", SUCCESS, file="alpha.png"),
    BadInput("png_16bit_rgb", "{base}/rgb16.png", "48-bit colour", SUCCESS, file="rgb16.png"),
    BadInput("png_16bit_gray", "{base}/gray16.png", "16-bit grey", SUCCESS, file="gray16.png"),
    BadInput("png_palette", "{base}/palette.png", "a palette image", SUCCESS, file="palette.png"),
    BadInput("png_grayscale", "{base}/gray.png", "an 8-bit grey image", SUCCESS, file="gray.png"),
    BadInput("jpeg_cmyk", "{base}/cmyk.jpg", "a print-ready CMYK JPEG", SUCCESS, file="cmyk.jpg"),
    BadInput("jpeg_grayscale", "{base}/gray.jpg", "a grey JPEG", SUCCESS, file="gray.jpg"),
    BadInput("gif_animated", "{base}/animated.gif", "two frames", SUCCESS, file="animated.gif"),
    BadInput("webp", "{base}/image.webp", "a WebP image", SUCCESS, file="image.webp"),
    # URLs that are not fetchable at all.
    BadInput("url_empty", "", "no url", INVALID_INPUT, "url is empty"),
    BadInput("url_null", None, "a null url", INVALID_INPUT, "url is empty"),
    BadInput("url_no_scheme", "ok.jpg", "a bare path", INVALID_INPUT, "no scheme"),
    BadInput("url_ftp", "ftp://127.0.0.1/ok.jpg", "ftp", INVALID_INPUT, "'ftp'"),
    BadInput("url_file", "file:///etc/passwd", "a local file", INVALID_INPUT, "'file'"),
    BadInput(
        "url_control_char", "{base}/o\x07k.jpg", "a bell in the url", FAILED_TO_DOWNLOAD, "control char"
    ),
    # Captions: the image is fine, the text is odd; the text must come out unchanged.
    BadInput("caption_empty", "{base}/ok.jpg", "", SUCCESS, file="ok.jpg"),
    # A missing caption is an empty caption, so this row repeats the one above exactly.
    BadInput("caption_null", "{base}/ok.jpg", None, DUPLICATE, "same url and text"),
    BadInput("caption_whitespace", "{base}/ok.jpg", " \t\n  ", SUCCESS, file="ok.jpg"),
    BadInput("caption_10k_chars", "{base}/ok.jpg", _long_caption(), SUCCESS, file="ok.jpg"),
    BadInput(
        "caption_control_chars",
        "{base}/ok.jpg",
        "a red\x00 circle\x07 \x1b[31mred\x1b[0m\r",
        SUCCESS,
        file="ok.jpg",
    ),
    BadInput("caption_emoji", "{base}/ok.jpg", "a 🔴 circle above a 🟦 square 👍🏽", SUCCESS, file="ok.jpg"),
    BadInput("caption_rtl", "{base}/ok.jpg", "دائرة حمراء فوق مربع أزرق \u202eשלום", SUCCESS, file="ok.jpg"),
    # Repeats: the same URL with another text is fetched; the same URL and text is not.
    BadInput("duplicate_url", "{base}/ok.jpg", "another caption for the same image", SUCCESS, file="ok.jpg"),
    BadInput("duplicate_row", "{base}/ok.jpg", OK_CAPTION, DUPLICATE, "same url and text"),
    # Rows whose fields hold the uid's field separator: ("P\x1fa", "b") and ("P", "a\x1fb") must
    # not share a uid.
    BadInput("uid_separator_url", "{base}/ok.jpg\x1fa", "b", FAILED_TO_DOWNLOAD, "control char"),
    BadInput("uid_separator_text", "{base}/ok.jpg", "a\x1fb", SUCCESS, file="ok.jpg"),
)
KINDS: tuple[str, ...] = tuple(m.kind for m in MATRIX)


# ---------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _png(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG with the given header and `raw` (filtered scanlines) as its only image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def _bomb_png(side: int) -> bytes:
    """A PNG of a few hundred bytes declaring a side x side 1-bit canvas, with one row of data."""
    return _png(side, side, 1, 0, b"\x00" + b"\x00" * ((side + 7) // 8))


def _base() -> np.ndarray:
    """SIDE x SIDE x 3 uint8: red rises left to right, green top to bottom, blue constant."""
    ramp = np.linspace(0, 255, SIDE)
    img = np.empty((SIDE, SIDE, 3), np.float64)
    img[..., 0] = ramp[None, :]
    img[..., 1] = ramp[:, None]
    img[..., 2] = 96
    return np.rint(img).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def matrix_files() -> dict[str, bytes]:
    """Every file the matrix's URLs name, by name."""
    base = _base()
    rgb = Image.fromarray(base, "RGB")
    ok = _encode(rgb, "JPEG", quality=95)
    sos = ok.index(b"\xff\xda")
    alpha = np.concatenate([base, np.full((SIDE, SIDE, 1), 255, np.uint8)], axis=2)
    alpha[:, SIDE // 2 :, :3] = 0  # black under the transparent half: it must come out white
    alpha[:, SIDE // 2 :, 3] = 0
    wide = (base.astype(np.uint16) * 257).astype(">u2")  # PNG samples are big-endian
    rows16 = b"".join(b"\x00" + wide[y].tobytes() for y in range(SIDE))
    gray16 = (base[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    frames = [rgb.convert("P"), rgb.rotate(90).convert("P")]
    files = {
        "ok.jpg": ok,
        "page.jpg": b"<!DOCTYPE html>\n<html><head><title>404</title></head><body>gone</body></html>\n",
        "empty.jpg": b"",
        "truncated_header.jpg": ok[: sos // 2],
        "truncated_scan.jpg": ok[: sos + (len(ok) - sos) // 2],
        "corrupt.jpg": b"\x00" + random.Random("capfilt-bad-inputs").randbytes(4095),
        "tiny.png": _encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"),
        "banner.png": _encode(Image.new("RGB", (400, 20), (200, 30, 30)), "PNG"),
        "bomb.png": _bomb_png(10_000),
        "bomb_huge.png": _bomb_png(100_000),
        "alpha.png": _encode(Image.fromarray(alpha, "RGBA"), "PNG"),
        "rgb16.png": _png(SIDE, SIDE, 16, 2, rows16),
        "gray16.png": _encode(Image.fromarray(gray16), "PNG"),
        "palette.png": _encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"),
        "gray.png": _encode(rgb.convert("L"), "PNG"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "gray.jpg": _encode(rgb.convert("L"), "JPEG", quality=95),
        "animated.gif": _encode(
            frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0
        ),
    }
    if features.check("webp"):
        files["image.webp"] = _encode(rgb, "WEBP", quality=95)
    return files


def write_matrix_files(out_dir: str | Path) -> Path:
    """Write the matrix's files into `out_dir` (made if missing), ready for `WorldServer(out_dir)`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in matrix_files().items():
        (out / name).write_bytes(data)
    return out


def matrix_kinds() -> tuple[BadInput, ...]:
    """The matrix rows this Pillow can make (WebP needs Pillow built with libwebp)."""
    return tuple(m for m in MATRIX if m.kind != "webp" or features.check("webp"))


def closed_base_url() -> str:
    """http://127.0.0.1:<port> with nothing listening on the port (it was free a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def matrix_rows(base_url: str, closed_url: str | None = None) -> list[tuple[BadInput, str | None]]:
    """(spec, concrete url) per matrix row, for a server at `base_url`."""
    closed = closed_url or closed_base_url()
    return [
        (m, None if m.url is None else m.url.format(base=base_url.rstrip("/"), closed=closed))
        for m in matrix_kinds()
    ]


def write_matrix_list(rows: list[tuple[BadInput, str | None]], path: str | Path) -> Path:
    """The rows as a URL list (columns url, caption; a `kind` column for people reading it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "url": pa.array([url for _, url in rows], pa.string()),
            "caption": pa.array([m.caption for m, _ in rows], pa.string()),
            "kind": pa.array([m.kind for m, _ in rows], pa.string()),
        }
    )
    pq.write_table(table, path)
    return path


# ---------------------------------------------------------------------------------------------
# Running it.
# ---------------------------------------------------------------------------------------------


@dataclass
class RowResult:
    kind: str
    expect: str
    expect_reason: str | None
    uid: str
    text_in: str
    status: str | None = None  # None: the row is missing from the output
    reason: str | None = None
    text_out: str | None = None
    image: bytes | None = None
    file: str | None = None

    def problems(self) -> list[str]:
        """What differs from the expectation (status, reason, text); empty when the row is right."""
        out = []
        if self.status != self.expect:
            out.append(f"status {self.status!r}, expected {self.expect!r} (reason {self.reason!r})")
        if self.expect_reason is None:
            if self.reason is not None:
                out.append(f"reason {self.reason!r}, expected none")
        elif not re.search(self.expect_reason, self.reason or "", re.IGNORECASE):
            out.append(f"reason {self.reason!r} does not match {self.expect_reason!r}")
        if self.status is not None and self.text_out != self.text_in:
            out.append("text changed on the way")
        return out


@dataclass
class MatrixResult:
    rows: list[RowResult]
    rows_in: int
    rows_out: int
    rows_lost: int  # input uids missing from the output
    rows_duplicated: int  # output rows beyond one per input uid, or with a uid not in the input
    status_counts: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    def by_kind(self) -> dict[str, RowResult]:
        return {r.kind: r for r in self.rows}

    def report(self) -> dict[str, Any]:
        """The numbers a reliability report records."""
        return {
            "kinds_tried": [r.kind for r in self.rows],
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_lost": self.rows_lost,
            "rows_duplicated": self.rows_duplicated,
            "status_by_kind": {r.kind: r.status for r in self.rows},
            "reason_by_kind": {r.kind: r.reason for r in self.rows},
            "kinds_not_as_expected": {r.kind: r.problems() for r in self.rows if r.problems()},
            "status_counts": self.status_counts,
            "wall_s": round(self.wall_s, 2),
        }


def run_matrix(
    work_dir: str | Path,
    *,
    timeout: float = 1.0,
    shard_size: int = 8,
    image_size: int = 64,
    ray_address: str | None = None,
) -> MatrixResult:
    """Serve the matrix on 127.0.0.1, download it with the real stage (policy allow_loopback,
    so the local server is reachable and the metadata address still is not), and compare."""
    import time

    from capfilt.io.urllist import read_url_list
    from capfilt.stages.download import DownloadConfig, read_samples, run_download
    from capfilt.world.server import WorldServer

    if timeout >= SLOW_S:
        raise ValueError(f"timeout {timeout} s must be shorter than the slow endpoint's {SLOW_S} s")
    work = Path(work_dir)
    files = write_matrix_files(work / "files")
    t0 = time.time()
    with WorldServer(files) as server:
        rows = matrix_rows(server.base_url)
        urls = write_matrix_list(rows, work / "urls.parquet")
        cfg = DownloadConfig(
            image_size=image_size,
            shard_size=shard_size,
            thread_count=8,
            timeout=timeout,
            source=SOURCE,
            url_policy="allow_loopback",  # the matrix is served on loopback
        )
        summary = run_download(urls, work / "out", cfg, ray_address=ray_address, progress=False)
    wall = time.time() - t0
    pairs = read_url_list(urls, source=SOURCE)
    samples = read_samples(work / "out")
    by_uid: dict[str, list[dict[str, Any]]] = {}
    for s in samples.select(["uid", "status", "reason", "text", "image"]).to_pylist():
        by_uid.setdefault(s["uid"], []).append(s)
    in_uids = pairs.column("uid").to_pylist()
    results = []
    for (spec, _), uid, text in zip(rows, in_uids, pairs.column("text").to_pylist(), strict=True):
        r = RowResult(spec.kind, spec.expect, spec.reason, uid, text, file=spec.file)
        got = by_uid.get(uid, [])
        if got:
            r.status, r.reason, r.text_out, r.image = (
                got[0][k] for k in ("status", "reason", "text", "image")
            )
        results.append(r)
    counts = Counter(samples.column("uid").to_pylist())
    in_set = set(in_uids)
    extra = sum(n - 1 if u in in_set else n for u, n in counts.items())
    return MatrixResult(
        rows=results,
        rows_in=len(in_uids),
        rows_out=samples.num_rows,
        rows_lost=len(in_set - set(counts)),
        rows_duplicated=extra,
        status_counts=summary.status_counts,
        wall_s=wall,
    )
