"""The fast inference path: SDPA attention against transformers' eager BLIP code, image
cross-attention keys/values shared by all captions and texts of an image, half precision, and
the batch size / actor counts chosen from GPU memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from capfilt.core.errors import ConfigError
from capfilt.model import create_med, get_config
from capfilt.model.tokenizer import load_tokenizer
from capfilt.stages.capfilt.caption import (
    _generate,
    _seeded_sampler_class,
    caption_batch,
    caption_uniforms,
    decoding,
)
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.capfilt.models import inference_dtype, load_model, resolve_model
from capfilt.stages.capfilt.pixels import pixel_column
from capfilt.stages.capfilt.score import _layout, score_batch
from capfilt.stages.capfilt.sizing import (
    MAX_ACTORS_PER_GPU,
    MAX_AUTO_BATCH,
    USABLE,
    activation_bytes,
    auto_batch,
    param_count,
    sized,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UIDS = ["img-a", "img-b", "img-c"]


@pytest.fixture(scope="module")
def med():
    torch.manual_seed(0)
    return create_med("med-tiny").eval()


@pytest.fixture(scope="module")
def pixels(med):
    s = med.config.vision.image_size
    return torch.randn(3, 3, s, s, generator=torch.Generator().manual_seed(1))


def _cross_key_rows(med):
    """(rows, hook): the batch size of every cross-attention key projection of the first layer."""
    rows: list[int] = []
    key = med.text_encoder.encoder.layer[0].crossattention.self.key
    return rows, key.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))


def _sample_repeated(med, embeds, cfg, prompt):
    """Seeded-sampled captions the way caption_batch made them before sharing: the image
    embeddings repeated k times, one row of keys/values per caption."""
    t = med.config.text
    rows = embeds.shape[0] * cfg.k
    start = torch.full((rows, 1 + len(prompt)), t.dec_token_id, dtype=torch.long)
    start[:, 1:] = torch.tensor(prompt)
    sampler = _seeded_sampler_class()(
        caption_uniforms(UIDS, cfg.k, cfg.seed, cfg.max_length), start.shape[1], cfg.top_p, cfg.top_k
    )
    return med.text_decoder.generate(
        input_ids=start,
        attention_mask=torch.ones_like(start),
        encoder_hidden_states=embeds.repeat_interleave(cfg.k, dim=0),
        generation_config=decoding(cfg).generation_config(t, own_sampler=True),
        logits_processor=LogitsProcessorList([sampler]),
    )


# ------------------------------------------------------------------ shared image keys/values


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_k_captions_share_their_image_keys_and_decode_the_same_ids(med, pixels, impl):
    cfg = CapFiltConfig(k=3, max_length=14, min_length=14)
    prompt = [5, 6]
    med.set_attention(impl)
    try:
        with torch.inference_mode():
            embeds = med.encode_image(pixels)  # [3, 1+P, Dv]
            rows, hook = _cross_key_rows(med)
            shared = _generate(med, embeds, UIDS, prompt, cfg)
            hook.remove()
            assert rows == [3], "one key projection over the 3 images, none for the 9 rows or later steps"
            repeated = _sample_repeated(med, embeds, cfg, prompt)
    finally:
        med.set_attention("eager")
    assert shared.shape == (9, 14)
    assert torch.equal(shared, repeated)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_itm_over_r_texts_per_image_equals_one_image_row_per_text(med, pixels, impl):
    ids = torch.randint(5, 900, (6, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding in one text
    med.set_attention(impl)
    try:
        with torch.inference_mode():
            embeds = med.encode_image(pixels)
            shared = med.itm_prob(embeds, ids, mask)  # texts 2b, 2b+1 with image b
            per_pair = med.itm_prob(embeds.repeat_interleave(2, dim=0), ids, mask)
    finally:
        med.set_attention("eager")
    torch.testing.assert_close(shared, per_pair, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="R adjacent texts"):
        med.itm_prob(embeds, ids[:5], mask[:5])  # 5 texts cannot be split over 3 images


def test_layout_gives_each_image_r_slots_and_each_pair_its_own():
    # image 0 has 2 pairs, image 3 has 1 (say its web text was empty), image 5 has 2
    to_score = [(0, "a", 0), (0, "b", 1), (3, "c", 2), (5, "d", 3), (5, "e", 4)]
    images, slots, slot_of = _layout(to_score)
    assert images == [0, 3, 5]
    assert slots == [0, 1, 2, 2, 3, 4]  # R = 2; image 3 repeats its only pair
    assert [slots[s] for s in slot_of] == [0, 1, 2, 3, 4]
    assert [s // 2 for s in slot_of] == [0, 0, 1, 2, 2]


# ------------------------------------------------------------------------------ SDPA vs eager


def test_sdpa_gives_eagers_outputs(med, pixels):
    ids = torch.randint(5, 900, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    outs = {}
    for impl in ("eager", "sdpa"):
        med.set_attention(impl)
        with torch.inference_mode():
            embeds = med.encode_image(pixels)
            outs[impl] = (
                embeds,
                med.lm_logits(embeds, ids, mask),
                med.itm_prob(embeds, ids, mask),
                med.text_feat(ids, mask),
                med.generate_from_embeds(embeds, sample=False, max_length=12, min_length=12),
            )
    med.set_attention("eager")
    for a, b in zip(outs["eager"][:4], outs["sdpa"][:4], strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert torch.equal(outs["eager"][4], outs["sdpa"][4]), "greedy ids"


def test_set_attention_rejects_an_unknown_kernel(med):
    with pytest.raises(ValueError, match="attention must be one of"):
        med.set_attention("flash")


# --------------------------------------------------------------------------- dtype, loading


def test_auto_dtype_is_float32_on_cpu_and_names_are_kept():
    assert inference_dtype("auto", "cpu") == torch.float32
    assert inference_dtype("bfloat16", "cpu") == torch.bfloat16
    assert inference_dtype("float16", "cuda") == torch.float16


@pytest.fixture(scope="module")
def exported(tiny_models):
    return tiny_models


def _world_batch(n: int, size: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "uid": np.asarray([f"u{i}" for i in range(n)], dtype=object),
        "text": np.asarray(
            ["a red circle", "two blue squares", "a star", "a green triangle"][:n], dtype=object
        ),
        "row": np.arange(n),
        "error": np.asarray([""] * n, dtype=object),
        pixel_column(size): rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
    }


def test_bfloat16_sdpa_path_runs_and_scores_near_float32(exported: dict[str, Path]):
    cap_ref, filt_ref = (
        resolve_model(exported["captioner"], "captioner"),
        resolve_model(exported["filter"], "filter"),
    )
    tok = load_tokenizer(cap_ref.tokenizer)
    batch = _world_batch(4, cap_ref.image_size)
    scores = {}
    for dtype in ("float32", "bfloat16"):
        cfg = CapFiltConfig(k=2, max_length=12, dtype=dtype, attention="sdpa")
        cap = load_model(cap_ref, "captioner", cfg, device="cpu")
        filt = load_model(filt_ref, "filter", cfg, device="cpu")
        assert next(cap.parameters()).dtype == getattr(torch, dtype)
        captioned = caption_batch(cap, tok, batch, cfg)
        assert all(len(c) == 2 and all(isinstance(x, str) for x in c) for c in captioned["captions"])
        # the same texts for both dtypes: the float32 captions
        if dtype == "float32":
            fixed = captioned
        table = score_batch(filt, tok, fixed, cfg).to_pydict()
        scores[dtype] = np.asarray(table["itm_score"], dtype=np.float64)
    assert np.isfinite(scores["bfloat16"]).all()
    np.testing.assert_allclose(scores["bfloat16"], scores["float32"], atol=0.03)


# ---------------------------------------------------------------------------------- sizing

BASE = get_config("med-base")
BASE_384 = BASE.model_copy(update={"vision": BASE.vision.model_copy(update={"image_size": 384})})
GiB = 2**30


def test_param_count_is_the_models_within_two_percent():
    for cfg in (get_config("med-tiny"), BASE_384):
        with torch.device("meta"):
            model = create_med(cfg)
        real = sum(p.numel() for p in model.parameters())
        assert abs(param_count(cfg) - real) / real < 0.02, (cfg.name, param_count(cfg), real)


@pytest.mark.parametrize("free_gib", [2, 8, 24, 80, 141])
def test_auto_batch_is_the_largest_power_of_two_that_fits(free_gib):
    cfg = CapFiltConfig(k=1, dtype="bfloat16")
    free = free_gib * GiB
    s = auto_batch(cfg, BASE_384, BASE_384, free, gpus=1)
    weights = 2 * param_count(BASE_384) * 2
    per_image = activation_bytes(BASE_384, "captioner", cfg, 2) + activation_bytes(BASE_384, "filter", cfg, 2)
    assert weights + s.batch_size * per_image <= free * USABLE
    assert s.batch_size & (s.batch_size - 1) == 0
    assert s.batch_size == MAX_AUTO_BATCH or weights + 2 * s.batch_size * per_image > free * USABLE
    pair = weights + s.batch_size * per_image
    assert 1 <= s.captioner_actors == s.filter_actors <= MAX_ACTORS_PER_GPU
    assert s.captioner_actors * pair <= free * USABLE


def test_auto_batch_grows_with_memory_scales_actors_with_gpus_and_keeps_what_was_set():
    cfg = CapFiltConfig(k=3, dtype="bfloat16")
    small, big = (auto_batch(cfg, BASE_384, BASE_384, g * GiB, gpus=1) for g in (4, 80))
    assert small.batch_size < big.batch_size
    four = auto_batch(cfg, BASE_384, BASE_384, 80 * GiB, gpus=4)
    assert four.batch_size == big.batch_size and four.captioner_actors == 4 * big.captioner_actors
    fp32 = auto_batch(cfg.model_copy(update={"dtype": "float32"}), BASE_384, BASE_384, 4 * GiB, gpus=1)
    assert fp32.batch_size < small.batch_size, "float32 takes twice the bytes"
    given = CapFiltConfig(k=3, dtype="bfloat16", batch_size=48, filter_actors=3)
    s = auto_batch(given, BASE_384, BASE_384, 80 * GiB, gpus=2)
    assert (s.batch_size, s.filter_actors) == (48, 3) and s.captioner_actors == 2 * big.captioner_actors
    alone = auto_batch(cfg, None, BASE_384, 4 * GiB, gpus=1)
    assert alone.batch_size >= small.batch_size, "a filter alone fits at least the pair's batch"


def test_auto_batch_fails_clearly_when_one_image_does_not_fit():
    with pytest.raises(ConfigError, match=r"GiB are free; lower capfilt.batch_size"):
        auto_batch(CapFiltConfig(), BASE_384, BASE_384, GiB // 4, gpus=1)


def test_sized_leaves_cpu_runs_alone_and_sets_gpu_runs():
    cfg = CapFiltConfig()
    assert sized(cfg, BASE_384, BASE_384, None, gpus=0) is cfg
    gpu = sized(cfg, BASE_384, BASE_384, 80 * GiB, gpus=1)
    assert gpu.batch_size == MAX_AUTO_BATCH and gpu.captioner_actors >= 1
    assert gpu.output_settings() == cfg.output_settings(), "sizing changes no output setting"
