"""Reading URL lists in the formats users have, and failing early on bad ones."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core.errors import ConfigError
from capfilt.core.schema import WEB_PAIR
from capfilt.io.urllist import check_columns, expand_sources, infer_format, read_url_list

ROWS = [
    {"URL": "http://h/1.jpg", "TEXT": "a red circle"},
    {"URL": "http://h/2.jpg", "TEXT": "2024"},  # numeric-looking caption stays text
    {"URL": "http://h/3.jpg", "TEXT": 'quote " and, comma'},
]


def _write(path, fmt):
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif fmt in ("csv", "tsv"):
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["URL", "TEXT"], delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            w.writerows(ROWS)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_every_format_reads_to_the_same_pairs(tmp_path, fmt):
    table = read_url_list(
        _write(tmp_path / f"l.{fmt}", fmt), url_col="URL", caption_col="TEXT", source="laion"
    )
    assert table.schema == WEB_PAIR
    assert table.column("text").to_pylist() == [r["TEXT"] for r in ROWS]
    reference = read_url_list(_write(tmp_path / "ref.parquet", "parquet"), "URL", "TEXT", source="laion")
    assert table.column("uid").to_pylist() == reference.column("uid").to_pylist()


def test_missing_caption_column_is_allowed_when_not_asked_for(tmp_path):
    path = tmp_path / "u.parquet"
    pq.write_table(pa.table({"url": ["http://h/1.jpg"]}), path)
    assert read_url_list(path, caption_col=None).column("text").to_pylist() == [""]


BAD_LISTS: dict[str, tuple[str | bytes | None, str]] = {
    "missing.parquet": (None, "does not exist"),
    "empty.csv": ("", "empty"),
    "empty.tsv": ("", "empty"),
    "empty.parquet": (b"", "empty"),
    "empty.jsonl": ("", "empty"),
    "blank-lines.csv": ("\n\n", "empty"),
    "blank-lines.jsonl": ("\n\n", "no rows"),
    "header-only.csv": ("url,caption\n", "no rows"),
    "list.txt": ("http://h/1.jpg\n", "extension"),
    "garbage.parquet": (b"\x00\x01not parquet" * 8, "not readable as parquet"),
    "not-json.jsonl": ("this is not json\n", "not readable as jsonl"),
    "ragged.csv": ("url,caption\nhttp://h/1.jpg,x,extra\n", "not readable as csv"),
    # A column that changes type between lines.
    "mixed.jsonl": (
        '{"url": "http://h/1.jpg", "caption": "x"}\n{"url": 5, "caption": "y"}\n',
        "changed from",
    ),
    "list-url.jsonl": ('{"url": ["http://h/1.jpg"], "caption": "x"}\n', "must hold text"),
    "object-caption.jsonl": ('{"url": "http://h/1.jpg", "caption": {"en": "x"}}\n', "must hold text"),
    "latin1.csv": ("url,caption\nhttp://h/1.jpg,caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
}


@pytest.mark.parametrize("name", sorted(BAD_LISTS))
def test_bad_url_lists_fail_with_a_message(tmp_path, name):
    content, match = BAD_LISTS[name]
    if isinstance(content, bytes):
        (tmp_path / name).write_bytes(content)
    elif content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=match):
        read_url_list(tmp_path / name)


BAD_TABLES = {
    "zero-rows": (
        pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}),
        "no rows",
    ),
    "no-caption-column": (pa.table({"url": ["http://h/1.jpg"]}), r"no column 'caption' \(--caption-col\)"),
    "bool-url": (pa.table({"url": [True], "caption": ["x"]}), "'url' .* has type bool; it must hold text"),
    "struct-caption": (
        pa.table({"url": ["http://h/1.jpg"], "caption": [{"x": 1}]}),
        "'caption' .* has type struct",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_TABLES))
def test_bad_parquet_columns_fail_with_a_message(tmp_path, name):
    table, match = BAD_TABLES[name]
    pq.write_table(table, tmp_path / "l.parquet")
    with pytest.raises(ConfigError, match=match):
        read_url_list(tmp_path / "l.parquet")


def test_dictionary_and_bytes_columns_are_read_as_text(tmp_path):
    """pandas categoricals and Parquet byte columns holding UTF-8 are text, not wrong types."""
    table = pa.table(
        {
            "url": pa.array(["http://h/1.jpg", "http://h/2.jpg"]).dictionary_encode(),
            "caption": pa.array(["caf\u00e9".encode(), b"x"], pa.binary()),
        }
    )
    pq.write_table(table, tmp_path / "l.parquet")
    pairs = read_url_list(tmp_path / "l.parquet")
    assert pairs.column("url").to_pylist() == ["http://h/1.jpg", "http://h/2.jpg"]
    assert pairs.column("text").to_pylist() == ["caf\u00e9", "x"]


@pytest.mark.parametrize("name", ["empty.parquet", "ragged.csv", "mixed.jsonl", "latin1.csv"])
def test_cli_refuses_a_bad_list_before_writing_anything(tmp_path, name):
    content, match = BAD_LISTS[name]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else str(content).encode())
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["download", "--urls", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output
    assert not out.exists(), "nothing may be written before the input is validated"


def test_a_folder_is_not_a_url_list(tmp_path):
    with pytest.raises(ConfigError, match="folder"):
        read_url_list(tmp_path)


def test_missing_column_names_the_option_and_the_columns(tmp_path):
    path = _write(tmp_path / "l.parquet", "parquet")
    with pytest.raises(
        ConfigError, match=r"no column 'url' \(--url-col\); its columns are \['URL', 'TEXT'\]"
    ):
        read_url_list(path)


def test_wrong_column_type_is_refused(tmp_path):
    path = tmp_path / "l.parquet"
    pq.write_table(pa.table({"url": [[1, 2]], "caption": ["x"]}), path)
    with pytest.raises(ConfigError, match="must hold text"):
        read_url_list(path)


def test_cli_fails_before_any_work_with_exit_code_2(tmp_path):
    path = _write(tmp_path / "l.csv", "csv")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["download", "--urls", str(path), "--out", str(out)])
    assert result.exit_code == 2
    assert "no column 'url'" in result.output
    assert not out.exists(), "nothing may be written before the input is validated"


def test_cli_help_lists_the_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("download", "world", "run", "validate"):
        assert cmd in result.output


# ------------------------------------------------------------- URL inputs of many files, compressed


def _rows(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"url": f"http://h/{i}.jpg", "caption": f"caption {i % 7}"} for i in range(start, start + n)]


def _write_rows(path, rows, fmt, compression=None):
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    if fmt == "jsonl":
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    else:
        sep = "," if fmt == "csv" else "\t"
        data = (
            "url" + sep + "caption\n" + "".join(f"{r['url']}{sep}{r['caption']}\n" for r in rows)
        ).encode()
    if compression:
        codec = {"gz": "gzip", "bz2": "bz2", "zst": "zstd"}[compression]
        with pa.CompressedOutputStream(str(path), codec) as f:
            f.write(data)
        return path
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["l.tsv.gz", "l.csv.zst", "l.jsonl.bz2", "l.csv.gz"])
def test_a_compressed_list_reads_like_the_plain_one(tmp_path, name):
    fmt, comp = name.split(".")[1:]
    rows = _rows(50)
    got = read_url_list(_write_rows(tmp_path / name, rows, fmt, comp), source="s")
    ref = read_url_list(_write_rows(tmp_path / "ref.parquet", rows, "parquet"), source="s")
    assert got.equals(ref)
    assert infer_format(tmp_path / name) == (fmt, {"gz": "gzip", "zst": "zstd", "bz2": "bz2"}[comp])


def test_many_files_read_as_one_list_in_order(tmp_path):
    """A list of files, a folder and a glob: the rows of the files in order, numbered across them."""
    rows = _rows(30)
    (tmp_path / "parts").mkdir()
    a = _write_rows(tmp_path / "parts" / "a.parquet", rows[:10], "parquet")
    b = _write_rows(tmp_path / "parts" / "b.tsv.gz", rows[10:25], "tsv", "gz")
    c = _write_rows(tmp_path / "parts" / "c.jsonl", rows[25:], "jsonl")
    (tmp_path / "parts" / "_SUCCESS").write_text("")  # bookkeeping files are not list files
    ref = read_url_list(_write_rows(tmp_path / "all.parquet", rows, "parquet"), source="s")
    for spec in ([a, b, c], [str(a), str(b), str(c)], tmp_path / "parts", str(tmp_path / "parts" / "*")):
        got = read_url_list(spec, source="s")
        assert got.equals(ref), spec
    assert read_url_list(str(tmp_path / "parts" / "*.parquet"), source="s").equals(ref.slice(0, 10))
    assert [s.path for s in expand_sources([c, a])] == [str(c), str(a)], "a list keeps its order"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nothing-*.parquet", "matches no file"),
        ("empty-folder", "holds no list files"),
        (["a.parquet", "a.parquet"], "more than once"),
        (["a.parquet", "gone.csv"], "gone.csv does not exist"),
        ("a.parquet.gz", "compresses itself"),
    ],
)
def test_bad_url_inputs_fail_before_any_work(tmp_path, spec, match):
    _write_rows(tmp_path / "a.parquet", _rows(3), "parquet")
    (tmp_path / "a.parquet.gz").write_bytes(b"x")
    (tmp_path / "empty-folder").mkdir()
    spec = [str(tmp_path / s) for s in spec] if isinstance(spec, list) else str(tmp_path / spec)
    with pytest.raises(ConfigError, match=match):
        read_url_list(spec)


def test_check_columns_names_a_missing_extra_column_and_type_disagreements(tmp_path):
    a = tmp_path / "a.parquet"
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"url": ["http://h/1"], "caption": ["x"], "similarity": [0.5]}), a)
    pq.write_table(pa.table({"url": ["http://h/2"], "caption": ["y"], "similarity": ["high"]}), b)
    with pytest.raises(ConfigError, match=r"no column 'punsafe' \(download.extra_columns\)"):
        check_columns(expand_sources(a), "url", "caption", ["punsafe"])
    with pytest.raises(ConfigError, match="'similarity' is double in an earlier URL list file but string"):
        check_columns(expand_sources([a, b]), "url", "caption", ["similarity"])
    assert check_columns(expand_sources(a), "url", "caption", ["similarity"]) == {"similarity": pa.float64()}


def test_cli_takes_many_lists_and_refuses_a_missing_extra_column_before_any_work(tmp_path):
    a = _write_rows(tmp_path / "a.parquet", _rows(3), "parquet")
    b = _write_rows(tmp_path / "b.tsv.gz", _rows(3, 3), "tsv", "gz")
    out = tmp_path / "out"
    args = [
        "download",
        "--urls",
        str(a),
        "--urls",
        str(b),
        "--out",
        str(out),
        "--extra-columns",
        "[similarity]",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"URL list {a} has no column 'similarity' (download.extra_columns)" in result.output
    assert not out.exists()
