"""Tests of the run report: it renders with valid PNGs and thumbnails, escapes every text from data,
and the summary tables read right."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from capfilt.core import schema as S
from capfilt.eval.report import example_uids, flatten, round_rows, summary_table, write_report

SCRIPT = "<script>alert('pwned')</script>"


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, "JPEG")
    return buf.getvalue()


def _candidates() -> pa.Table:
    rows = []
    for i in range(10):
        uid = f"img{i:02d}"
        web_keep = i % 2 == 0
        rows.append(
            {
                "uid": uid,
                "text_uid": f"{uid}-w",
                "text": SCRIPT if i == 1 else f"web text {i} & <b>bold</b>",
                "text_source": "web",
                "itm_score": 0.8 if web_keep else 0.2,
                "itc_score": 0.3,
                "decision": "keep" if web_keep else "drop",
                "reason": None if web_keep else "itm < 0.5 <img src=x onerror=alert(1)>",
                "round": 1,
                "truth": web_keep,
            }
        )
        rows.append(
            {
                "uid": uid,
                "text_uid": f"{uid}-s",
                "text": f"a red circle number {i}",
                "text_source": "synthetic",
                "itm_score": 0.65,
                "itc_score": 0.4,
                "decision": "keep",
                "reason": None,
                "round": 1,
                "truth": None if i == 3 else True,
            }
        )
    cols = {
        f.name: pa.array([r.get(f.name, 0 if pa.types.is_integer(f.type) else None) for r in rows], f.type)
        for f in S.CANDIDATE
    }
    table = pa.Table.from_pydict(cols, schema=S.CANDIDATE)
    return table.append_column("truth", pa.array([r["truth"] for r in rows], pa.bool_()))


ROUNDS = {
    "round1": {"retrieval": {"r1_t2i": 10.0, "r1_i2t": 12.5, "r5_t2i": 30.0}, "captioning": {"bleu4": 5.0}},
    "round2": {"retrieval": {"r1_t2i": 14.0, "r1_i2t": 12.0, "r5_t2i": 33.0}, "captioning": {"bleu4": 6.5}},
}


def test_report_renders_plots_thumbnails_and_escapes_data(tmp_path: Path):
    candidates = _candidates()
    images = {f"img{i:02d}": _jpeg((20 * i, 100, 200)) for i in range(10)}
    images["img02"] = b"not an image"  # a broken image gives a placeholder, not a failure
    stages = {
        "download <i>": {"rows_in": 20, "status_counts": {"success": 18, "failed_to_download": 2}},
        "capfilt": {"kept": 15, "note": SCRIPT},
    }
    capfilt = {"noise_before": 0.45, "noise_after": 0.12, "filter_web": {"precision": 0.9, "roc_auc": 0.93}}
    out = write_report(
        tmp_path / "run",
        "report.html",
        title=f"demo {SCRIPT}",
        stages=stages,
        rounds=ROUNDS,
        capfilt=capfilt,
        candidates=candidates,
        images=images,
        n_examples=4,
    )
    assert out == tmp_path / "run" / "report.html" and out.is_file()
    page = out.read_text(encoding="utf-8")

    # Nothing from data is live markup: no script tag at all (the page has none of its own).
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "<b>bold</b>" not in page and "<i>" not in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "download &lt;i&gt;" in page

    plots = sorted((tmp_path / "run" / "report_files").glob("*.png"))
    assert [p.name for p in plots] == ["itm_by_source.png", "itm_by_truth.png"]
    for p in plots:
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG"
        assert f'src="report_files/{p.name}"' in page

    # Thumbnails are embedded; the broken image shows a placeholder if it was picked.
    assert page.count('src="data:image/png;base64,') >= 3
    picked = example_uids(candidates, 4)
    assert len(picked["kept"]) == 4 and len(picked["removed"]) == 4
    assert ("no image" in page) == ("img02" in picked["kept"])
    for section in ("Rounds", "CapFilt quality", "Stages", "ITM scores", "Web text kept", "Web text removed"):
        assert f">{section}<" in page
    assert "+4.00" in page  # round 2 - round 1 for R@1 text->image


def test_report_without_candidates_or_ground_truth(tmp_path: Path):
    out = write_report(tmp_path, tmp_path / "r" / "only_rounds.html", rounds=ROUNDS)
    page = out.read_text(encoding="utf-8")
    assert "R@1 text-&gt;image" in page and "ITM scores" not in page
    assert list((tmp_path / "r" / "only_rounds_files").iterdir()) == []

    no_truth = _candidates().drop_columns(["truth"])
    out = write_report(tmp_path, "no_truth.html", candidates=no_truth)
    page = out.read_text(encoding="utf-8")
    assert "ITM scores by ground truth are not shown" in page
    assert [p.name for p in (tmp_path / "no_truth_files").iterdir()] == ["itm_by_source.png"]
    with pytest.raises(ValueError, match="decision"):
        write_report(tmp_path, "bad.html", candidates=no_truth.drop_columns(["decision"]))


def test_report_takes_images_from_sample_rows(tmp_path: Path):
    candidates = _candidates()
    samples = pa.table({"uid": [f"img{i:02d}" for i in range(10)], "image": [_jpeg((200, 0, 0))] * 10})
    page = write_report(tmp_path, "r.html", candidates=candidates, images=samples, n_examples=2).read_text()
    assert page.count('src="data:image/png;base64,') == 4


def test_round_rows_and_summary_table():
    rows = round_rows(ROUNDS)
    assert [r["metric"] for r in rows] == ["R@1 text->image", "R@5 text->image", "R@1 image->text", "BLEU-4"]
    assert rows[0] == {"metric": "R@1 text->image", "round1": 10.0, "round2": 14.0, "change": 4.0}
    # Flat dicts (as in benchmarks/results/demo.json) match by the key's last part.
    flat = round_rows({"a": {"r1_t2i": 1.0, "noise_after": 0.2}})
    assert flat == [
        {"metric": "R@1 text->image", "a": 1.0},
        {"metric": "noise after CapFilt", "a": 0.2},
    ]

    text = summary_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "round1", "round2", "change"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split()[-3:] == ["10.00", "14.00", "4.00"]
    assert lines[3].endswith("3.00")  # numbers right-aligned
    assert "-0.500" in text  # R@1 image->text fell by half a point
    assert summary_table([]) == "(no results)"
    assert summary_table([{"a": None, "b": "x"}]).splitlines()[2].split() == ["-", "x"]


def test_flatten_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_example_grids_prefer_images_with_a_web_text():
    import pyarrow as pa

    from capfilt.eval.report import example_uids

    rows = [
        ("h1", "human", "keep"),
        ("h2", "human", "keep"),
        ("w1", "web", "keep"),
        ("w1", "synthetic", "drop"),
    ]
    rows += [("w2", "web", "drop"), ("w3", "web", "keep")]
    table = pa.table(
        {k: list(v) for k, v in zip(("uid", "text_source", "decision"), zip(*rows, strict=True), strict=True)}
    )
    assert example_uids(table, n=2) == {"kept": ["w1", "w3"], "removed": ["w2"]}
    kept = example_uids(table, n=3)["kept"]
    assert {"w1", "w3"} < set(kept) and len(kept) == 3  # then a human-only image fills the grid
