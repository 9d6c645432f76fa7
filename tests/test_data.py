"""Training pairs: reading download shards, cleaned shards and COCO-Karpathy JSON; rows -> batches."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from capfilt.core import schema as S
from capfilt.core.errors import ConfigError
from capfilt.core.text import pre_caption
from capfilt.testing import tiny_tokenizer
from capfilt.train.data import (
    PAIR_COLUMNS,
    Collator,
    DataSource,
    SkipCounts,
    count_pairs,
    fixed_batches,
    image_key,
    iter_texts,
    pairs_dataset,
    read_karpathy,
    resolve_sources,
)

BAD_BYTES = b"\xff\xd8\xff\xe0 not really a jpeg"


def write_sample_shards(
    world: Path, out: Path, shard_size: int = 100, undecodable: int = 3
) -> dict[str, Any]:
    """SAMPLE shards for a world's web rows as the download stage writes them, without HTTP: rows the
    world expects to download get status success and the image file's bytes, the others a failure
    status and no image. ``undecodable`` success rows, spread over the shards, get bytes that do not
    decode (a server that lied). Returns what a reader should find."""
    labels = pq.read_table(world / "web_labels.parquet").to_pylist()
    urls = [f"http://world.test/{r['path']}" for r in labels]
    uids, _ = S.make_uids("shapes", urls, [r["caption"] for r in labels])
    ok_rows = [i for i, r in enumerate(labels) if r["expect"] == "success" and pre_caption(r["caption"])]
    bad = set(ok_rows[len(ok_rows) // (undecodable + 1) :: len(ok_rows) // (undecodable + 1)][:undecodable])
    expect: dict[str, Any] = {"success": 0, "decodable": 0, "undecodable": len(bad), "empty_text": 0}
    not_downloaded: dict[str, int] = {}
    rows = []
    for i, (r, url, uid) in enumerate(zip(labels, urls, uids, strict=True)):
        status, image = S.SUCCESS, None
        if r["expect"] == "success":
            image = BAD_BYTES if i in bad else (world / r["path"]).read_bytes()
            expect["success"] += 1
            if not pre_caption(r["caption"]):
                expect["empty_text"] += 1
            elif i not in bad:
                expect["decodable"] += 1
        else:
            status = S.FAILED_TO_DOWNLOAD if r["expect"] == "fail" else S.DUPLICATE
            not_downloaded[status] = not_downloaded.get(status, 0) + 1
        rows.append(
            {
                "uid": uid,
                "url": url,
                "text": r["caption"],
                "source": "shapes",
                "row": r["row"],
                "shard": r["row"] // shard_size,
                "status": status,
                "reason": None if status == S.SUCCESS else "made by the test",
                "image": image,
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(rows), shard_size):
        table = pa.Table.from_pylist(rows[s : s + shard_size], schema=S.SAMPLE)
        pq.write_table(table, out / f"{s // shard_size:05d}.parquet")
    (out / "_stats").mkdir(exist_ok=True)  # bookkeeping folders are not data
    expect["not_downloaded"] = dict(sorted(not_downloaded.items()))
    return expect


def _jpeg(colour: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def samples(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("samples")
    return out, write_sample_shards(small_world, out, shard_size=64, undecodable=3)


@pytest.fixture(scope="module")
def tokenizer(small_world: Path) -> Any:
    captions = pq.read_table(small_world / "web.parquet").column("caption").to_pylist()
    return tiny_tokenizer(["a picture of", *captions])


# ------------------------------------------------------------------------------------- sources


def test_karpathy_json_gives_one_row_per_caption_keyed_by_image_id(small_world: Path) -> None:
    train_json = small_world / "human" / "karpathy_train.json"
    entries = json.loads(train_json.read_text())
    table = read_karpathy(train_json, image_root=small_world)
    assert table.num_rows == len(entries) == 20 * 5
    assert table.column("text").to_pylist() == [e["caption"] for e in entries]
    keys = table.column("image_key").to_pylist()
    assert len(set(keys)) == 20, "the 5 captions of an image share its key"
    assert keys[0] == image_key(f"karpathy/{entries[0]['image_id']}")
    assert all(Path(p).is_file() for p in table.column("path").to_pylist())

    # The test format has a list of captions per image and no image_id: keyed by path.
    test = read_karpathy(small_world / "human" / "karpathy_test.json", image_root=small_world)
    assert test.num_rows == 20 * 5 and len(set(test.column("image_key").to_pylist())) == 20


def test_karpathy_image_root_is_checked_and_the_error_names_the_right_one(small_world: Path) -> None:
    train_json = small_world / "human" / "karpathy_train.json"
    with pytest.raises(ConfigError, match=f"image_root={small_world}"):
        resolve_sources([str(train_json)])  # images are relative to the world root, not human/
    (src,) = resolve_sources([DataSource(path=str(train_json), image_root=str(small_world))])
    assert src.kind == "karpathy"


def test_sources_fail_fast_with_a_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_sources([str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match="no Parquet shards"):
        resolve_sources([str(tmp_path)])
    pq.write_table(pa.table({"x": [1]}), tmp_path / "00000.parquet")
    with pytest.raises(ConfigError, match="neither download shards"):
        resolve_sources([str(tmp_path)])


def test_counts_and_texts_read_only_successful_rows(samples: tuple[Path, dict[str, Any]]) -> None:
    folder, expect = samples
    (src,) = resolve_sources([str(folder)])
    assert src.kind == "samples"
    counts = count_pairs([src])
    assert counts.usable == expect["success"]
    assert counts.not_downloaded == expect["not_downloaded"] and sum(counts.not_downloaded.values()) > 0
    texts = list(iter_texts([src]))
    assert len(texts) == expect["success"]
    assert all(t == pre_caption(t) for t in texts)


def test_shard_dataset_streams_successful_rows_with_image_keys(
    ray_local: None, samples: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    folder, expect = samples
    ds = pairs_dataset(resolve_sources([str(folder)]), seed=0)
    rows = ds.take_all()
    assert len(rows) == expect["success"]
    assert set(rows[0]) == set(PAIR_COLUMNS)
    assert sum(r["image"] == BAD_BYTES for r in rows) == expect["undecodable"]
    assert all(r["image"] for r in rows), "failed rows (no image) never reach training"
    assert len({r["image_key"] for r in rows}) == len(rows), "web rows are distinct images"

    # Cleaned shards: the texts of one image (web + synthetic) share the image's uid, hence its key.
    cleaned = tmp_path / "cleaned"
    cleaned.mkdir()
    uid = "0" * 32
    table = pa.Table.from_pylist(
        [
            {
                "uid": uid,
                "text_uid": "a",
                "text": "a red circle",
                "text_source": "web",
                "round": 1,
                "image": _jpeg((255, 0, 0)),
            },
            {
                "uid": uid,
                "text_uid": "b",
                "text": "a red shape",
                "text_source": "synthetic",
                "round": 1,
                "image": _jpeg((255, 0, 0)),
            },
            {
                "uid": "1" * 32,
                "text_uid": "c",
                "text": "blue",
                "text_source": "human",
                "round": 1,
                "image": _jpeg((0, 0, 255)),
            },
        ],
        schema=S.CLEANED,
    )
    pq.write_table(table, cleaned / "00000.parquet")
    both = resolve_sources([str(cleaned), str(folder)])
    assert [s.kind for s in both] == ["cleaned", "samples"]
    assert count_pairs(both).usable == 3 + expect["success"]
    got = pairs_dataset(both[:1]).take_all()
    assert [r["image_key"] for r in got][:2] == [image_key(uid)] * 2 and got[2]["image_key"] != got[0][
        "image_key"
    ]


# ------------------------------------------------------------------------------------ collate


def test_collate_masks_prompt_and_padding_from_the_lm_labels(tokenizer: Any) -> None:
    rows = {
        "image": [_jpeg((255, 0, 0)), _jpeg((0, 255, 0))],
        "text": ["A Red Circle!", "a green square left of a small blue triangle"],
        "image_key": np.array([5, 7]),
    }
    plain, skipped = Collator(tokenizer, 32, max_length=20)(rows)
    assert plain is not None and skipped.undecodable == 0
    assert plain.pixel_values.shape == (2, 3, 32, 32)
    assert plain.image_ids.tolist() == [5, 7]
    pad = plain.attention_mask == 0
    assert pad[0].any(), "the short text is padded"
    assert (plain.lm_labels[pad] == -100).all()
    assert torch.equal(plain.lm_labels[~pad], plain.input_ids[~pad]), (
        "no prompt: every real token is a target"
    )

    collator = Collator(tokenizer, 32, max_length=20, prompt="a picture of ")
    prompted, _ = collator(rows)
    assert prompted is not None
    assert collator.prompt_length == 4, "[CLS] a picture of"
    prompt_ids = tokenizer("a picture of ", add_special_tokens=False).input_ids
    assert prompted.input_ids[:, 1:4].tolist() == [prompt_ids] * 2
    assert (prompted.lm_labels[:, :4] == -100).all(), "prompt tokens are not trained on"
    first = prompted.lm_labels[:, 4]
    assert torch.equal(first, prompted.input_ids[:, 4]), "the caption's first token is the first target"
    assert tokenizer.decode(prompted.input_ids[0, 4:6]) == "a red"


def test_collate_skips_and_counts_rows_it_cannot_use(tokenizer: Any) -> None:
    rows = {
        "image": [_jpeg((255, 0, 0)), BAD_BYTES, None, _jpeg((0, 0, 255))],
        "text": ["red", "green", "blue", "  ...  "],
        "image_key": [1, 2, 3, 4],
    }
    batch, skipped = Collator(tokenizer, 32)(rows)
    assert batch is not None and len(batch) == 1
    assert (skipped.undecodable, skipped.empty_text) == (2, 1)
    assert sum(skipped.reasons.values()) == 2
    none, all_skipped = Collator(tokenizer, 32)({"image": [BAD_BYTES], "text": ["x"], "image_key": [1]})
    assert none is None and all_skipped.undecodable == 1


def _raw_stream(n: int, batch: int) -> list[dict[str, list[Any]]]:
    rng = random.Random(0)
    images = [_jpeg((rng.randrange(256), rng.randrange(256), rng.randrange(256))) for _ in range(n)]
    images[3] = images[10] = BAD_BYTES
    texts = [f"shape number {i}" for i in range(n)]
    return [
        {
            "image": images[i : i + batch],
            "text": texts[i : i + batch],
            "image_key": list(range(i, min(i + batch, n))),
        }
        for i in range(0, n, batch)
    ]


def test_fixed_batches_are_full_and_resume_mid_stream_to_the_same_tensors(tokenizer: Any) -> None:
    stream = _raw_stream(40, batch=6)  # Ray batches of 6 rows, two rows undecodable
    collator = Collator(tokenizer, 32, min_scale=0.3)
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    skipped = SkipCounts()
    out = []
    states = []
    for batch, consumed in fixed_batches(stream, collator, 8, skipped):
        out.append((batch, consumed))
        states.append((torch.get_rng_state(), random.getstate(), np.random.get_state()))
    assert [len(b) for b, _ in out] == [8, 8, 8, 8], "38 usable rows -> 4 full batches, the tail dropped"
    assert [c for _, c in out] == [9, 18, 26, 34], "rows 3 and 10 are skipped on the way"
    assert skipped.undecodable == 2
    assert [k for b, _ in out for k in b.image_ids.tolist()][:9] == [0, 1, 2, 4, 5, 6, 7, 8, 9]

    # Resuming after batch 2 with its RNG state skips its rows undecoded and rebuilds batches 3, 4.
    torch_state, py_state, np_state = states[1]
    torch.set_rng_state(torch_state)
    random.setstate(py_state)
    np.random.set_state(np_state)
    resumed = list(fixed_batches(stream, collator, 8, SkipCounts(), skip_rows=out[1][1]))
    assert len(resumed) == 2
    for (a, ca), (b, cb) in zip(out[2:], resumed, strict=True):
        assert ca == cb
        for x, y in zip(a.tensors(), b.tensors(), strict=True):
            assert torch.equal(x, y)
