"""Reading URL lists in the formats users have, and failing early on bad ones."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.errors import ConfigError
from capfilt.schema import WEB_PAIR
from capfilt.urllist import read_url_list

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


BAD_LISTS = {
    "missing.parquet": (None, "does not exist"),
    "empty.csv": ("", "empty"),
    "header-only.csv": ("url,caption\n", "no rows"),
    "list.txt": ("http://h/1.jpg\n", "extension"),
}


@pytest.mark.parametrize("name", sorted(BAD_LISTS))
def test_bad_url_lists_fail_with_a_message(tmp_path, name):
    content, match = BAD_LISTS[name]
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=match):
        read_url_list(tmp_path / name)


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
