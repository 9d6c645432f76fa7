"""The download stage on object storage: the URL list and the output folder on a real S3 API
(moto's server on loopback), the images from the served shapes world."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.core import fs
from capfilt.core import schema as S
from capfilt.core.layout import INPUTS_DIR, MANIFEST, STATS_DIR, SUMMARY
from capfilt.core.shards import done_shards
from capfilt.stages.download import DownloadConfig, read_samples, run_download

CFG = DownloadConfig(
    image_size=32, shard_size=50, thread_count=8, timeout=5, source="shapes", url_policy="allow_loopback"
)


@pytest.fixture(scope="module")
def s3_ray() -> Iterator[str]:
    """An S3 bucket, and a local Ray started inside the server's block so its workers see it."""
    import ray

    from capfilt.core.cluster import ensure_ray
    from capfilt.testing import s3_server

    ray.shutdown()
    with s3_server() as bucket:
        # A new local instance even if another Ray cluster runs on this machine.
        ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=512 << 20)
        ensure_ray()  # joins it: capfilt's logging set-up
        try:
            yield bucket
        finally:
            ray.shutdown()


def _put(local: Path, uri: str) -> None:
    fs.write_atomic(fs.location(uri), local.read_bytes())


def test_a_url_list_on_s3_downloads_into_an_s3_folder(s3_ray, served_world, tmp_path):
    _, urls, _ = served_world
    table = pq.read_table(urls)
    # The list as two parts on S3: a Parquet file and a gzipped TSV, found by a glob.
    pq.write_table(table.slice(0, 120), tmp_path / "part-0.parquet")
    rest = table.slice(120).select(["url", "caption"]).to_pylist()
    with pa.CompressedOutputStream(str(tmp_path / "part-1.tsv.gz"), "gzip") as f:
        f.write(("url\tcaption\n" + "".join(f"{r['url']}\t{r['caption']}\n" for r in rest)).encode())
    for name in ("part-0.parquet", "part-1.tsv.gz"):
        _put(tmp_path / name, f"{s3_ray}/lists/{name}")
    out = f"{s3_ray}/run/download"

    first = run_download(f"{s3_ray}/lists/part-*", out, CFG, progress=False, max_shards=2)
    remote = fs.location(out)
    assert first.shards_written == 2 and first.shards_pending == first.shards_total - 2
    assert (remote / INPUTS_DIR).is_dir(), "the plans and the duplicate pass wait for the rerun"
    summary = run_download(f"{s3_ray}/lists/part-*", out, CFG, progress=False)
    assert summary.shards_skipped == 2 and summary.shards_written == summary.shards_total - 2
    assert summary.rows_in == table.num_rows and not summary.shards_failed
    for name in (MANIFEST, SUMMARY):
        assert (remote / name).is_file()
    assert len(list((remote / STATS_DIR).glob("*.json"))) == summary.shards_total
    assert len(done_shards(remote)) == summary.shards_total
    assert not (remote / INPUTS_DIR).exists()

    # The same rows as a local download of the same list.
    local = tmp_path / "local"
    run_download(urls, local, CFG, progress=False)
    got, ref = read_samples(out), read_samples(local)
    cols = [c for c in S.SAMPLE.names if c not in ("shard", "reason", "image")]
    assert got.select(cols).equals(ref.select(cols))
    ok = got.column("status").to_pylist().count(S.SUCCESS)
    assert ok == ref.column("status").to_pylist().count(S.SUCCESS) > 0
    # Nothing was written to local disk in place of the bucket.
    assert not Path("s3:").exists()
