"""capfilt.core.fs on a local folder and on a real S3 API (moto's server on loopback): the same
calls must mean the same thing on both."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from capfilt.core import fs
from capfilt.core.fs import Location, RemotePath
from capfilt.core.shards import done_shards, read_shard_stats, write_parquet_atomic


@pytest.fixture(scope="module")
def bucket() -> Iterator[str]:
    from capfilt.testing import s3_server

    with s3_server() as uri:
        yield uri


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """An empty folder: a local one, or a fresh prefix in the test bucket."""
    if request.param == "local":
        return tmp_path / "root"
    base = request.getfixturevalue("bucket")
    return fs.location(f"{base}/{request.node.name.replace('[', '-').rstrip(']')}")


# -- naming ------------------------------------------------------------------------------------


def test_location_parses_local_paths_and_uris() -> None:
    assert fs.location("runs/demo") == Path("runs/demo")
    assert fs.location("file:///data/x.parquet") == Path("/data/x.parquet")
    assert fs.location(r"C:\data\x") == Path(r"C:\data\x")  # a drive letter is not a scheme
    r = fs.location("s3://bucket/runs//x/")
    assert isinstance(r, RemotePath)
    assert (r.scheme, r.netloc, r.key, str(r)) == ("s3", "bucket", "runs/x", "s3://bucket/runs/x")
    assert fs.location(r) is r and fs.location(Path("a")) == Path("a")
    assert fs.is_remote("s3://b/k") and not fs.is_remote("file:///k") and not fs.is_remote("k")
    with pytest.raises(ValueError, match="names no bucket"):
        fs.location("s3:///key")


def test_remote_path_naming_matches_pathlib() -> None:
    r = fs.location("s3://bucket/runs/x/model.tar.gz")
    p = Path("/runs/x/model.tar.gz")
    assert (r.name, r.stem, r.suffix, r.suffixes) == (p.name, p.stem, p.suffix, p.suffixes)
    assert r.parent == fs.location("s3://bucket/runs/x")
    assert r.with_name("a.json") == fs.location("s3://bucket/runs/x/a.json")
    assert r.with_suffix(".zip") == fs.location("s3://bucket/runs/x/model.tar.zip")
    assert fs.location("s3://bucket") / "a" / "b.json" == fs.location("s3://bucket/a/b.json")
    assert fs.location("s3://bucket").parent == fs.location("s3://bucket")
    assert fs.location("s3://bucket/a").joinpath("b", "c") == fs.location("s3://bucket/a/b/c")
    for bad in ("/abs", "s3://other/k"):
        with pytest.raises(ValueError, match="cannot join"):
            _ = r.parent / bad
    assert sorted([fs.location("s3://b/2"), fs.location("s3://b/10")]) == [
        fs.location("s3://b/10"),
        fs.location("s3://b/2"),
    ]


def test_remote_path_pickles_as_its_uri() -> None:
    r = fs.location("s3://bucket/runs/x")
    back = pickle.loads(pickle.dumps(r))
    assert back == r and isinstance(back, RemotePath) and hash(back) == hash(r)
    assert b"bucket/runs/x" in pickle.dumps(r)  # the URI, not a filesystem object


def test_arrow_gives_pyarrow_path_and_filesystem(bucket: str) -> None:
    assert fs.arrow("runs/x.parquet") == ("runs/x.parquet", None)
    path, filesystem = fs.arrow(f"{bucket}/runs/x.parquet")
    assert path == f"{bucket[len('s3://') :]}/runs/x.parquet"
    assert filesystem is not None and filesystem.type_name == "s3"


# -- reading and listing -----------------------------------------------------------------------


def _tree(root: Location) -> None:
    fs.write_atomic(root / "a" / "one.json", b'{"n": 1}')
    fs.write_atomic(root / "a" / "two.txt", b"two")
    fs.write_atomic(root / "a" / "deep" / "three.json", b'{"n": 3}')
    fs.write_atomic(root / "top.json", b'{"n": 0}')


def _rel(root: Location, paths: Iterator[Location]) -> list[str]:
    return sorted(str(p)[len(str(root)) + 1 :] for p in paths)


def test_exists_and_is_dir_on_files_and_prefixes(root: Location) -> None:
    assert not root.exists()
    _tree(root)
    a = root / "a"
    assert a.exists() and a.is_dir() and not a.is_file()
    assert (a / "deep").is_dir()  # a prefix two levels down, no marker object
    f = a / "one.json"
    assert f.exists() and f.is_file() and not f.is_dir()
    assert not (root / "nope").exists() and not (root / "nope").is_dir()
    assert not (root / "a" / "one").exists()  # a prefix of a key name is not a folder
    assert f.stat().st_size == len(b'{"n": 1}')


def test_iterdir_lists_one_level(root: Location) -> None:
    _tree(root)
    assert _rel(root, root.iterdir()) == ["a", "top.json"]
    assert _rel(root, (root / "a").iterdir()) == ["a/deep", "a/one.json", "a/two.txt"]


def test_glob_one_level_and_recursive(root: Location) -> None:
    _tree(root)
    assert _rel(root, (root / "a").glob("*.json")) == ["a/one.json"]
    assert _rel(root, root.glob("**/*.json")) == ["a/deep/three.json", "a/one.json", "top.json"]
    assert _rel(root, (root / "missing").glob("*.json")) == []


def test_read_json_and_text_round_trip(root: Location) -> None:
    fs.write_json_atomic(root / "x.json", {"b": [1, 2], "a": "é"})
    assert fs.read_json(root / "x.json") == {"a": "é", "b": [1, 2]}
    assert fs.read_json(str(root / "x.json")) == {"a": "é", "b": [1, 2]}  # a URI string too
    with (root / "t.txt").open("w") as f:
        f.write("line\n")
    with (root / "t.txt").open("r") as f:
        assert f.read() == "line\n"
    with (root / "t.txt").open("rb") as f:
        assert f.read() == b"line\n"


# -- atomic writes -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["wb", "w"])
def test_an_error_inside_open_for_writing_leaves_no_object(bucket: str, mode: str) -> None:
    target = fs.location(f"{bucket}/atomic-{mode}/half.bin")
    with pytest.raises(RuntimeError, match="mid-write"), target.open(mode) as f:
        f.write(b"half" if mode == "wb" else "half")
        raise RuntimeError("mid-write")
    assert not target.exists()
    with target.open(mode) as f:
        f.write(b"whole" if mode == "wb" else "whole")
    assert target.read_bytes() == b"whole"


def test_write_atomic_leaves_no_temp_file_locally(tmp_path: Path) -> None:
    fs.write_atomic(tmp_path / "ok.bin", b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["ok.bin"]
    with pytest.raises(TypeError):
        fs.write_atomic(tmp_path / "bad.bin", "not bytes")  # type: ignore[arg-type]
    assert [p.name for p in tmp_path.iterdir()] == ["ok.bin"]  # the temp file was removed


def test_write_parquet_atomic_and_done_shards(root: Location) -> None:
    table = pa.table({"uid": ["a", "b", "c"], "n": [1, 2, 3]})
    write_parquet_atomic(root / "00000.parquet", table)
    write_parquet_atomic(root / "00001.parquet", table.slice(0, 1))
    fs.write_json_atomic(root / "_stats" / "00000.json", {"shard": 0, "rows": 3})
    assert fs.read_parquet(root / "00000.parquet").equals(table)
    assert fs.read_schema(root / "00001.parquet") == table.schema
    assert fs.parquet_file(root / "00000.parquet").metadata.num_rows == 3
    # Shard 1 has no stats yet: not done. The folder reads whole, bookkeeping ("_stats") skipped.
    assert done_shards(root) == {0}
    assert read_shard_stats(root) == [{"shard": 0, "rows": 3}]
    assert fs.read_parquet(root).num_rows == 4
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


# -- copies and deletes ------------------------------------------------------------------------


def test_local_copy_of_a_file_and_a_folder(bucket: str, tmp_path: Path) -> None:
    remote = fs.location(f"{bucket}/ckpt")
    _tree(remote)
    cache = tmp_path / "cache"
    one = fs.local_copy(remote / "a" / "one.json", cache=cache)
    assert isinstance(one, Path) and one.name == "one.json" and one.read_bytes() == b'{"n": 1}'
    folder = fs.local_copy(f"{remote}/a", cache=cache)
    assert folder.name == "a" and folder.is_dir()
    got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert got == ["deep/three.json", "one.json", "two.txt"]
    # Copied once: a second call returns the same copy without touching it.
    os.utime(folder / "two.txt", (1, 1))
    assert fs.local_copy(f"{remote}/a", cache=cache) == folder
    assert (folder / "two.txt").stat().st_mtime == 1
    # The same name uploaded again is a different copy, with the new bytes.
    fs.write_atomic(remote / "a" / "one.json", b'{"n": 11}')
    again = fs.local_copy(remote / "a" / "one.json", cache=cache)
    assert again != one and again.read_bytes() == b'{"n": 11}'
    # Local paths are returned as they are; missing remote ones fail with their URI.
    assert fs.local_copy(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="nope"):
        fs.local_copy(remote / "nope", cache=cache)
    assert not list(cache.rglob(".partial-*"))


def test_rmtree_removes_a_prefix_and_nothing_beside_it(root: Location) -> None:
    _tree(root)
    fs.write_atomic(root / "ab.json", b"{}")  # shares the prefix "a" as text, not as a folder
    fs.rmtree(root / "a")
    assert not (root / "a").exists() and not (root / "a" / "deep" / "three.json").exists()
    assert _rel(root, root.iterdir()) == ["ab.json", "top.json"]
    fs.rmtree(root / "a")  # nothing there: no error


def test_rmtree_of_a_bucket_root_keeps_the_bucket(tmp_path: Path) -> None:
    from capfilt.testing import s3_server

    with s3_server() as uri:
        r = fs.location(uri)
        fs.write_atomic(r / "x" / "y.json", b"{}")
        fs.rmtree(r)
        assert r.exists() and list(r.iterdir()) == []
        fs.write_atomic(r / "z.json", b"{}")  # the bucket still takes writes
        assert (r / "z.json").is_file()


def test_unlink_and_mkdir(root: Location) -> None:
    f = root / "d" / "f.json"
    root.mkdir(parents=True, exist_ok=True)
    fs.write_atomic(f, b"{}")
    f.unlink()
    assert not f.exists()
    f.unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        f.unlink()
