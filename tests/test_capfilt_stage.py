"""The CapFilt stage: the two batch functions without Ray (tiny random models), then the stage on
local Ray over a real download of the served shapes world (accounting, schema, resume, modes,
re-thresholding)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core import schema as S
from capfilt.core.errors import ConfigError
from capfilt.core.layout import CANDIDATES_DIR, CAPTIONS_DIR, CLEANED_DIR
from capfilt.core.shards import STATS_DIR
from capfilt.core.text import pre_caption
from capfilt.model.tokenizer import load_tokenizer, tokenize, train_wordpiece
from capfilt.model.transforms import decode_image, test_transform
from capfilt.stages.capfilt.caption import caption_batch
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.capfilt.decisions import REASON_BELOW, REASON_EMPTY, REASON_UNDECODABLE
from capfilt.stages.capfilt.driver import run_capfilt
from capfilt.stages.capfilt.models import load_model, resolve_model
from capfilt.stages.capfilt.pixels import pixel_column, pixel_values, preprocess_batch
from capfilt.stages.capfilt.rethreshold import read_candidates, read_captions, read_cleaned, rethreshold
from capfilt.stages.capfilt.score import score_batch
from capfilt.stages.capfilt.summary import CapFiltSummary
from capfilt.stages.capfilt.writer import IMAGE_SOURCES_KEY, IMAGES_KEY, cleaned_table
from capfilt.stages.download import DownloadConfig, read_samples, run_download

# Short captions keep the random captioner cheap: [DEC] + 3 prompt tokens + up to 8 more.
CFG = CapFiltConfig(k=2, max_length=12, min_length=5, batch_size=16)
DOWNLOAD = DownloadConfig(
    image_size=64, shard_size=60, thread_count=8, timeout=5, source="shapes", url_policy="allow_loopback"
)


# ------------------------------------------------------------------------------------ fixtures


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, Path]:
    """The session's tiny random MED (capfilt.testing): a transformers captioner and filter,
    tokenizer beside each, its ITM head centred so the threshold tests get keeps and drops."""
    return tiny_models


@pytest.fixture(scope="module")
def loaded(models):
    cap_ref, filt_ref = (
        resolve_model(models["captioner"], "captioner"),
        resolve_model(models["filter"], "filter"),
    )
    return (
        load_model(cap_ref, "captioner", CFG),
        load_model(filt_ref, "filter", CFG),
        load_tokenizer(cap_ref.tokenizer),
    )


@pytest.fixture(scope="module")
def raw_images(small_world: Path) -> list[bytes]:
    web = pq.read_table(small_world / "web.parquet").slice(40, 6).column("path").to_pylist()
    return [(small_world / p).read_bytes() for p in web]


@pytest.fixture(scope="module")
def batch(raw_images) -> dict:
    """Six download rows: five world images (one with an empty web text) and one whose bytes do
    not decode."""
    n = 6
    raw = {
        "uid": np.asarray([f"uid{i}" for i in range(n)], dtype=object),
        "text": np.asarray(
            ["a red circle", "", "two green squares", "a blue star", "a yellow circle", "a big triangle"],
            dtype=object,
        ),
        "row": np.arange(n),
        "status": np.asarray([S.SUCCESS] * n, dtype=object),
        "image": np.asarray([b if i != 4 else b"not a jpeg" for i, b in enumerate(raw_images)], dtype=object),
    }
    return preprocess_batch(raw, [64])


def _take(batch: dict, rows: list[int]) -> dict:
    return {k: np.asarray(v)[rows] for k, v in batch.items()}


# --------------------------------------------------------------------------- batch functions


def test_preprocess_gives_test_transform_pixels_and_a_reason_per_bad_row(batch, raw_images):
    assert [e == "" for e in batch["error"]] == [True, True, True, True, False, True]
    assert batch["error"][4].startswith(REASON_UNDECODABLE)
    ours = pixel_values(batch[pixel_column(64)][:1])
    want = test_transform(64)(decode_image(raw_images[0])).unsqueeze(0)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)


def test_caption_batch_returns_k_captions_per_image(loaded, batch):
    cap, _, tok = loaded
    out = caption_batch(cap, tok, batch, CFG)
    for i, captions in enumerate(out["captions"]):
        if i == 4:
            assert captions == [], "an undecodable image gets no caption"
            continue
        assert len(captions) == CFG.k and all(isinstance(c, str) and c for c in captions)
        assert not any(c.startswith("a picture of") for c in captions), "the prompt is stripped"


def test_captions_are_seeded_per_image_not_per_batch(loaded, batch):
    cap, _, tok = loaded
    whole = caption_batch(cap, tok, batch, CFG)["captions"]
    split = [
        c
        for rows in ([0, 1], [2, 3, 4], [5])
        for c in caption_batch(cap, tok, _take(batch, rows), CFG)["captions"]
    ]
    reordered = caption_batch(cap, tok, _take(batch, [5, 3, 1, 0, 2, 4]), CFG)["captions"]
    assert [list(c) for c in split] == [list(c) for c in whole]
    assert [list(reordered[[5, 3, 1, 0, 2, 4].index(i)]) for i in range(6)] == [list(c) for c in whole]
    other_seed = caption_batch(cap, tok, batch, CFG.model_copy(update={"seed": 1}))["captions"]
    assert [list(c) for c in other_seed] != [list(c) for c in whole]
    assert whole[0][0] != whole[0][1], "the k captions of an image are different draws"


def test_the_seeded_sampler_draws_from_the_top_k_nucleus():
    from capfilt.stages.capfilt.caption import _seeded_sampler_class

    logits = torch.log(torch.tensor([[0.05, 0.4, 0.02, 0.3, 0.2, 0.03]]))
    draws = 20000
    uniforms = torch.rand(draws, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampler = _seeded_sampler_class()(uniforms, start_len=1, top_p=0.8, top_k=4)
    picks = sampler(torch.zeros(draws, 1, dtype=torch.long), logits.expand(draws, -1)).argmax(dim=-1)
    # top 4: tokens 1, 3, 4, 0; the nucleus stops once 0.8 is reached: tokens 1, 3, 4 (0.9 of 0.95).
    want = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.2, 0.0]) / 0.9
    got = torch.bincount(picks, minlength=6).double() / draws
    torch.testing.assert_close(got, want.double(), atol=0.01, rtol=0)


def test_beam_search_gives_k_captions(loaded, batch):
    cap, _, tok = loaded
    cfg = CFG.model_copy(update={"sample": False, "num_beams": 3, "k": 2})
    out = caption_batch(cap, tok, _take(batch, [0, 1]), cfg)["captions"]
    assert [len(c) for c in out] == [2, 2]
    with pytest.raises(ValueError, match="beams"):
        CapFiltConfig(sample=False, num_beams=2, k=3)


def test_score_batch_scores_every_text_and_decides_by_threshold(loaded, batch):
    cap, filt, tok = loaded
    captioned = caption_batch(cap, tok, batch, CFG)
    cands = score_batch(filt, tok, captioned, CFG).to_pylist()
    # Every image's web text, then K captions for each decodable image.
    assert len(cands) == 6 + CFG.k * 5
    assert [c["text_source"] for c in cands[:3]] == ["web", "synthetic", "synthetic"]
    by_uid = {u: [c for c in cands if c["uid"] == u] for u in batch["uid"]}
    assert by_uid["uid1"][0]["reason"] == REASON_EMPTY and by_uid["uid1"][0]["itm_score"] is None
    assert len(by_uid["uid4"]) == 1 and by_uid["uid4"][0]["reason"].startswith(REASON_UNDECODABLE)
    scored = [c for c in cands if c["itm_score"] is not None]
    assert len(scored) == 4 + CFG.k * 5
    for c in scored:
        assert 0.0 <= c["itm_score"] <= 1.0 and -1.0 <= c["itc_score"] <= 1.0
        assert c["decision"] == ("keep" if c["itm_score"] >= CFG.threshold else "drop")
        assert c["reason"] == (None if c["decision"] == "keep" else REASON_BELOW)
    assert {c["decision"] for c in scored} == {"keep", "drop"}, "the centred ITM head gives both"
    # Another threshold only moves the decisions.
    median = float(np.median([c["itm_score"] for c in scored]))
    again = score_batch(filt, tok, captioned, CFG.model_copy(update={"threshold": median})).to_pylist()
    assert [c["itm_score"] for c in again] == [c["itm_score"] for c in cands]
    assert all(
        c["decision"] == ("keep" if c["itm_score"] >= median else "drop")
        for c in again
        if c["itm_score"] is not None
    )


def test_score_batch_encodes_each_image_once(loaded, batch, monkeypatch):
    cap, filt, tok = loaded
    captioned = caption_batch(cap, tok, batch, CFG)
    encoded: list[int] = []
    original = filt.encode_image
    monkeypatch.setattr(
        filt, "encode_image", lambda px, *a, **kw: encoded.append(px.shape[0]) or original(px, *a, **kw)
    )
    score_batch(filt, tok, captioned, CFG)
    assert encoded == [5], "one call for the 5 decodable images, whatever their 14 texts"


def test_score_batch_matches_the_model_on_each_pair_alone(loaded, batch):
    cap, filt, tok = loaded
    captioned = caption_batch(cap, tok, batch, CFG)
    cands = score_batch(filt, tok, captioned, CFG).to_pylist()
    pixels = pixel_values(batch[pixel_column(64)])
    row_of = {u: i for i, u in enumerate(batch["uid"])}
    with torch.inference_mode():
        for c in cands:
            if c["itm_score"] is None:
                continue
            embeds = filt.encode_image(pixels[row_of[c["uid"]] : row_of[c["uid"]] + 1])
            t = tokenize(tok, [pre_caption(c["text"])], CFG.max_text_tokens)
            alone = filt.itm_prob(embeds, t["input_ids"], t["attention_mask"]).item()
            cosine = filt.itc_sim(embeds, t["input_ids"], t["attention_mask"]).item()
            assert c["itm_score"] == pytest.approx(alone, abs=1e-5)
            assert c["itc_score"] == pytest.approx(cosine, abs=1e-5)


def test_filter_only_batch_scores_the_web_text_alone(loaded, batch):
    _, filt, tok = loaded
    cands = score_batch(filt, tok, batch, CFG)
    assert cands.column("text_source").to_pylist() == ["web"] * 6


def test_configuration_errors_fail_before_any_work(models, tmp_path):
    with pytest.raises(ConfigError, match="--captioner, --filter or both"):
        run_capfilt(tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="a filter is a BlipForImageTextRetrieval"):
        resolve_model(models["captioner"], "filter")
    other = train_wordpiece(["completely different words here"], vocab_size=60, out_dir=tmp_path / "tok")
    assert other is not None
    with pytest.raises(ConfigError, match="does not fit"):
        resolve_model(models["filter"], "filter", tokenizer=tmp_path / "tok")
    with pytest.raises(ConfigError, match="no .parquet shards"):
        run_capfilt(tmp_path, tmp_path / "out", filter=models["filter"])


# ------------------------------------------------------------------------- the stage on Ray


@pytest.fixture(scope="module")
def downloaded(ray_local, served_world, tmp_path_factory) -> Path:
    _, urls, _ = served_world
    out = tmp_path_factory.mktemp("capfilt_dl") / "download"
    run_download(urls, out, DOWNLOAD, progress=False)
    return out


@pytest.fixture(scope="module")
def full_run(downloaded, models, small_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("capfilt_run") / "run"
    human = small_world / "human" / "karpathy_train.json"
    summary = run_capfilt(
        downloaded, out, models["captioner"], models["filter"], CFG, human=human, human_images=small_world
    )
    return out, summary


def _rows(table: pa.Table) -> list[dict]:
    return table.sort_by([("uid", "ascending"), ("text_uid", "ascending")]).to_pylist()


def test_accounting_every_image_and_every_kept_text(downloaded, full_run):
    out, summary = full_run
    samples = read_samples(downloaded)
    success = samples.filter(pc.equal(samples.column("status"), S.SUCCESS))
    cands = read_candidates(out)
    web = cands.filter(pc.equal(cands.column("text_source"), "web"))
    # Every downloaded image appears exactly once as a web candidate; nothing else does.
    assert sorted(web.column("uid").to_pylist()) == sorted(success.column("uid").to_pylist())
    decodable = sum(not (r or "").startswith(REASON_UNDECODABLE) for r in web.column("reason").to_pylist())
    synthetic = cands.filter(pc.equal(cands.column("text_source"), "synthetic"))
    assert synthetic.num_rows == CFG.k * decodable
    assert (
        summary.texts_considered["web"] + summary.texts_considered["synthetic"]
        == success.num_rows + CFG.k * decodable
    )
    assert summary.images == success.num_rows
    assert sum(summary.rows_not_images.values()) == samples.num_rows - success.num_rows
    # Every kept candidate is a cleaned row, and every cleaned row a kept candidate.
    kept = cands.filter(pc.equal(cands.column("decision"), "keep"))
    cleaned = read_cleaned(out)
    assert sorted(cleaned.column("text_uid").to_pylist()) == sorted(kept.column("text_uid").to_pylist())
    assert sum(summary.kept.values()) == cleaned.num_rows
    assert len(set(cands.column("text_uid").to_pylist())) == cands.num_rows
    # Per-shard stats add up to the summary, and decisions follow the threshold.
    stats = [json.loads(p.read_text()) for p in sorted((out / STATS_DIR).glob("*.json"))]
    assert sum(s["images"] for s in stats if s["kind"] == "web") == summary.images
    images_with_kept = set(kept.column("uid").to_pylist())
    assert summary.images_no_kept_text == len(set(web.column("uid").to_pylist()) - images_with_kept)
    for c in cands.to_pylist():
        if c["itm_score"] is not None:
            assert c["decision"] == ("keep" if c["itm_score"] >= CFG.threshold else "drop")
    assert 0 < summary.kept["web"] < summary.texts_considered["web"]


def test_outputs_have_the_declared_schemas_and_load_as_training_input(downloaded, full_run):
    out, _ = full_run
    for f in sorted((out / CANDIDATES_DIR).glob("*.parquet")):
        assert pq.read_schema(f) == S.CANDIDATE, f
    for f in sorted((out / CLEANED_DIR).glob("*.parquet")):
        assert pq.read_schema(f) == S.CLEANED, f
        assert IMAGES_KEY not in (pq.read_schema(f).metadata or {}), "images included: no reference mark"
    assert not (out / CAPTIONS_DIR).exists(), "a filtered run writes no captions/ folder"
    # The folder reads as one dataset in the CLEANED schema: the next round's pretraining input.
    table = pq.read_table(out / CLEANED_DIR, schema=S.CLEANED)
    assert table.num_rows == read_cleaned(out).num_rows > 0
    urls = dict(zip(*read_samples(downloaded, ["uid", "url"]).to_pydict().values(), strict=True))
    for row in table.to_pylist():
        assert row["text"] and row["round"] == CFG.round
        image = decode_image(row["image"])
        assert image.size[0] > 0
        if row["text_source"] != "human":
            assert row["url"] == urls[row["uid"]] and row["image_ref"].endswith(".parquet")
            assert row["captioner_id"].startswith("captioner-") and row["filter_id"].startswith("filter-")


def test_human_pairs_pass_through(full_run, small_world):
    out, summary = full_run
    entries = json.loads((small_world / "human" / "karpathy_train.json").read_text())
    human = read_cleaned(out).filter(pc.equal(read_cleaned(out).column("text_source"), "human"))
    assert human.num_rows == len(entries) == summary.human_pairs
    assert sorted(human.column("text").to_pylist()) == sorted(e["caption"] for e in entries)
    first = human.to_pylist()[0]
    assert first["image"] == Path(first["image_ref"]).read_bytes() and first["itm_score"] is None


def test_rerun_skips_finished_shards_and_changes_nothing(downloaded, models, full_run, small_world):
    out, _ = full_run
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.parquet")}
    human = small_world / "human" / "karpathy_train.json"
    summary = run_capfilt(
        downloaded, out, models["captioner"], models["filter"], CFG, human=human, human_images=small_world
    )
    assert summary.shards_written == 0 and summary.shards_skipped == 5
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.parquet")} == before
    with pytest.raises(ConfigError, match="differs in"):
        run_capfilt(downloaded, out, models["captioner"], models["filter"], CFG.model_copy(update={"k": 3}))
    with pytest.raises(ConfigError, match="capfilt reselect"):
        run_capfilt(
            downloaded,
            out,
            models["captioner"],
            models["filter"],
            CFG.model_copy(update={"threshold": 0.6}),
            human=human,
            human_images=small_world,
        )


def test_resume_after_a_crash_gives_the_same_rows(downloaded, models, full_run, small_world, tmp_path):
    out, _ = full_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    # A crash after shard 00001's outputs but before its stats file; shard 00003 never written;
    # a temp file left behind. Neither half-written shard may be trusted.
    (resumed / STATS_DIR / "00001.json").unlink()
    for d in (STATS_DIR, CANDIDATES_DIR, CLEANED_DIR):
        for f in (resumed / d).glob("00003.*"):
            f.unlink()
    (resumed / CLEANED_DIR / ".00003.parquet.x.tmp").write_bytes(b"PAR1 half")
    # Model batches are chunks of one shard: the redone shards are computed exactly as before,
    # though this time no other shard runs beside them.
    human = small_world / "human" / "karpathy_train.json"
    summary = run_capfilt(
        downloaded, resumed, models["captioner"], models["filter"], CFG, human=human, human_images=small_world
    )
    assert summary.shards_written == 2 and summary.shards_skipped == 3
    assert _rows(read_candidates(resumed)) == _rows(read_candidates(out))
    assert _rows(read_cleaned(resumed)) == _rows(read_cleaned(out))


@pytest.fixture(scope="module")
def one_shard(downloaded, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("one_shard")
    shutil.copy(downloaded / "00002.parquet", data / "00002.parquet")
    return data


def test_caption_only_writes_captions_for_every_image(one_shard, models, full_run, tmp_path):
    # Human pairs from a folder of download shards this time.
    out = tmp_path / "out"
    summary = run_capfilt(one_shard, out, captioner=models["captioner"], cfg=CFG, human=one_shard)
    cleaned, cands = read_cleaned(out), read_candidates(out)
    # cleaned/ holds only what a filter kept, and human pairs: no filter ran, so only human pairs.
    assert set(cleaned.column("text_source").to_pylist()) == {"human"}
    assert sorted(p.name for p in (out / CLEANED_DIR).glob("*.parquet")) == ["human-00002.parquet"]
    assert sorted(p.name for p in (out / CAPTIONS_DIR).glob("*.parquet")) == ["00002.parquet"]
    captions = read_captions(out)
    assert pq.read_schema(out / CAPTIONS_DIR / "00002.parquet") == S.CLEANED  # the same shard layout
    unscored = cands.filter(pc.equal(cands.column("reason"), "unscored (no filter)"))
    assert sorted(captions.column("text_uid").to_pylist()) == sorted(unscored.column("text_uid").to_pylist())
    assert set(captions.column("text_source").to_pylist()) == {"web", "synthetic"}
    lines = "\n".join(summary.lines())
    assert f"caption shards:     {out / CAPTIONS_DIR}" in lines and "unscored (no filter)" in lines
    assert summary.kept_dir == CAPTIONS_DIR
    # Resuming finds the shard done in captions/, and rethreshold keeps writing there.
    again = run_capfilt(one_shard, out, captioner=models["captioner"], cfg=CFG, human=one_shard)
    assert again.shards_skipped == 1 and again.shards_written == 0
    rethreshold(out, 0.9)
    assert not (out / CLEANED_DIR / "00002.parquet").exists()
    assert _rows(read_captions(out)) == _rows(captions)
    human = cleaned.filter(pc.equal(cleaned.column("text_source"), "human"))
    human_cands = cands.filter(pc.equal(cands.column("text_source"), "human"))
    assert human_cands.num_rows == summary.human_pairs == summary.images  # one text per downloaded row
    kept = human_cands.filter(pc.equal(human_cands.column("decision"), "keep"))
    assert human.num_rows == kept.num_rows == summary.kept["human"] > 0
    samples = {r["uid"]: r for r in pq.read_table(one_shard / "00002.parquet").to_pylist()}
    assert all(samples[r["uid"]]["image"] == r["image"] for r in human.to_pylist())
    cands = cands.filter(pc.invert(pc.equal(cands.column("text_source"), "human")))
    assert cands.column("itm_score").null_count == cands.num_rows
    synthetic = cands.filter(pc.equal(cands.column("text_source"), "synthetic"))
    assert synthetic.num_rows == CFG.k * summary.images - CFG.k * summary.images_not_decodable > 0
    assert set(synthetic.column("decision").to_pylist()) == {"keep"}
    assert set(cands.column("filter_id").to_pylist()) == {None}
    # Same seed, same captions as the full run.
    full = read_candidates(full_run[0]).filter(
        pc.equal(read_candidates(full_run[0]).column("text_source"), "synthetic")
    )
    full_texts = dict(zip(full.column("text_uid").to_pylist(), full.column("text").to_pylist(), strict=True))
    assert all(
        full_texts[u] == t
        for u, t in zip(
            synthetic.column("text_uid").to_pylist(), synthetic.column("text").to_pylist(), strict=True
        )
    )


def test_filter_only_scores_the_existing_texts_and_can_reference_images(
    one_shard, models, full_run, tmp_path
):
    run_capfilt(
        one_shard,
        tmp_path / "out",
        filter=models["filter"],
        cfg=CFG.model_copy(update={"images": "reference"}),
    )
    cleaned = read_cleaned(tmp_path / "out")
    assert cleaned.num_rows > 0 and cleaned.column("image").null_count == cleaned.num_rows
    # The shard itself says its images are referenced, and where the referenced shard is.
    meta = pq.read_schema(tmp_path / "out" / CLEANED_DIR / "00002.parquet").metadata
    assert meta[IMAGES_KEY] == b"ref"
    assert json.loads(meta[IMAGE_SOURCES_KEY]) == [str((one_shard / "00002.parquet").resolve())]
    source = pq.read_table(cleaned.column("image_ref")[0].as_py())
    assert cleaned.column("uid")[0].as_py() in source.column("uid").to_pylist()
    cands = read_candidates(tmp_path / "out")
    assert set(cands.column("text_source").to_pylist()) == {"web"}
    assert set(cands.column("captioner_id").to_pylist()) == {None}
    full = read_candidates(full_run[0])
    full_web = {r["text_uid"]: r["itm_score"] for r in full.to_pylist() if r["text_source"] == "web"}
    for r in cands.to_pylist():
        if r["itm_score"] is not None:
            assert r["itm_score"] == pytest.approx(full_web[r["text_uid"]], abs=1e-5)


def _image_like(obj: object, depth: int = 0) -> str | None:
    """What in ``obj`` is image data or candidate rows (None: nothing): JPEG or PNG bytes, a
    pixel array, an Arrow table with an image, pixel or text column."""
    if depth > 6:
        return None
    if isinstance(obj, (bytes, bytearray, memoryview)):
        head = bytes(obj[:8])
        return "image bytes" if head.startswith((b"\xff\xd8\xff", b"\x89PNG")) else None
    if isinstance(obj, np.ndarray):
        if obj.dtype == np.uint8 and obj.ndim >= 3:
            return f"a pixel array {obj.shape}"
        if obj.dtype == object:
            return next((w for v in obj.ravel()[:64] if (w := _image_like(v, depth + 1))), None)
        return None
    if isinstance(obj, (pa.Table, pa.RecordBatch)):
        bad = [c for c in obj.schema.names if c in ("image", "text") or c.startswith("pixels_")]
        return f"an Arrow table with columns {bad}" if bad else None
    if isinstance(obj, dict):
        return next((w for v in obj.values() if (w := _image_like(v, depth + 1))), None)
    if isinstance(obj, (list, tuple)):
        return next((w for v in obj[:256] if (w := _image_like(v, depth + 1))), None)
    return None


def test_the_driver_never_reads_or_receives_images(one_shard, models, tmp_path, monkeypatch):
    """In the driver process (Ray's workers are other processes): reading the image column of an
    input shard raises, and everything the driver gets from Ray (``ray.get``, which Ray Data's
    iterator uses too) is checked for image bytes, pixels and candidate rows. Human pairs come
    from the same shards, so their images are guarded as well."""
    import pyarrow.parquet as pq_mod
    import ray

    from capfilt.stages.capfilt.writer import RECEIPT

    guarded = {p.resolve() for p in one_shard.glob("*.parquet")}
    reads: list[list[str] | None] = []
    real_read_table, real_get = pq_mod.read_table, ray.get

    def read_table(source, *args, columns=None, **kwargs):
        if isinstance(source, (str, Path)) and Path(source).resolve() in guarded:
            reads.append(columns)
            if columns is None or "image" in columns:
                raise AssertionError(f"the driver read the images of {source}")
        return real_read_table(source, *args, columns=columns, **kwargs)

    def no_images_read(real):
        def read(self, *args, columns=None, **kwargs):
            if columns is None or "image" in columns:
                raise AssertionError("the driver read a Parquet file's images")
            return real(self, *args, columns=columns, **kwargs)

        return read

    received: list[str] = []
    tables: list[list[str]] = []

    def get(refs, *args, **kwargs):
        value = real_get(refs, *args, **kwargs)
        if isinstance(value, (pa.Table, pa.RecordBatch)):
            tables.append(value.schema.names)
        if (what := _image_like(value)) is not None:
            received.append(what)
        return value

    monkeypatch.setattr(pq_mod, "read_table", read_table)
    for method in ("read", "iter_batches", "read_row_group", "read_row_groups"):
        monkeypatch.setattr(pq_mod.ParquetFile, method, no_images_read(getattr(pq_mod.ParquetFile, method)))
    monkeypatch.setattr(ray, "get", get)
    out = tmp_path / "out"
    summary = run_capfilt(one_shard, out, models["captioner"], models["filter"], CFG, human=one_shard)
    monkeypatch.undo()

    assert reads and all(c is not None and "image" not in c for c in reads), "the guard saw the plan"
    assert not received, f"the driver received {received[:3]}"
    assert tables and all(names == RECEIPT.names for names in tables), "receipts are all it fetched"
    cleaned = read_cleaned(out)  # the workers did read the images
    assert cleaned.num_rows == sum(summary.kept.values()) > 0
    assert all(decode_image(b).size[0] > 0 for b in cleaned.column("image").to_pylist())
    assert set(cleaned.column("text_source").to_pylist()) >= {"human", "web"}


def test_rethreshold_redecides_without_models(full_run, tmp_path):
    out, summary = full_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    scores = [s for s in read_candidates(run).column("itm_score").to_pylist() if s is not None]
    # The median: whichever side of the run's threshold it falls, it changes some decisions.
    median = float(np.quantile(scores, 0.5))
    assert sum(s >= median for s in scores) != sum(s >= CFG.threshold for s in scores)
    new = rethreshold(run, median)
    cands = read_candidates(run)
    for c in cands.to_pylist():
        if c["itm_score"] is not None:
            assert c["decision"] == ("keep" if c["itm_score"] >= median else "drop")
    kept = cands.filter(pc.equal(cands.column("decision"), "keep"))
    assert sorted(read_cleaned(run).column("text_uid").to_pylist()) == sorted(
        kept.column("text_uid").to_pylist()
    )
    scored_kept = sum(v for k, v in new.kept.items() if k != "human")
    assert scored_kept == sum(s >= median for s in scores)
    assert new.kept["human"] == summary.kept["human"]
    # Back to the run's own threshold, from the command line: the very same rows as the run wrote.
    result = CliRunner().invoke(app, ["rethreshold", "--run", str(run), "--threshold", str(CFG.threshold)])
    assert result.exit_code == 0, result.output
    assert "reselect summary" in result.output
    assert _rows(read_cleaned(run)) == _rows(read_cleaned(out))
    assert _rows(read_candidates(run)) == _rows(read_candidates(out))


def test_reselect_best_top_n_and_calibrated_thresholds(full_run, downloaded, small_world, tmp_path):
    """The policies over a real run's K=2 captions, from its candidates alone; then thresholds
    calibrated on labels (the world's truth for a sample of rows) reach the run and its stats."""
    from capfilt.eval.calibrate import calibrate_run
    from capfilt.eval.quality import label_candidates
    from capfilt.world import load_world

    out, _ = full_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    rethreshold(run, 0.0, select="best")  # every scored text passes: exactly one per image is kept
    cands = read_candidates(run)
    scored = cands.filter(pc.is_valid(cands.column("itm_score")))
    kept = scored.filter(pc.equal(scored.column("decision"), "keep"))
    assert kept.num_rows == len(set(scored.column("uid").to_pylist()))
    best = {}
    for r in scored.to_pylist():
        best[r["uid"]] = max(best.get(r["uid"], -1.0), r["itm_score"])
    assert all(r["itm_score"] == best[r["uid"]] for r in kept.to_pylist())
    rethreshold(run, select="top_n", top_n=1)  # web text kept if >= 0, plus the best caption
    cands = read_candidates(run)
    syn = cands.filter(
        pc.and_(pc.equal(cands.column("text_source"), "synthetic"), pc.is_valid(cands.column("itm_score")))
    )
    assert sorted(set(syn.column("rank").to_pylist())) == [0, 1]
    kept_syn = syn.filter(pc.equal(syn.column("decision"), "keep"))
    assert set(kept_syn.column("rank").to_pylist()) == {0}

    labelled = label_candidates(cands, read_samples(downloaded), load_world(small_world))
    web = labelled.filter(
        pc.and_(pc.equal(labelled.column("text_source"), "web"), pc.is_valid(labelled.column("truth")))
    )
    labels = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"text_uid": web.column("text_uid"), "correct": web.column("truth")}), labels)
    cal = calibrate_run(run, labels, 0.6, sources=["web"], resamples=100)
    assert "web" in cal
    rethreshold(run, select="threshold", calibrated=True)
    manifest = json.loads((run / "_manifest.json").read_text())
    assert manifest["config"]["thresholds"] == (
        {"web": cal["web"].threshold} if cal["web"].threshold is not None else {}
    )
    stats = json.loads(next((run / STATS_DIR).glob("0*.json")).read_text())
    assert (
        stats["selection"]["select"] == "threshold"
        and stats["selection"]["thresholds"] == manifest["config"]["thresholds"]
    )


# ------------------------------------------------------------------ outputs that mean one thing


def test_a_reference_only_shard_names_the_image_folders_it_points_to(tmp_path):
    uids = ["a", "b", "c"]
    candidates = pa.table(
        {
            "uid": uids,
            "text_uid": ["ta", "tb", "tc"],
            "text": ["one", "two", "three"],
            "text_source": ["human"] * 3,
            "text_index": [0, 0, 0],
            "itm_score": pa.nulls(3, pa.float32()),
            "itc_score": pa.nulls(3, pa.float32()),
            "decision": ["keep", "keep", "drop"],
            "reason": ["human pair (kept unscored)"] * 2 + ["empty text"],
            "round": pa.array([1] * 3, pa.int32()),
            "captioner_id": pa.nulls(3, pa.string()),
            "filter_id": pa.nulls(3, pa.string()),
        }
    )
    refs = [str(tmp_path / "x" / "a.jpg"), str(tmp_path / "y" / "b.jpg"), str(tmp_path / "z" / "c.jpg")]
    images = pa.table(
        {"uid": uids, "url": [None] * 3, "image": pa.array([b"j"] * 3, pa.binary()), "image_ref": refs}
    )
    ref = cleaned_table(candidates, images, "reference")
    assert ref.column("image").null_count == 2 == ref.num_rows
    assert ref.schema.metadata[IMAGES_KEY] == b"ref"
    # Image files are named by their folders (one per image would repeat every path), kept rows only.
    assert json.loads(ref.schema.metadata[IMAGE_SOURCES_KEY]) == [str(tmp_path / "x"), str(tmp_path / "y")]
    included = cleaned_table(candidates, images, "include")
    assert included.schema.metadata is None and included.column("image").to_pylist() == [b"j", b"j"]
    assert ref.schema.equals(included.schema)  # the same columns; only the metadata differs


def test_summary_lines_round_numbers_for_a_person():
    summary = CapFiltSummary(
        images=3,
        images_not_decodable=0,
        images_no_kept_text=1,
        rows_not_images={},
        texts_considered={"synthetic": 3, "web": 3},
        kept={"synthetic": 2, "web": 1},
        mean_itm={"synthetic": 0.35414565059636216, "web": None},
        mean_itc={"synthetic": 0.123456789, "web": None},
        reason_counts={"itm below threshold": 3},
        threshold=0.41234567890123,
        shards_total=1,
    )
    lines = "\n".join(summary.lines())
    assert (
        "at p(match) >= 0.412" in lines and "synthetic 0.354, web -" in lines and "synthetic 0.123" in lines
    )
    assert "0.3541" not in lines and "0.4123" not in lines
    assert "cleaned shards:" in lines and "caption shards:" not in lines


def test_calibrate_stage_labels_a_fixed_world_sample_and_applies_its_thresholds(
    full_run, downloaded, small_world, tmp_path
):
    """The calibrate stage on a shapes run: the same 60 labelled web pairs every time, each label
    the world's truth; the threshold it picks reaches the capfilt folder's manifest and stats."""
    from types import SimpleNamespace

    from capfilt.eval.quality import web_truth
    from capfilt.stages.calibrate import STAGE as CALIBRATE
    from capfilt.stages.calibrate import CalibrateConfig, world_labels
    from capfilt.world import load_world

    out, _ = full_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    world = load_world(small_world)
    samples = read_samples(downloaded, columns=["uid", "row", "status", "text"])
    first, again = (world_labels(samples, world, 60, seed=0) for _ in range(2))
    assert first.equals(again) and first.num_rows == 60 and len(set(first["uid"].to_pylist())) == 60
    truth = dict(
        zip(*web_truth(samples, world.labels).select(["uid", "is_correct"]).to_pydict().values(), strict=True)
    )
    assert first["correct"].to_pylist() == [truth[u] for u in first["uid"].to_pylist()]
    assert not first.equals(world_labels(samples, world, 60, seed=1))
    with pytest.raises(ValueError, match="only"):
        world_labels(samples, world, 10_000, seed=0)

    cfg = CalibrateConfig(world_sample=60, target_precision=0.6, resamples=50)
    dirs = {"capfilt": run, "download": downloaded, "world": small_world}
    ctx = SimpleNamespace(
        recipe=SimpleNamespace(section=lambda name: cfg),
        run=SimpleNamespace(dir=lambda name: dirs[name]),
        dir=tmp_path / "calibrate",
    )
    result = CALIBRATE.run(ctx)
    written = pq.read_table(tmp_path / "calibrate" / "labels.parquet")
    cands = read_candidates(out)
    uid_of = dict(zip(cands["text_uid"].to_pylist(), cands["uid"].to_pylist(), strict=True))
    assert sorted(uid_of[t] for t in written["text_uid"].to_pylist()) == sorted(first["uid"].to_pylist())
    assert sum(written["correct"].to_pylist()) == sum(first["correct"].to_pylist())
    manifest = json.loads((run / "_manifest.json").read_text())
    picked = result["thresholds"]["web"]
    assert manifest["config"]["thresholds"] == ({"web": picked} if picked is not None else {})
    assert CALIBRATE.summary(result) and "web" in CALIBRATE.summary(result)[0]
