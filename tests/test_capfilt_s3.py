"""The CapFilt stage with its input and its run folder on S3 (moto's server on loopback): the same
rows as a local run of the same input, resume and rethreshold there too. Ray starts inside the
server's block, so its workers get the endpoint and credentials from their environment."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from capfilt.core import fs
from capfilt.core.layout import CANDIDATES_DIR, CLEANED_DIR, STATS_DIR, SUMMARY
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.capfilt.driver import run_capfilt
from capfilt.stages.capfilt.rethreshold import read_candidates, read_cleaned, rethreshold
from capfilt.stages.download import DownloadConfig, run_download

CFG = CapFiltConfig(k=2, max_length=12, min_length=5, batch_size=16, torch_threads=1)
DOWNLOAD = DownloadConfig(
    image_size=64, shard_size=60, thread_count=8, timeout=5, source="shapes", url_policy="allow_loopback"
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def local_data(ray_local, served_world, tmp_path_factory) -> Path:
    """Two download shards of the session's world, on local disk."""
    _, urls, _ = served_world
    out = tmp_path_factory.mktemp("s3_dl") / "download"
    run_download(urls, out, DOWNLOAD, progress=False)
    data = tmp_path_factory.mktemp("s3_local_data")
    for name in ("00000.parquet", "00001.parquet"):
        shutil.copy(out / name, data / name)
    return data


@pytest.fixture(scope="module")
def bucket(local_data) -> Iterator[str]:
    """s3://<bucket> on a loopback S3 server, with a Ray started inside (and the session's back after)."""
    import ray

    from capfilt.core.cluster import ensure_ray

    ray.shutdown()
    try:
        from capfilt.testing import s3_server

        with s3_server() as root:
            ensure_ray(num_cpus=4)
            try:
                yield root
            finally:
                ray.shutdown()
    finally:
        ensure_ray(num_cpus=4)


@pytest.fixture(scope="module")
def runs(bucket, local_data, models, tmp_path_factory) -> tuple[Path, fs.RemotePath, fs.RemotePath]:
    """(local run, S3 run, S3 data): the same input, models and settings, human pairs from the shards."""
    data = fs.location(f"{bucket}/data")
    assert isinstance(data, fs.RemotePath)
    pafs.copy_files(
        str(local_data), data.fs_path, pafs.LocalFileSystem(), destination_filesystem=data.filesystem
    )
    local = tmp_path_factory.mktemp("s3_local_run") / "run"
    run_capfilt(local_data, local, models["captioner"], models["filter"], CFG, human=local_data)
    remote = fs.location(f"{bucket}/runs/capfilt")
    assert isinstance(remote, fs.RemotePath)
    summary = run_capfilt(str(data), str(remote), models["captioner"], models["filter"], CFG, human=str(data))
    assert summary.shards_written == 2 and summary.out_dir == remote.uri
    return local, remote, data


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, Path]:
    return tiny_models


def _rows(table: pa.Table) -> list[dict]:
    """Rows by (uid, text_uid), without image_ref: a local path in one run, an s3:// URI in the other."""
    keep = [c for c in table.column_names if c != "image_ref"]
    return table.select(keep).sort_by([("uid", "ascending"), ("text_uid", "ascending")]).to_pylist()


def test_a_run_on_s3_gives_the_rows_of_a_local_run(runs):
    local, remote, data = runs
    for kind in (CANDIDATES_DIR, CLEANED_DIR, STATS_DIR):
        assert sorted(p.name for p in (local / kind).iterdir()) == sorted(
            p.name for p in (remote / kind).iterdir()
        )
    assert (remote / SUMMARY).is_file() and not (remote / "_parts").exists()
    cleaned = read_cleaned(remote)
    assert cleaned.num_rows > 0 and all(cleaned.column("image").to_pylist()), "images included"
    assert _rows(read_candidates(remote)) == _rows(read_candidates(local))
    assert _rows(cleaned) == _rows(read_cleaned(local))
    refs = set(cleaned.column("image_ref").to_pylist())
    assert refs == {f"{data.uri}/00000.parquet", f"{data.uri}/00001.parquet"}


def test_a_rerun_on_s3_skips_the_finished_shards_and_rethreshold_works_there(runs, models):
    local, remote, data = runs
    again = run_capfilt(data.uri, remote.uri, models["captioner"], models["filter"], CFG, human=data.uri)
    assert again.shards_written == 0 and again.shards_skipped == 2
    scores = [s for s in read_candidates(local).column("itm_score").to_pylist() if s is not None]
    median = sorted(scores)[len(scores) // 2]
    got, want = rethreshold(remote.uri, median), rethreshold(local, median)
    assert got.kept == want.kept
    assert sum(v for k, v in got.kept.items() if k != "human") == sum(s >= median for s in scores)
    assert _rows(read_cleaned(remote)) == _rows(read_cleaned(local))
