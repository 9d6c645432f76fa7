"""The download stage: real HTTP from the served shapes world, real img2dataset, real local Ray."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

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


# ----------------------------------------------------------------- URL inputs at scale: the planner


def _refused_list(n: int) -> list[dict[str, str]]:
    """Rows whose URLs are refused at once (port 9 on loopback): the driver is what is tested."""
    return [{"url": f"http://127.0.0.1:9/{i}.jpg", "caption": f"c{i}"} for i in range(n)]


REFUSED = DownloadConfig(
    image_size=16, shard_size=7, thread_count=4, timeout=2, source="t", url_policy="allow_loopback"
)


def _write_tsv_gz(path: Path, rows: list[dict[str, Any]]) -> Path:
    cols = list(rows[0])
    text = "\t".join(cols) + "\n" + "".join("\t".join(str(r[c]) for c in cols) + "\n" for r in rows)
    with pa.CompressedOutputStream(str(path), "gzip") as f:
        f.write(text.encode())
    return path


def test_the_planner_holds_file_ranges_and_reads_no_parquet_rows(tmp_path, monkeypatch):
    """Parquet shards are (file, row range) from metadata alone; a streamed format is written
    shard by shard into _inputs/, each file one shard."""
    from capfilt.io.urllist import expand_sources
    from capfilt.stages.download.planner import Columns, plan_shards

    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist(_refused_list(25_000)), a, row_group_size=4_000)
    pq.write_table(pa.Table.from_pylist(_refused_list(1_000)), b)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the planner read rows")

    for name in ("read", "read_row_groups", "read_row_group", "iter_batches"):
        monkeypatch.setattr(pq.ParquetFile, name, refuse)
    monkeypatch.setattr(pq, "read_table", refuse)
    plans = plan_shards(expand_sources([a, b]), tmp_path / "out", Columns("url", "caption"), 3_000)
    monkeypatch.undo()
    expected = [(str(a), s, min(3_000, 25_000 - s), s) for s in range(0, 25_000, 3_000)]
    expected.append((str(b), 0, 1_000, 25_000))
    assert [(p.path, p.start, p.rows, p.row0) for p in plans] == expected
    assert [p.shard for p in plans] == list(range(len(expected))) and not any(p.prepared for p in plans)
    assert not (tmp_path / "out").exists(), "planning Parquet writes nothing"

    tsv = _write_tsv_gz(tmp_path / "c.tsv.gz", _refused_list(2_500))
    streamed = plan_shards(expand_sources(tsv), tmp_path / "out", Columns("url", "caption"), 1_000)
    assert [(p.rows, p.row0, p.prepared) for p in streamed] == [
        (1_000, 0, True),
        (1_000, 1_000, True),
        (500, 2_000, True),
    ]
    texts = [pq.read_table(p.path).column("text").to_pylist() for p in streamed]
    assert sum(texts, []) == [r["caption"] for r in _refused_list(2_500)]
    assert all(Path(p.path).parent == tmp_path / "out" / INPUTS_DIR for p in streamed)


def _reference(rows: list[dict[str, Any]], tmp_path: Path) -> pa.Table:
    """uids, statuses and reasons of the in-memory reference: the whole list at once."""
    ref = tmp_path / "ref.parquet"
    pq.write_table(pa.Table.from_pylist(rows), ref)
    pairs = read_url_list(ref, source=REFUSED.source)
    status, reason = screen_rows(pairs)
    return pairs.append_column("pre_status", pa.array(status, pa.string())).append_column(
        "pre_reason", pa.array(reason, pa.string())
    )


@pytest.mark.parametrize("partition_rows", [14, 1_000_000])
def test_duplicates_across_shards_and_files_are_found_as_in_one_list(ray_local, tmp_path, partition_rows):
    """Repeats of earlier rows in other shards and other files, an exact triple, a URL that
    differs only in its spaces, repeated unusable rows: every status, reason and uid is the one
    the whole list screened at once gives, whatever the number of hash partitions."""
    rows = _refused_list(40)
    rows[9] = dict(rows[1])  # shard 1 repeats shard 0
    rows[20] = dict(rows[1])  # a third time, in a later group
    rows[22] = {"url": f"  {rows[3]['url']} ", "caption": rows[3]["caption"]}  # spaces: still a duplicate
    rows[30] = dict(rows[5])  # the second file repeats the first
    rows[31] = {"url": "", "caption": "no url"}
    rows[33] = {"url": "", "caption": "no url"}  # unusable: invalid, never a duplicate, own uid
    rows[35] = {"url": "ftp://x/1", "caption": "c"}
    rows[36] = {"url": "ftp://x/1", "caption": "c"}
    rows[38] = dict(rows[6])
    rows[39] = dict(rows[38])
    a = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:28]), a, row_group_size=5)
    b = _write_tsv_gz(tmp_path / "b.tsv.gz", rows[28:])
    cfg = REFUSED.model_copy(update={"dedup_partition_rows": partition_rows})
    out = tmp_path / "out"
    summary = run_download([a, b], out, cfg, progress=False)
    got = read_samples(out)
    ref = _reference(rows, tmp_path)
    assert got.column("row").to_pylist() == list(range(40)) and summary.rows_in == 40
    assert got.column("uid").to_pylist() == ref.column("uid").to_pylist()
    pre = ref.column("pre_status").to_pylist()
    assert [s for s in pre if s] == ["duplicate"] * 4 + ["invalid_input"] * 4 + ["duplicate"] * 2
    expect = [s or S.FAILED_TO_DOWNLOAD for s in pre]
    assert got.column("status").to_pylist() == expect
    dup = [i for i, s in enumerate(pre) if s == S.DUPLICATE]
    assert [got.column("reason")[i].as_py() for i in dup] == [
        ref.column("pre_reason")[i].as_py() for i in dup
    ]
    assert f"(uid {ref.column('uid')[3].as_py()})" in got.column("reason")[22].as_py()
    assert f"(uid {ref.column('uid')[6].as_py()})" in got.column("reason")[39].as_py()
    assert summary.status_counts[S.DUPLICATE] == 6
    assert summary.shards_total == 6 == len(set(got.column("shard").to_pylist()))  # 4 + 2: per file


def test_extra_columns_are_carried_after_the_sample_columns(ray_local, tmp_path):
    rows = [dict(r, similarity=0.25 * (i % 4), WIDTH=100 + i) for i, r in enumerate(_refused_list(20))]
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:12]), a)
    pq.write_table(pa.Table.from_pylist(rows[12:]), b)
    cfg = REFUSED.model_copy(update={"extra_columns": ["similarity", "WIDTH"]})
    out = tmp_path / "out"
    run_download([a, b], out, cfg, progress=False)
    shards = sorted(out.glob("[0-9]*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in shards]).sort_by("row")
    assert table.schema.names == [*S.SAMPLE.names, "similarity", "WIDTH"]
    assert (
        table.schema.field("similarity").type == pa.float64()
        and table.schema.field("WIDTH").type == pa.int64()
    )
    assert table.column("similarity").to_pylist() == [r["similarity"] for r in rows]
    assert table.column("WIDTH").to_pylist() == [r["WIDTH"] for r in rows]
    # Readers of SAMPLE rows see SAMPLE rows.
    assert read_samples(out).schema == S.SAMPLE
    assert S.conform(table, S.SAMPLE).equals(read_samples(out))
    # A csv's columns are text.
    tsv = _write_tsv_gz(tmp_path / "c.tsv.gz", rows)
    run_download(tsv, tmp_path / "out-tsv", cfg, progress=False)
    t = pq.read_table(sorted((tmp_path / "out-tsv").glob("[0-9]*.parquet"))[0])
    assert t.schema.field("WIDTH").type == pa.string() and t.column("WIDTH")[0].as_py() == "100"


def test_a_missing_extra_column_fails_before_any_work(tmp_path):
    path = tmp_path / "l.parquet"
    pq.write_table(pa.Table.from_pylist(_refused_list(5)), path)
    cfg = REFUSED.model_copy(update={"extra_columns": ["punsafe"]})
    with pytest.raises(ConfigError, match=r"no column 'punsafe' \(download.extra_columns\); its columns are"):
        run_download(path, tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="name SAMPLE columns"):
        DownloadConfig(extra_columns=["width"])


def test_a_list_in_many_files_and_formats_downloads_to_the_same_rows(downloaded, tmp_path):
    """The world's list as a Parquet part and a gzipped TSV part: the rows, uids and statuses of
    the single-file download (shards do not span files, so shard numbers differ)."""
    _, urls, full_out, _ = downloaded
    table = pq.read_table(urls)
    a = tmp_path / "part-0.parquet"
    pq.write_table(table.slice(0, 100), a)
    _write_tsv_gz(tmp_path / "part-1.tsv.gz", table.slice(100).select(["url", "caption"]).to_pylist())
    out = tmp_path / "out"
    summary = run_download(str(tmp_path / "part-*"), out, CFG, progress=False)
    assert summary.rows_in == table.num_rows
    cols = [c for c in S.SAMPLE.names if c not in ("shard", "image", "reason")]
    assert read_samples(out).select(cols).equals(read_samples(full_out).select(cols))
    assert summary.shards_total == 2 + -(-(table.num_rows - 100) // CFG.shard_size)
    assert not (out / INPUTS_DIR).exists()


@pytest.mark.parametrize(
    ("url", "text"),
    [("http://x/1", "a"), ("http://x/\x1f", "b"), ("", "\x1f\x1f"), ("http://é/日本", "\ud800")],
)
def test_the_duplicate_pass_key_is_the_first_occurrence_uid(url, text):
    from capfilt.stages.download.planner import first_uid

    assert first_uid("src", url, text) == S.make_uid("src", url, text)
