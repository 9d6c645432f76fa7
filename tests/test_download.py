"""The download stage: real HTTP from the served shapes world, real img2dataset, real local Ray."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.core import schema as S
from capfilt.core.errors import ConfigError
from capfilt.core.shards import INPUTS_DIR, stats_path
from capfilt.io.urllist import read_url_list
from capfilt.stages.download import DownloadConfig, download_shard, read_samples, run_download, screen_rows

CFG = DownloadConfig(
    image_size=64, shard_size=60, thread_count=8, timeout=5, source="shapes", url_policy="allow_loopback"
)


def _labels(world: Path) -> pa.Table:
    return pq.read_table(world / "web_labels.parquet")


@pytest.fixture(scope="module")
def downloaded(ray_local, served_world, tmp_path_factory):
    world, urls, _ = served_world
    out = tmp_path_factory.mktemp("dl") / "full"
    summary = run_download(urls, out, CFG, progress=False)
    return world, urls, out, summary


def test_every_input_row_ends_in_exactly_one_output_row(downloaded):
    world, urls, out, summary = downloaded
    n_in = pq.read_table(urls).num_rows
    samples = read_samples(out)
    assert samples.schema == S.SAMPLE
    assert samples.num_rows == n_in == summary.rows_in
    uids = samples.column("uid").to_pylist()
    assert len(set(uids)) == len(uids), "a uid appears twice"
    assert samples.column("row").to_pylist() == list(range(n_in))
    assert sum(summary.status_counts.values()) == n_in
    assert set(summary.status_counts) <= set(S.SAMPLE_STATUSES)
    # The per-shard stats add up to the input too.
    stats = [json.loads(p.read_text()) for p in sorted((out / "_stats").glob("*.json"))]
    assert len(stats) == summary.shards_total == -(-n_in // CFG.shard_size)
    assert sum(s["rows_in"] for s in stats) == n_in
    assert sum(sum(s["status_counts"].values()) for s in stats) == n_in
    assert not (out / INPUTS_DIR).exists() and not (out / "_tmp").exists()


def test_known_good_succeed_and_decode_known_bad_fail_with_a_reason(downloaded):
    world, _, out, _ = downloaded
    samples = read_samples(out).to_pylist()
    labels = _labels(world).to_pylist()
    assert len(samples) == len(labels)
    kinds_seen = set()
    for sample, label in zip(samples, labels, strict=True):
        assert sample["text"] == label["caption"]
        kinds_seen.add(label["bad_kind"])
        if label["expect"] == "success":
            assert sample["status"] == S.SUCCESS, (label, sample["status"], sample["reason"])
            assert sample["reason"] is None
            img = Image.open(io.BytesIO(sample["image"]))
            img.load()
            assert img.size == (64, 64) and img.mode == "RGB"
            assert sample["sha256"] and len(sample["sha256"]) == 64
        elif label["expect"] == "duplicate":
            assert sample["status"] == S.DUPLICATE and "same url and text" in sample["reason"]
            assert sample["image"] is None
        else:
            assert label["expect"] == "fail"
            assert sample["status"] in (S.FAILED_TO_DOWNLOAD, S.FAILED_TO_RESIZE), (label, sample["status"])
            assert sample["reason"], label
            assert sample["image"] is None
    # The world put every kind of bad input in; each one went through the real pipeline.
    assert {
        "http_404",
        "http_500",
        "html_body",
        "truncated_jpeg",
        "corrupt_jpeg",
        "tiny_1x1",
        "huge_image",
    } <= kinds_seen


def test_reasons_name_what_went_wrong(downloaded):
    world, _, out, _ = downloaded
    by_kind: dict[str, set[str]] = {}
    for sample, label in zip(read_samples(out).to_pylist(), _labels(world).to_pylist(), strict=True):
        if label["bad_kind"]:
            by_kind.setdefault(label["bad_kind"], set()).add(f"{sample['status']}: {sample['reason']}")
    assert all("404" in r for r in by_kind["http_404"])
    assert all("500" in r for r in by_kind["http_500"])
    assert all("too small" in r for r in by_kind["tiny_1x1"])
    assert all("area too large" in r for r in by_kind["huge_image"])


def test_rerun_skips_finished_shards_and_changes_nothing(downloaded):
    _, urls, out, _ = downloaded
    before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    summary = run_download(urls, out, CFG, progress=False)
    assert summary.shards_written == 0 and summary.shards_skipped == summary.shards_total
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == before


def test_interrupted_run_resumes_to_the_same_rows(downloaded, tmp_path):
    _, urls, full_out, _ = downloaded
    out = tmp_path / "resumed"
    first = run_download(urls, out, CFG, progress=False, max_shards=2)
    assert first.shards_written == 2 and first.shards_pending == first.shards_total - 2
    # A crash mid-shard leaves a shard file without its stats file, and temp files: neither is trusted.
    victim = sorted(out.glob("*.parquet"))[-1]
    stats_path(out, int(victim.stem)).unlink()
    (out / "_tmp").mkdir(exist_ok=True)
    (out / "_tmp" / "00001-deadbeef").mkdir()
    (out / f".{victim.name}.half.tmp").write_bytes(b"PAR1 half written")
    second = run_download(urls, out, CFG, progress=False)
    assert second.shards_skipped == 1 and second.shards_written == second.shards_total - 1
    resumed, uninterrupted = read_samples(out), read_samples(full_out)
    assert resumed.num_rows == uninterrupted.num_rows
    assert resumed.equals(uninterrupted), "resumed rows differ from an uninterrupted run"


def test_rerun_with_another_input_is_refused(downloaded, tmp_path):
    _, urls, out, _ = downloaded
    other = tmp_path / "other.parquet"
    pq.write_table(pq.read_table(urls).slice(0, 10), other)
    with pytest.raises(ConfigError, match="different input"):
        run_download(other, out, CFG, progress=False)


def test_a_row_img2dataset_loses_is_written_as_failed_internal(served_world, tmp_path, monkeypatch):
    """img2dataset only prints when processing a row raises; we must still write the row."""
    import capfilt.stages.download.driver as D

    _, urls, _ = served_world
    pairs = read_url_list(urls, source="shapes").slice(0, 5)
    status, reason = screen_rows(pairs)
    pairs = pairs.append_column("pre_status", pa.array(status, pa.string())).append_column(
        "pre_reason", pa.array(reason, pa.string())
    )
    inp = tmp_path / "in.parquet"
    pq.write_table(pairs, inp)
    real = D._run_img2dataset

    def lossy(todo, work_dir, cfg):
        got = real(todo, work_dir, cfg)
        got.rows.pop(todo.column("uid")[0].as_py())
        return got

    monkeypatch.setattr(D, "_run_img2dataset", lossy)
    stats = download_shard(0, str(inp), str(tmp_path / "out"), CFG.model_dump_json())
    table = pq.read_table(tmp_path / "out" / "00000.parquet")
    assert table.num_rows == 5 and stats["rows_in"] == 5
    assert stats["status_counts"].get(S.FAILED_INTERNAL) == 1
    assert table.column("status")[0].as_py() == S.FAILED_INTERNAL


def test_screen_rows_marks_unusable_urls_and_exact_repeats():
    urls = ["http://a/1.jpg", "", None, "ftp://a/x", "a/no-scheme.jpg", "http://a/1.jpg", "http://a/1.jpg"]
    texts = ["x", "x", "x", "x", "x", "x", "other text"]
    uids, _ = S.make_uids("t", [u or "" for u in urls], texts)
    pairs = pa.table({"uid": uids, "url": urls, "text": texts})
    status, reason = screen_rows(pairs)
    assert status == [
        None,
        S.INVALID_INPUT,
        S.INVALID_INPUT,
        S.INVALID_INPUT,
        S.INVALID_INPUT,
        S.DUPLICATE,
        None,
    ]
    assert reason[5] == f"same url and text as an earlier row (uid {uids[0]})"
    assert "ftp" in reason[3]


def test_uid_is_stable_and_depends_on_content_only():
    a = S.make_uid("cc3m", "http://x/1.jpg", "a dog")
    assert a == S.make_uid("cc3m", "http://x/1.jpg", "a dog") and len(a) == 32
    assert (
        len(
            {a, S.make_uid("cc12m", "http://x/1.jpg", "a dog"), S.make_uid("cc3m", "http://x/1.jpg", "a cat")}
        )
        == 3
    )
    uids, dup_of = S.make_uids("s", ["u", "v", "u", "u"], ["t", "t", "t", "t"])
    assert len(set(uids)) == 4 and dup_of == [-1, -1, 0, 0]
    # Reordering the input does not change a row's uid.
    uids2, _ = S.make_uids("s", ["v", "u"], ["t", "t"])
    assert uids2 == [uids[1], uids[0]]
