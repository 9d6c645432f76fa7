"""The dedup stage and CapFilt's dedup before captioning, on a tiny world with near duplicates of
known truth (its side table's duplicate_of / duplicate_transform) and the tiny random models:
the embeddings table, the pure core, rows conserved, every removed row explained, exact
duplicates always found, pretrain2 on dedup/cleaned, and duplicates never captioned."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from capfilt.core import schema as S
from capfilt.core.layout import CANDIDATES_DIR, CLEANED_DIR, DEDUP_BEFORE, EMBEDDINGS_DIR, REMOVED_DIR
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.capfilt.driver import run_capfilt
from capfilt.stages.dedup import DedupConfig, find_duplicates, run_dedup
from capfilt.stages.download import DownloadConfig, read_samples, run_download

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = CapFiltConfig(k=1, max_length=10, min_length=5, batch_size=16)
DOWNLOAD = DownloadConfig(
    image_size=64, shard_size=40, thread_count=8, timeout=5, source="shapes", url_policy="allow_loopback"
)
# A random model embeds every shapes image within ~0.01 of every other (cosine ~0.99), so the
# tests' near threshold is close to 1; benchmarks/dedup.py measures a trained filter's.
NEAR = 0.9995


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dup_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from capfilt.world import WorldConfig, make_world

    out = tmp_path_factory.mktemp("dup_world")
    make_world(
        out, WorldConfig(seed=5, n_web=80, n_human=6, n_test=6, near_duplicate_rate=0.25, bad_rate=0.05)
    )
    return out


@pytest.fixture(scope="module")
def downloaded(ray_local, dup_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from capfilt.world import WorldServer, write_url_list

    out = tmp_path_factory.mktemp("dup_dl") / "download"
    with WorldServer(dup_world) as server:
        urls = write_url_list(dup_world, server.base_url, dup_world / "urls.parquet")
        run_download(urls, out, DOWNLOAD, progress=False)
    return out


@pytest.fixture(scope="module")
def models(dup_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from capfilt.testing import tiny_models

    return tiny_models(dup_world, tmp_path_factory.mktemp("dup_models"))


@pytest.fixture(scope="module")
def capfilt_dir(downloaded, models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dup_capfilt") / "capfilt"
    run_capfilt(downloaded, out, models["captioner"], models["filter"], CFG)
    return out


@pytest.fixture(scope="module")
def dedup_dir(capfilt_dir, downloaded, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dup_dedup") / "dedup"
    return out, run_dedup(capfilt_dir, downloaded, out, DedupConfig(min_cosine=NEAR))


def _read(d: Path, schema: pa.Schema) -> pa.Table:
    files = sorted(d.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f, schema=schema) for f in files]) if files else S.empty(schema)


def _truth(world: Path, samples: pa.Table) -> dict[str, str]:
    """uid -> uid of its original, for the world's near duplicates that downloaded."""
    labels = pq.read_table(world / "web_labels.parquet").to_pylist()
    uid_of = {r["row"]: r["uid"] for r in samples.to_pylist() if r["status"] == S.SUCCESS}
    return {
        uid_of[r["row"]]: uid_of[r["duplicate_of"]]
        for r in labels
        if r["duplicate_of"] is not None and r["row"] in uid_of and r["duplicate_of"] in uid_of
    }


# ----------------------------------------------------------------------------- the core


def test_find_duplicates_keeps_the_best_scored_and_says_why() -> None:
    e = np.eye(4, dtype=np.float32)
    vectors = [e[0], e[0] * 0.98 + e[1] * 0.2, e[2], e[2], e[3], None]
    images = pa.table(
        {
            "uid": ["a", "b", "c", "d", "e", "f"],
            "sha256": ["h1", "h2", "h3", "h3", "h4", "h4"],  # c, d and e, f: identical bytes
            "embedding": pa.array(vectors, pa.list_(pa.float32())),
            "score": [0.2, 0.9, None, 0.1, 0.5, 0.7],
        }
    )
    out = {r["uid"]: r for r in find_duplicates(images, 0.95).to_pylist()}
    # a ~ b (cosine 0.98): b has the better score; c == d by bytes: d scores, c does not; e == f by
    # bytes although f has no embedding.
    assert set(out) == {"a", "c", "e"}
    assert out["a"]["duplicate_of"] == "b" and out["a"]["reason"] == S.NEAR_DUPLICATE
    assert out["a"]["cosine"] == pytest.approx(0.98 / np.hypot(0.98, 0.2), abs=1e-6)
    assert out["c"] == {"uid": "c", "reason": S.EXACT_DUPLICATE, "duplicate_of": "d", "cosine": 1.0}
    assert out["e"]["duplicate_of"] == "f" and out["e"]["cosine"] is None
    # Exact only: the near pair stays; a threshold above their cosine keeps it too.
    assert set(find_duplicates(images, 0.95, near=False).column("uid").to_pylist()) == {"c", "e"}
    assert set(find_duplicates(images, 0.99).column("uid").to_pylist()) == {"c", "e"}


# --------------------------------------------------------------------- the embeddings table


def test_the_filter_writes_one_unit_embedding_per_scored_image(capfilt_dir, downloaded, models):
    from capfilt.stages.capfilt.embed import image_features, vectors_of
    from capfilt.stages.capfilt.models import load_model, resolve_model
    from capfilt.stages.capfilt.pixels import pixel_column, preprocess_batch

    emb = _read(capfilt_dir / EMBEDDINGS_DIR, S.EMBEDDING)
    for f in (capfilt_dir / EMBEDDINGS_DIR).glob("*.parquet"):
        assert pq.read_schema(f) == S.EMBEDDING
    cands = _read(capfilt_dir / CANDIDATES_DIR, S.CANDIDATE)
    scored = cands.filter(
        pc.and_(pc.equal(cands.column("text_source"), "web"), pc.is_valid(cands.column("itm_score")))
    )
    assert sorted(emb.column("uid").to_pylist()) == sorted(scored.column("uid").to_pylist())
    ref = resolve_model(models["filter"], "filter")
    assert set(emb.column("model_id").to_pylist()) == {ref.model_id}
    vectors = vectors_of(emb.column("embedding"))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    # They are the filter's ITC image features of those images, to float16 precision.
    samples = read_samples(downloaded, ["uid", "status", "text", "image"])
    by_uid = {r["uid"]: r for r in samples.to_pylist()}
    uids = emb.column("uid").to_pylist()[:8]
    raw = {
        "uid": np.asarray(uids, dtype=object),
        "text": np.asarray([by_uid[u]["text"] for u in uids], dtype=object),
        "image": np.asarray([by_uid[u]["image"] for u in uids], dtype=object),
    }
    filt = load_model(ref, "filter", CFG)
    want = image_features(filt, preprocess_batch(raw, [ref.image_size])[pixel_column(ref.image_size)])
    np.testing.assert_allclose(vectors[:8], want, atol=2e-3)


# ------------------------------------------------------------------------------ the stage


def test_rows_are_conserved_and_every_removed_row_names_a_kept_image(capfilt_dir, dedup_dir):
    out, summary = dedup_dir
    before = _read(capfilt_dir / CLEANED_DIR, S.CLEANED)
    kept = _read(out / CLEANED_DIR, S.CLEANED)
    removed = _read(out / REMOVED_DIR, S.REMOVED)
    for f in (out / REMOVED_DIR).glob("*.parquet"):
        assert pq.read_schema(f).remove_metadata() == S.REMOVED
    assert kept.num_rows + removed.num_rows == before.num_rows == summary["rows_in"]
    assert sorted(kept.column("text_uid").to_pylist() + removed.column("text_uid").to_pylist()) == sorted(
        before.column("text_uid").to_pylist()
    )
    assert removed.num_rows > 0 and summary["images_removed"] == len(set(removed.column("uid").to_pylist()))
    kept_uids = set(kept.column("uid").to_pylist())
    for row in removed.to_pylist():
        assert row["reason"] in S.DEDUP_REASONS
        assert row["duplicate_of"] in kept_uids and row["uid"] not in kept_uids
        assert row["image"], "a removed row keeps its image: nothing is lost"
    # The removed rows are the cleaned rows as they were, plus why.
    as_was = {r["text_uid"]: r for r in before.to_pylist()}
    for row in removed.select(S.CLEANED.names).to_pylist():
        assert row == as_was[row["text_uid"]]


def test_exact_duplicates_are_always_found(capfilt_dir, downloaded, dedup_dir):
    out, _ = dedup_dir
    samples = read_samples(downloaded, ["uid", "sha256", "status"])
    sha = dict(zip(samples.column("uid").to_pylist(), samples.column("sha256").to_pylist(), strict=True))
    cleaned = set(_read(capfilt_dir / CLEANED_DIR, S.CLEANED).column("uid").to_pylist())
    kept = set(_read(out / CLEANED_DIR, S.CLEANED).column("uid").to_pylist())
    by_hash: dict[str, set[str]] = {}
    for u in cleaned:
        by_hash.setdefault(sha[u], set()).add(u)
    groups = [g for g in by_hash.values() if len(g) > 1]
    assert groups, "the world has exact duplicates among the cleaned images"
    for g in groups:
        assert len(g & kept) == 1, f"one image of each identical-bytes group stays: {g}"
    removed = _read(out / REMOVED_DIR, S.REMOVED).to_pylist()
    for r in removed:
        if r["reason"] == S.EXACT_DUPLICATE:
            assert sha[r["uid"]] == sha[r["duplicate_of"]]


def test_a_rerun_skips_done_shards_and_another_setting_is_refused(capfilt_dir, downloaded, dedup_dir):
    from capfilt.core.errors import ConfigError

    out, summary = dedup_dir
    before = {p.name: p.read_bytes() for p in (out / CLEANED_DIR).glob("*.parquet")}
    again = run_dedup(capfilt_dir, downloaded, out, DedupConfig(min_cosine=NEAR))
    assert {p.name: p.read_bytes() for p in (out / CLEANED_DIR).glob("*.parquet")} == before
    assert again["rows_removed"] == summary["rows_removed"]
    with pytest.raises(ConfigError, match="other inputs or settings"):
        run_dedup(capfilt_dir, downloaded, out, DedupConfig(min_cosine=0.5))


def test_pretrain2_trains_on_dedup_cleaned_when_the_recipe_dedups(tmp_path, monkeypatch):
    from capfilt.core.stage import StageContext
    from capfilt.pipeline.recipe import load_recipe
    from capfilt.pipeline.runner import Run
    from capfilt.stages import pretrain

    def recipe(stages):
        path = tmp_path / "r.yaml"
        path.write_text(
            json.dumps(
                {
                    "name": "r",
                    "out": str(tmp_path / "run"),
                    "stages": stages,
                    "world": {},
                    "pretrain": {"steps": 2},
                }
            )
        )
        return load_recipe(path, check_paths=False)

    seen: list = []
    monkeypatch.setattr(
        pretrain, "train", lambda ctx, section, data, out, name, **kw: seen.append(data) or {}
    )
    run_dir = tmp_path / "run" / "_stages"
    run_dir.mkdir(parents=True)
    (run_dir / "pretrain.json").write_text(json.dumps({"key": "k", "result": {"tokenizer_dir": "tok"}}))
    for stages, data_stage in (
        (["capfilt", "dedup", "pretrain2"], "dedup"),
        (["capfilt", "pretrain2"], "capfilt"),
    ):
        rec = recipe(stages)
        assert data_stage in pretrain.PRETRAIN2.upstream(rec)
        pretrain.PRETRAIN2.run(StageContext(Run(rec), tmp_path / "run" / "pretrain2", False))
        assert seen[-1] == [{"path": str(tmp_path / "run" / data_stage / CLEANED_DIR)}]
    from capfilt.core.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="list dedup before pretrain2"):
        recipe(["capfilt", "pretrain2", "dedup"])
    # Opt-in: a recipe that lists no stages runs every stage but dedup.
    from capfilt.pipeline.recipe import recipe_model

    everything = recipe_model().model_fields["stages"].default_factory()  # type: ignore[call-arg, misc]
    assert "dedup" not in everything and {"capfilt", "pretrain2"} <= set(everything)


# ---------------------------------------------------------------------- before captioning


@pytest.fixture(scope="module")
def before_run(downloaded, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("dup_before") / "capfilt"
    cfg = CFG.model_copy(update={"dedup_before": True, "dedup_min_cosine": NEAR})
    return out, run_capfilt(downloaded, out, models["captioner"], models["filter"], cfg), cfg


def test_dedup_before_captions_no_duplicate_and_records_each(before_run, downloaded, dup_world):
    out, summary, _ = before_run
    samples = read_samples(downloaded, ["uid", "row", "status", "sha256"])
    success = samples.filter(pc.equal(samples.column("status"), S.SUCCESS))
    cands = _read(out / CANDIDATES_DIR, S.CANDIDATE)
    removed = _read(out / REMOVED_DIR, S.REMOVED)
    seen, skipped = set(cands.column("uid").to_pylist()), set(removed.column("uid").to_pylist())
    # Every image is either captioned and scored or skipped, never both, and none is lost.
    assert not seen & skipped and seen | skipped == set(success.column("uid").to_pylist())
    assert summary.images + len(skipped) == success.num_rows
    assert pq.read_table(out / DEDUP_BEFORE).num_rows == len(skipped) > 0
    # No skipped image got a caption: the captioner never saw it.
    synthetic = cands.filter(pc.equal(cands.column("text_source"), "synthetic"))
    assert not set(synthetic.column("uid").to_pylist()) & skipped
    for r in removed.to_pylist():
        assert r["reason"] in S.DEDUP_REASONS and r["duplicate_of"] in seen and r["text_source"] == "web"
        assert r["image"] is None and r["image_ref"].endswith(".parquet")
    # Every exact duplicate (same bytes) is skipped: one image per hash is captioned.
    sha = success.column("sha256").to_pylist()
    uids = success.column("uid").to_pylist()
    assert len({h for u, h in zip(uids, sha, strict=True) if u in seen}) == len(seen)
    assert len(set(sha)) < len(sha), "the world has exact duplicates"
    # The summary reports the work saved.
    figures = summary.extra["dedup_before"]
    assert figures["images_skipped"] == len(skipped)
    assert figures["images_skipped_exact"] >= len(sha) - len(set(sha))
    assert figures["seconds_per_image"] > 0 and figures["seconds_saved"] == pytest.approx(
        figures["seconds_per_image"] * len(skipped),
        abs=2e-3,  # both rounded in the summary
    )
    # Keepers are the first of their group by input row.
    row = dict(zip(uids, success.column("row").to_pylist(), strict=True))
    for r in removed.to_pylist():
        assert row[r["duplicate_of"]] < row[r["uid"]]
    # The world's true duplicates: most skipped ones are truly duplicates of what they name
    # (with a random model, near links are noisy; exact ones never are).
    truth = _truth(dup_world, samples)
    exact_skips = [r for r in removed.to_pylist() if r["reason"] == S.EXACT_DUPLICATE]
    assert all(truth.get(r["uid"]) == r["duplicate_of"] for r in exact_skips)


def test_dedup_before_resumes_from_its_plan_without_a_second_pass(
    before_run, downloaded, models, monkeypatch
):
    from capfilt.stages.capfilt import dedup_before

    out, summary, cfg = before_run
    monkeypatch.setattr(dedup_before, "embed_images", lambda *a, **k: pytest.fail("embedded twice"))
    again = run_capfilt(downloaded, out, models["captioner"], models["filter"], cfg)
    assert again.shards_written == 0 and again.images == summary.images
    assert again.extra["dedup_before"]["images_skipped"] == summary.extra["dedup_before"]["images_skipped"]


# ------------------------------------------------------------------------------ on S3


def test_dedup_on_an_s3_run_folder_gives_the_local_rows(capfilt_dir, downloaded, dedup_dir):
    """The stage's inputs and outputs on S3 (moto on loopback; Ray restarted inside the server's
    block so its workers see the endpoint): the same cleaned and removed rows as the local run."""
    import pyarrow.fs as pafs
    import ray

    from capfilt.core import fs
    from capfilt.core.cluster import ensure_ray
    from capfilt.testing import s3_server

    local_out, local_summary = dedup_dir
    ray.shutdown()
    try:
        with s3_server() as root:
            ensure_ray(num_cpus=4)
            try:
                run = fs.location(f"{root}/run")
                for name, src in (("capfilt", capfilt_dir), ("download", downloaded)):
                    dst = run / name
                    pafs.copy_files(
                        str(src), dst.fs_path, pafs.LocalFileSystem(), destination_filesystem=dst.filesystem
                    )
                summary = run_dedup(
                    run / "capfilt", run / "download", run / "dedup", DedupConfig(min_cosine=NEAR)
                )
                for d, schema in ((CLEANED_DIR, S.CLEANED), (REMOVED_DIR, S.REMOVED)):
                    files = sorted((run / "dedup" / d).glob("*.parquet"), key=str)
                    remote = pa.concat_tables([fs.read_parquet(f, schema=schema) for f in files])
                    local = _read(local_out / d, schema)
                    assert sorted(remote.column("text_uid").to_pylist()) == sorted(
                        local.column("text_uid").to_pylist()
                    )
            finally:
                ray.shutdown()
    finally:
        ensure_ray(num_cpus=4)
    keys = ("images_in", "images_removed", "rows_in", "rows_out", "rows_removed")
    assert {k: summary[k] for k in keys} == {k: local_summary[k] for k in keys}


def test_the_shipped_dedup_recipe_is_valid() -> None:
    from capfilt.pipeline.recipe import load_recipe

    rec = load_recipe(Path(__file__).parent.parent / "pipelines" / "dedup.yaml", check_paths=False)
    assert rec.stages.index("capfilt") < rec.stages.index("dedup") < rec.stages.index("pretrain2")
    assert rec.world.near_duplicate_rate > 0 and rec.dedup.min_cosine == DedupConfig().min_cosine
