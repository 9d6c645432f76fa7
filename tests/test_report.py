"""Tests of the run report: every section renders from a run folder's files, every text from data is
escaped, the audit grids hold the images of their score bin and category, sampled reproducibly, the
page needs no network (every image a file beside it), and the summary tables read right."""

from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from capfilt.core import schema as S
from capfilt.core.shards import write_json_atomic
from capfilt.eval.report import SECTIONS, flatten, round_rows, summary_table, write_report
from capfilt.eval.report_audit import BINS, audit_images, bin_of, borderline
from capfilt.eval.report_inputs import requested_resources, stage_runs
from capfilt.eval.report_plots import pr_curve

SCRIPT = "<script>alert('pwned')</script>"
THRESHOLD = 0.5
N_IMAGES = 80


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, "JPEG")
    return buf.getvalue()


def _web_score(i: int) -> float:
    return float((i * 37 % N_IMAGES) / N_IMAGES + 0.003)  # spread over 0..1, not in image order


def _syn_score(i: int) -> float:
    return float((i * 11 % N_IMAGES) / N_IMAGES + 0.001)


def _candidates(n: int = N_IMAGES) -> pa.Table:
    """n images, each a web text and a synthetic caption decided at THRESHOLD, with a truth column;
    image 2 also has a human caption (kept unscored)."""
    rows = []
    for i in range(n):
        uid = f"img{i:03d}"
        for source, score in (("web", _web_score(i)), ("synthetic", _syn_score(i))):
            keep = score >= THRESHOLD
            text = f"{source} text {i} & <b>bold</b>"
            if i == 1 and source == "web":
                text = SCRIPT
            rows.append(
                {
                    "uid": uid,
                    "text_uid": f"{uid}-{source}",
                    "text": text,
                    "text_source": source,
                    "itm_score": score,
                    "itc_score": score / 2,
                    "decision": "keep" if keep else "drop",
                    "reason": None if keep else "itm below threshold <img src=x onerror=alert(1)>",
                    "round": 1,
                    # True more often at high scores, but not always: both classes at every level.
                    "truth": None if i == 3 else bool((score > 0.4) ^ (i % 5 == 0)),
                }
            )
    rows.append(
        {
            "uid": "img002",
            "text_uid": "img002-h",
            "text": "a human caption",
            "text_source": "human",
            "itm_score": None,
            "decision": "keep",
            "reason": "human pair (kept unscored)",
            "round": 1,
            "truth": True,
        }
    )
    cols = {
        f.name: pa.array([r.get(f.name, 0 if pa.types.is_integer(f.type) else None) for r in rows], f.type)
        for f in S.CANDIDATE
    }
    table = pa.Table.from_pydict(cols, schema=S.CANDIDATE)
    return table.append_column("truth", pa.array([r["truth"] for r in rows], pa.bool_()))


def _samples(n: int = N_IMAGES) -> pa.Table:
    """SAMPLE-like rows: every image downloaded (image 5's bytes broken), plus failed rows whose
    URLs and reasons hold markup."""
    uids = [f"img{i:03d}" for i in range(n)]
    images: list[bytes | None] = [_jpeg((3 * i % 255, 100, 200)) for i in range(n)]
    images[5] = b"not an image"
    failed = [
        (
            "bad0",
            'http://x.test/a.jpg?q="><script>alert(1)</script>',
            "failed_to_download",
            "HTTP Error 404: Not Found",
        ),
        ("bad1", "http://x.test/b.jpg", "failed_to_download", "HTTP Error 404: Not Found"),
        ("bad2", "http://x.test/c.jpg", "duplicate", "same url and text as an earlier row (uid img000)"),
    ]
    return pa.table(
        {
            "uid": uids + [f[0] for f in failed],
            "url": [f"http://x.test/{u}.jpg" for u in uids] + [f[1] for f in failed],
            "status": ["success"] * n + [f[2] for f in failed],
            "reason": [None] * n + [f[3] for f in failed],
            "image": images + [None] * len(failed),
        }
    )


ROUNDS = {
    "round1": {"retrieval": {"r1_t2i": 10.0, "r1_i2t": 12.5, "r5_t2i": 30.0}, "captioning": {"bleu4": 5.0}},
    "round2": {"retrieval": {"r1_t2i": 14.0, "r1_i2t": 12.0, "r5_t2i": 33.0}, "captioning": {"bleu4": 6.5}},
}
QUALITY = {
    "noise_before": 0.45,
    "noise_after": 0.125,
    "noise_after_web": 0.1,
    "filter_web": {"precision": 0.9, "roc_auc": 0.93},
}


def _run_folder(root: Path) -> Path:
    """A run folder as the runner leaves it: _run.json and the manifests of download and CapFilt."""
    run = root / "run"
    write_json_atomic(
        run / "_run.json", {"name": "t", "stages": ["world", "download", "capfilt", "evaluate"]}
    )
    download = {
        "rows_in": N_IMAGES + 3,
        "downloaded": N_IMAGES,
        "status_counts": {"success": N_IMAGES, "failed_to_download": 2, "duplicate": 1},
        "reason_counts": {
            "failed_to_download: HTTP Error 404: Not Found": 2,
            "duplicate: same url and text as an earlier row": 1,
        },
        "shards_failed": {"3": f"RayTaskError {SCRIPT}"},
    }
    write_json_atomic(
        run / "_stages" / "download.json",
        {"stage": "download", "status": "done", "wall_s": 41.5, "result": download, "config": {}},
    )
    capfilt = {
        "images": N_IMAGES,
        "images_no_kept_text": 7,
        "texts_considered": {"web": N_IMAGES, "synthetic": N_IMAGES, "human": 1},
        "kept": {"web": 40, "synthetic": 40, "human": 1},
    }
    config = {"captioner_actors": 2, "filter_actors": 1, "cpus_per_actor": 0.5, "gpus_per_actor": 1.0}
    write_json_atomic(
        run / "_stages" / "capfilt.json",
        {"stage": "capfilt", "status": "done", "wall_s": 7200.0, "result": capfilt, "config": config},
    )
    write_json_atomic(run / "_stages" / "evaluate.json", {"stage": "evaluate", "status": "running"})
    return run


def _write(tmp_path: Path, **kw: Any) -> tuple[Path, str]:
    run = _run_folder(tmp_path)
    samples = _samples()
    args: dict[str, Any] = {
        "title": f"demo {SCRIPT}",
        "stages": {"download <i>": {"rows_in": 20, "note": SCRIPT}},
        "rounds": ROUNDS,
        "capfilt": QUALITY,
        "candidates": _candidates(),
        "images": samples,
        "samples": samples,
        "threshold": THRESHOLD,
        "per_bin": 3,
    }
    out = write_report(run, "evaluate/report.html", **(args | kw))
    return out, out.read_text(encoding="utf-8")


# ================================================================================== rendering


def test_every_section_renders_from_the_run_folder(tmp_path: Path):
    out, page = _write(tmp_path)
    assert out == tmp_path / "run" / "evaluate" / "report.html"
    for key, heading in SECTIONS:
        assert f'<section id="{key}"><h2>{heading}</h2>' in page
        assert f'href="#{key}"' in page  # the contents line
    # The headline: human-named numbers from the manifests, with their units.
    assert "Rows in" in page and f"{N_IMAGES + 3:,}" in page
    assert "45.0 % → 12.5 %" in page  # false pairs before -> after
    assert "<h3>Texts kept by source</h3>" in page and "<td>synthetic</td>" in page
    assert "<h3>Round 1 vs round 2</h3>" in page and "+4.00" in page  # R@1 text->image, round 2 - round 1
    # Cost: capfilt ran 2 h on (2 + 1) actors x (0.5 CPU, 1 GPU) + 1 preprocessing CPU.
    capfilt_row = re.search(r"<tr><td>capfilt</td>(.*?)</tr>", page)
    assert capfilt_row is not None
    cells = re.findall(r"<td[^>]*>(.*?)</td>", capfilt_row.group(1))
    assert cells[:2] == ["done", "2.00 h"] and "2.5 CPU, 3 GPU" in cells and cells[-2:] == ["5.00", "6.00"]
    assert (
        "0.0111 images/s" in cells and '<td class="num">2.0 rows/s</td>' in page
    )  # 80 / 7200 s, 83 / 41.5 s
    # The threshold: both figures, and the figures at the threshold.
    files = out.parent / "report_files"
    for name in ("itm_by_source.png", "precision_recall.png"):
        with Image.open(files / name) as im:
            im.verify()
            assert im.format == "PNG"
        assert f'src="report_files/{name}"' in page
    # What is removed: the borderline list, and one grid per category.
    assert "Borderline: the 50 web texts scored nearest the threshold 0.5" in page
    for category in ("kept_web", "replaced", "all_dropped"):
        assert f'id="grid-{category}"' in page
    # Failures: download reasons with example URLs, the failed shard, CapFilt's reasons by source.
    assert "<h3>Download: rows not downloaded, by reason</h3>" in page and "http://x.test/b.jpg" in page
    assert "<h3>download: shards that failed every attempt</h3>" in page
    assert "<h3>CapFilt: texts by reason</h3>" in page and "human pair (kept unscored)" in page
    # The duplicate's sample reason names a uid; the counted reason does not: matched by prefix.
    assert "http://x.test/c.jpg" in page
    # The raw JSON, linked, strict, with what the page shows.
    assert 'href="report_files/report.json"' in page
    raw = json.loads((files / "report.json").read_text())
    assert raw["stages"]["capfilt"]["wall_s"] == 7200.0 and raw["capfilt"]["noise_before"] == 0.45
    assert "<h3>download &lt;i&gt;</h3>" in page  # the stage tables, under Stage details


def test_every_text_from_data_is_escaped(tmp_path: Path):
    _, page = _write(tmp_path)
    # Nothing from data is live markup: no script tag at all (the page has none of its own).
    assert "<script" not in page.lower()
    assert (
        "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in page
    )  # a web text, the title, a stage value
    assert "<img src=x" not in page and "<b>bold</b>" not in page and "<i>" not in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "download &lt;i&gt;" in page
    assert "itm below threshold &lt;img src=x onerror=alert(1)&gt;" in page
    assert "a.jpg?q=&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page  # an example URL
    assert "RayTaskError &lt;script&gt;" in page  # a failed shard's error


class _Tags(HTMLParser):
    """Every tag with its attributes, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def _tags(page: str) -> list[tuple[str, dict[str, str]]]:
    parser = _Tags()
    parser.feed(page)
    return parser.tags


def test_the_page_opens_with_no_network(tmp_path: Path):
    out, page = _write(tmp_path)
    tags = _tags(page)
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed")]
    assert "@import" not in page and "url(" not in page  # the inline CSS loads nothing
    images = [a["src"] for t, a in tags if t == "img"]
    assert len(images) > 50  # figures and thumbnails
    for src in images:
        assert not re.match(r"^([a-z]+:|//)", src), src  # relative: no http(s), no data: either
        assert (out.parent / src).is_file(), src
    for _, a in tags:
        href = a.get("href")
        if href is None:
            continue
        assert not re.match(r"^([a-z]+:|//)", href), href
        assert href.startswith("#") or (out.parent / href).is_file(), href
    ids = {a["id"] for _, a in tags if "id" in a}
    assert {h[1:] for _, a in tags if (h := a.get("href", "")).startswith("#")} <= ids
    # The broken image of img005 shows a placeholder where it is shown, never a broken file.
    assert "no image" in page or "img005" not in page


# ================================================================================ the audit


class _Grid(HTMLParser):
    """(category, bin label, bin count, [card uids]) of every bin row of the grids."""

    def __init__(self) -> None:
        super().__init__()
        self.category = ""
        self.rows: list[tuple[str, str, int, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "data-category" in a:
            self.category = a["data-category"]
        elif "data-bin" in a:
            self.rows.append((self.category, a["data-bin"], int(a["data-count"]), []))
        elif a.get("class") == "card":
            self.rows[-1][3].append(a["data-uid"])


def _truth_of_grids(candidates: pa.Table) -> dict[str, tuple[float, str]]:
    """uid -> (web ITM, category), computed here from the decisions, not by the report's code."""
    rows = candidates.to_pylist()
    out = {}
    for uid in {r["uid"] for r in rows}:
        mine = [r for r in rows if r["uid"] == uid]
        web = next(r for r in mine if r["text_source"] == "web")
        if web["decision"] == "keep":
            cat = "kept_web"
        elif any(r["decision"] == "keep" for r in mine):
            cat = "replaced"
        else:
            cat = "all_dropped"
        out[uid] = (web["itm_score"], cat)
    return out


def test_stratified_grids_hold_the_right_bins(tmp_path: Path):
    candidates = _candidates()
    _, page = _write(tmp_path, per_bin=3)
    grid = _Grid()
    grid.feed(page)
    truth = _truth_of_grids(candidates)
    labels = [f"{lo:.1f}-{hi:.1f}" for lo, hi in BINS]
    assert [(c, b) for c, b, _, _ in grid.rows] == [
        (c, b) for c in ("kept_web", "replaced", "all_dropped") for b in labels
    ]
    shown = 0
    for category, label, count, uids in grid.rows:
        lo, hi = (float(x) for x in label.split("-"))
        in_cell = [u for u, (s, c) in truth.items() if c == category and lo <= s < hi + (hi == 1.0)]
        assert count == len(in_cell), (category, label)
        assert len(uids) == min(3, count) and len(set(uids)) == len(uids)
        for uid in uids:
            score, cat = truth[uid]
            assert cat == category and lo <= score < hi, (uid, score, category, label)
        shown += len(uids)
    assert shown >= 20  # the fixture fills most cells

    # Reproducible: the same seed shows the same images; another seed, others.
    def cards(page: str) -> list[str]:
        return re.findall(r'class="card" data-uid="([^"]+)"', page)

    assert cards(page) == cards(_write(tmp_path / "again", per_bin=3)[1])
    assert cards(page) != cards(_write(tmp_path / "seed1", per_bin=3, seed=1)[1])


def test_borderline_is_the_nearest_web_texts_in_score_order():
    images = audit_images(_candidates())
    near = borderline(images, THRESHOLD, 10)
    scores = [im.web_score for im in near]
    assert scores == sorted(scores) and len(near) == 10
    farthest = max(abs(s - THRESHOLD) for s in scores)
    assert all(abs(im.web_score - THRESHOLD) >= farthest for im in images if im not in near)
    assert bin_of(0.0) == 0 and bin_of(0.2) == 1 and bin_of(0.999) == 4 and bin_of(1.0) == 4


def test_precision_recall_against_the_kept_fraction_on_hand_arrays():
    # Scores 0.9 (true), 0.8 (false), 0.8 (true), 0.3 (false): keeping >= 0.8 keeps 3 of 4, 2 true.
    c = pr_curve("web", [0.9, 0.8, 0.8, 0.3], [True, False, True, False])
    assert c.thresholds.tolist() == [0.9, 0.8, 0.3]
    assert c.kept.tolist() == [0.25, 0.75, 1.0]
    assert c.precision.tolist() == pytest.approx([1.0, 2 / 3, 0.5])
    assert c.recall.tolist() == [0.5, 1.0, 1.0]
    assert c.at(0.85) == (0.25, 1.0, 0.5) and c.at(0.8) == pytest.approx((0.75, 2 / 3, 1.0))
    assert c.at(0.95) == (0.0, None, 0.0)
    with pytest.raises(ValueError, match="at least one true"):
        pr_curve("web", [0.1], [False])


def test_resources_and_stage_runs_from_manifests(tmp_path: Path):
    run = _run_folder(tmp_path)
    runs = stage_runs(run)
    assert [r.name for r in runs] == ["download", "capfilt", "evaluate"]
    assert runs[1].cpu_hours == pytest.approx(5.0) and runs[1].gpu_hours == pytest.approx(6.0)
    assert runs[0].resources is None  # a download sized to the cluster says nothing
    train = {"fixed": {}, "train": {"steps": 5, "batch_size": 8, "num_workers": 2, "use_gpu": True}}
    assert requested_resources(train) == (2.0, 2.0)
    assert requested_resources({"download": {"cpus_per_task": 0.5, "concurrency": 8}}) == (4.0, 0.0)


def test_report_without_candidates_or_ground_truth(tmp_path: Path):
    out = write_report(tmp_path, tmp_path / "r" / "only_rounds.html", rounds=ROUNDS)
    page = out.read_text(encoding="utf-8")
    assert "R@1 text-&gt;image" in page and page.count("no CapFilt round in this run") == 2
    assert [p.name for p in (tmp_path / "r" / "only_rounds_files").iterdir()] == ["report.json"]

    no_truth = _candidates().drop_columns(["truth"])
    out = write_report(tmp_path, "no_truth.html", candidates=no_truth)
    page = out.read_text(encoding="utf-8")
    assert "no ground truth: precision and recall" in page
    assert sorted(p.name for p in (tmp_path / "no_truth_files").iterdir()) == [
        "itm_by_source.png",
        "report.json",
    ]
    assert 'id="grid-replaced"' in page and "no image" in page  # no images given: placeholders
    with pytest.raises(ValueError, match="decision"):
        write_report(tmp_path, "bad.html", candidates=no_truth.drop_columns(["decision"]))


# ============================================================================== summary tables


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


def test_thumbnails_are_small_pngs(tmp_path: Path):
    out, page = _write(tmp_path)
    thumbs = sorted((out.parent / "report_files" / "thumbs").glob("*.png"))
    assert thumbs and len(thumbs) == len(set(re.findall(r'src="(report_files/thumbs/[^"]+)"', page)))
    with Image.open(thumbs[0]) as im:
        assert im.format == "PNG" and max(im.size) <= 128
    assert np.isfinite(json.loads((out.parent / "report_files" / "report.json").read_text())["threshold"])
