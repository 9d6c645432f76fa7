"""The bad-input matrix through the real download stage (HTTP server, img2dataset, local Ray):
every kind ends with its expected status and reason, and no row is lost or duplicated."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capfilt.core import schema as S
from capfilt.io.imageguard import GuardedResizer, inspect, jpeg_is_truncated
from capfilt.model.transforms import decode_image
from capfilt.world.badinputs import MATRIX, MatrixResult, matrix_files, matrix_kinds, run_matrix

IMAGE_SIZE = 64
KINDS = [m.kind for m in matrix_kinds()]


@pytest.fixture(scope="module")
def matrix(ray_local, tmp_path_factory: pytest.TempPathFactory) -> MatrixResult:
    # A 1 s download timeout against the slow endpoint's 3 s delay.
    return run_matrix(tmp_path_factory.mktemp("matrix"), timeout=1.0, shard_size=8, image_size=IMAGE_SIZE)


def _small(image: bytes | Image.Image) -> np.ndarray:
    img = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else image
    return np.asarray(img.convert("RGB").resize((16, 16), Image.Resampling.BOX), dtype=np.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_ends_with_its_status_and_reason(matrix: MatrixResult, kind: str) -> None:
    row = matrix.by_kind()[kind]
    assert row.problems() == [], (kind, row.status, row.reason)
    if row.status != S.SUCCESS:
        assert row.image is None
        return
    # A successful row is an 8-bit RGB JPEG of the served image, whatever its pixel format was:
    # alpha composited onto white, 16-bit scaled (not clipped to white), the GIF's first frame.
    assert row.image is not None
    out = Image.open(io.BytesIO(row.image))
    assert out.format == "JPEG" and out.mode == "RGB" and out.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert row.file is not None
    # Compared at 16x16, where resampling, dithering and JPEG noise average out but a white
    # (clipped) image, a black (uncomposited) half or the wrong GIF frame do not.
    reference = decode_image(matrix_files()[row.file])
    diff = np.abs(_small(row.image) - _small(reference)).mean()
    assert diff < 6, f"{kind}: mean pixel difference {diff:.1f} from the served image"


def test_rows_in_equal_rows_out(matrix: MatrixResult) -> None:
    assert matrix.rows_in == len(KINDS) == len(matrix.rows)
    assert matrix.rows_out == matrix.rows_in
    assert matrix.rows_lost == 0 and matrix.rows_duplicated == 0
    uids = [r.uid for r in matrix.rows]
    assert len(set(uids)) == len(uids), "two input rows share a uid"
    assert sum(matrix.status_counts.values()) == matrix.rows_in
    assert set(matrix.status_counts) <= set(S.SAMPLE_STATUSES)


def test_every_kind_of_outcome_is_in_the_matrix(matrix: MatrixResult) -> None:
    """The matrix must exercise every status the stage can give before and after fetching."""
    statuses = {r.status for r in matrix.rows}
    assert {S.SUCCESS, S.FAILED_TO_DOWNLOAD, S.FAILED_TO_RESIZE, S.DUPLICATE, S.INVALID_INPUT} <= statuses


def test_texts_come_out_exactly_as_they_went_in(matrix: MatrixResult) -> None:
    rows = matrix.by_kind()
    assert len(rows["caption_10k_chars"].text_out or "") == 10_000
    assert rows["caption_whitespace"].text_out == " \t\n  "
    assert rows["caption_control_chars"].text_out == rows["caption_control_chars"].text_in
    assert "\x00" in (rows["caption_control_chars"].text_out or "")
    assert rows["caption_null"].text_out == "" and rows["caption_empty"].text_out == ""
    assert all(r.text_out == r.text_in for r in matrix.rows)


def test_report_has_what_the_reliability_benchmark_records(matrix: MatrixResult) -> None:
    report = matrix.report()
    assert report["kinds_tried"] == KINDS
    assert report["rows_in"] == report["rows_out"] == len(KINDS) and report["rows_lost"] == 0
    assert report["kinds_not_as_expected"] == {}
    assert report["status_by_kind"]["timeout"] == S.FAILED_TO_DOWNLOAD


def test_matrix_kinds_are_unique() -> None:
    kinds = [m.kind for m in MATRIX]
    assert len(set(kinds)) == len(kinds)


def test_uid_separator_in_a_field_does_not_make_two_rows_share_a_uid() -> None:
    assert S.make_uid("s", "http://h/a\x1fb", "c") != S.make_uid("s", "http://h/a", "b\x1fc")
    # Rows without the separator keep the uid they always had.
    old_way = hashlib.blake2b(b"cc3m\x1fhttp://x/1.jpg\x1fa dog", digest_size=16).hexdigest()
    assert S.make_uid("cc3m", "http://x/1.jpg", "a dog") == old_way
    uids, _ = S.make_uids("s", ["http://h/a\x1fb", "http://h/a"], ["c", "b\x1fc"])
    assert len(set(uids)) == 2


# ---------------------------------------------------------------------------------------------
# The image guard on its own: bombs are refused from the header, before any decoding.
# ---------------------------------------------------------------------------------------------


class _Inner:
    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, stream: io.BytesIO, bbox: object = None) -> tuple:
        self.calls.append(stream.read())
        return b"img", 1, 1, 1, 1, None


# A Radiance HDR header declaring 30000x30000: under its own 2**30-pixel limit, OpenCV would try
# to allocate ~10 GB of 32-bit floats for it.
HDR_BOMB = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 30000 +X 30000\n" + b"\x02\x02\x75\x30" * 4


@pytest.mark.parametrize(
    "name, reason",
    [
        ("bomb.png", "image area too large"),
        ("bomb_huge.png", "image area too large (over Pillow's decompression-bomb limit)"),
        ("empty.jpg", "empty image body (0 bytes)"),
        ("truncated_scan.jpg", "truncated JPEG (no end-of-image marker)"),
        ("page.jpg", "not a recognised image format"),
        ("hdr", "not a recognised image format"),
    ],
)
def test_guard_refuses_without_decoding(name: str, reason: str) -> None:
    inner = _Inner()
    data = HDR_BOMB if name == "hdr" else matrix_files()[name]
    got = GuardedResizer(inner, max_image_area=50e6)(io.BytesIO(data))
    assert got[0] is None and got[5] == reason
    assert inner.calls == [], "the resizer was handed a file the guard must refuse"


def test_guard_passes_plain_rgb_through_and_converts_the_rest() -> None:
    files = matrix_files()
    inner = _Inner()
    guard = GuardedResizer(inner, max_image_area=50e6)
    guard(io.BytesIO(files["ok.jpg"]))
    assert inner.calls == [files["ok.jpg"]], "a plain RGB JPEG must reach the resizer untouched"
    for name in ("rgb16.png", "gray16.png", "alpha.png", "cmyk.jpg", "animated.gif", "palette.png"):
        assert inspect(files[name], 50e6) == (None, True), name
        guard(io.BytesIO(files[name]))
        converted = Image.open(io.BytesIO(inner.calls[-1]))
        assert converted.format == "PNG" and converted.mode == "RGB", name
    # Under a raised limit the 10000x10000 bomb is not refused from its header (decoding fails).
    assert inspect(files["bomb.png"], 2e8)[0] is None


def test_jpeg_truncation_check() -> None:
    ok = matrix_files()["ok.jpg"]
    assert not jpeg_is_truncated(ok)
    assert not jpeg_is_truncated(ok + b"\x00" * 10)  # trailing padding is common and harmless
    assert jpeg_is_truncated(ok[:-2]) and jpeg_is_truncated(ok[: len(ok) // 2])


def test_matrix_files_are_what_they_claim(tmp_path: Path) -> None:
    files = matrix_files()
    assert Image.open(io.BytesIO(files["rgb16.png"])).size == (80, 80) and files["rgb16.png"][24] == 16
    assert Image.open(io.BytesIO(files["gray16.png"])).mode.startswith("I")
    assert Image.open(io.BytesIO(files["cmyk.jpg"])).mode == "CMYK"
    assert getattr(Image.open(io.BytesIO(files["animated.gif"])), "n_frames", 1) == 2
    assert Image.open(io.BytesIO(files["palette.png"])).mode == "P"
    assert Image.open(io.BytesIO(files["alpha.png"])).mode == "RGBA"
    assert files["empty.jpg"] == b""
