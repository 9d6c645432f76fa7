"""A cleaned shard, as the CapFilt stage writes it, reads as it is in pandas, DuckDB and Hugging Face
`datasets` (the README's snippets): the declared columns and types, every row, decodable images."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from capfilt.core import schema as S
from capfilt.core.layout import CLEANED_DIR
from capfilt.core.shards import write_parquet_atomic
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.capfilt.decisions import decide
from capfilt.stages.capfilt.inputs import _Plan
from capfilt.stages.capfilt.rethreshold import read_cleaned
from capfilt.stages.capfilt.score import unscored_batch
from capfilt.stages.capfilt.writer import _RunIds, write_web_shard

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only; set before `datasets` loads

N = 6


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (40 * i, 255 - 30 * i, 90)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory) -> tuple[Path, pa.Table]:
    """A download shard of N images plus one failed row, through the stage's own shard writer:
    web text and one synthetic caption per image, scored, half of them kept."""
    root = tmp_path_factory.mktemp("readers")
    uids = [S.make_uid("test", f"http://x/{i}.jpg", f"web text {i}") for i in range(N + 1)]
    sample = pa.table(
        {
            "uid": uids,
            "url": [f"http://x/{i}.jpg" for i in range(N + 1)],
            "text": [f"web text {i}" for i in range(N + 1)],
            "source": ["test"] * (N + 1),
            "row": list(range(N + 1)),
            "shard": [0] * (N + 1),
            "status": [S.SUCCESS] * N + [S.FAILED_TO_DOWNLOAD],
            "reason": [None] * N + ["HTTP Error 404"],
            "width": [16] * N + [None],
            "height": [12] * N + [None],
            "original_width": [16] * N + [None],
            "original_height": [12] * N + [None],
            "sha256": ["x"] * N + [None],
            "image": [_jpeg(i) for i in range(N)] + [None],
        }
    )
    shard = root / "download" / "00000.parquet"
    write_parquet_atomic(shard, S.conform(sample, S.SAMPLE))
    cfg = CapFiltConfig()
    batch = {
        "uid": uids[:N],
        "text": [f"web text {i}" for i in range(N)],
        "row": list(range(N)),
        "captions": [[f"a synthetic caption {i}"] for i in range(N)],
    }
    part = unscored_batch(batch, cfg)
    scores = np.linspace(0.1, 0.9, part.num_rows, dtype=np.float32)  # as a filter would give
    decisions = [decide(float(p), cfg.threshold) for p in scores]
    part = part.set_column(part.schema.get_field_index("itm_score"), "itm_score", pa.array(scores))
    part = part.set_column(part.schema.get_field_index("itc_score"), "itc_score", pa.array(scores - 0.5))
    part = part.set_column(
        part.schema.get_field_index("decision"), "decision", pa.array([d for d, _ in decisions])
    )
    part = part.set_column(
        part.schema.get_field_index("reason"), "reason", pa.array([r for _, r in decisions])
    )
    out = root / "capfilt"
    plan = _Plan("00000", shard, N + 1, N, {S.SUCCESS: N, S.FAILED_TO_DOWNLOAD: 1})
    part_file = root / "parts" / "00000-0.parquet"  # as write_parts leaves it for the shard writer
    write_parquet_atomic(part_file, part)
    write_web_shard(out, plan, [str(part_file)], _RunIds(1, "captioner-abc", "filter-def"), cfg, 0.0)
    table = read_cleaned(out)
    kept = int(pc.sum(pc.greater_equal(pa.array(scores), cfg.threshold)).as_py())
    assert table.num_rows == kept and 0 < kept < part.num_rows
    return out / CLEANED_DIR, table


def test_pandas(cleaned):
    import pandas as pd

    folder, table = cleaned
    df = pd.read_parquet(folder)
    assert list(df.columns) == S.CLEANED.names and len(df) == table.num_rows
    assert str(df["itm_score"].dtype) == "float32" and (df["itm_score"] >= 0.5).all()
    assert sorted(df["text_uid"]) == sorted(table.column("text_uid").to_pylist())
    assert set(df["text_source"]) == {"web", "synthetic"}
    assert Image.open(io.BytesIO(df["image"].iloc[0])).size == (16, 12)


def test_duckdb(cleaned):
    import duckdb

    folder, table = cleaned
    con = duckdb.connect()
    rows = con.execute(
        "SELECT text_source, count(*), min(itm_score), min(octet_length(image)) "
        "FROM read_parquet(?) GROUP BY text_source ORDER BY text_source",
        [str(folder / "*.parquet")],
    ).fetchall()
    by_source = {s: table.filter(pc.equal(table.column("text_source"), s)) for s in ("synthetic", "web")}
    assert [(r[0], r[1]) for r in rows] == [(s, t.num_rows) for s, t in by_source.items() if t.num_rows]
    assert all(r[2] >= 0.5 and r[3] > 0 for r in rows)
    described = con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(folder / "*.parquet")]).fetchall()
    types = {r[0]: r[1] for r in described}  # column_name, column_type, null, key, default, extra
    assert types["itm_score"] == "FLOAT" and types["image"] == "BLOB" and types["round"] == "INTEGER"


def test_hugging_face_datasets(cleaned, tmp_path):
    import datasets

    folder, table = cleaned
    ds = datasets.load_dataset(
        "parquet", data_files=str(folder / "*.parquet"), split="train", cache_dir=str(tmp_path)
    )
    assert ds.num_rows == table.num_rows and ds.column_names == S.CLEANED.names
    assert ds.features["itm_score"].dtype == "float32" and ds.features["image"].dtype == "binary"
    row = ds[0]
    assert row["text_uid"] in set(table.column("text_uid").to_pylist())
    assert Image.open(io.BytesIO(row["image"])).size == (16, 12)
