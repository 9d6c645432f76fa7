"""Tests for caption cleaning, tokenizers and image transforms (capfilt.core.text, .tokenizer, .transforms)."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models
from torchvision import transforms as T
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerFast

from capfilt.core.text import pre_caption
from capfilt.model.tokenizer import (
    DEC_TOKEN,
    ENC_TOKEN,
    TokenIds,
    add_blip_special_tokens,
    load_tokenizer,
    tokenize,
    train_wordpiece,
)
from capfilt.model.transforms import (
    BLIP_RANDAUGMENT_OPS,
    CLIP_MEAN,
    CLIP_STD,
    decode_image,
    test_transform,
    train_transform,
)

# ---------------------------------------------------------------- pre_caption


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('A man. Riding! a "horse" (fast)*#:;~ ok', "a man riding a horse fast ok"),
        ("Don't stop, is it a well-known cat? yes/no", "don't stop, is it a well-known cat? yes/no"),
        ("A RED Circle", "a red circle"),
        ("  a\n\n b\t\tc \r\n", "a b c"),
        ("a\u00a0b\u3000c\u2028d", "a b c d"),  # NBSP, ideographic space, line separator
        ("...!!!", ""),
        ("", ""),
        ("   \n\t ", ""),
        (None, ""),
        ("red\x00 cir\x07cle\x1b", "red circle"),  # control characters dropped
        ("red\x85circle\x1fsquare", "red circle square"),  # NEL and unit separator are whitespace
        ("a\ud800b", "ab"),  # lone surrogate cannot be written as UTF-8
        ("A 🐶 Dog 👨\u200d👩\u200d👧", "a 🐶 dog 👨\u200d👩\u200d👧"),  # emoji, ZWJ sequence intact
        ("كلب أحمر صغير", "كلب أحمر صغير"),  # Arabic, right to left
        ("\u200fכלב אדום.", "\u200fכלב אדום"),  # Hebrew with a right-to-left mark
    ],
)
def test_pre_caption_cases(raw: str | None, expected: str) -> None:
    assert pre_caption(raw) == expected


def test_pre_caption_truncates_to_max_words() -> None:
    text = " ".join(f"w{i}" for i in range(40))
    assert pre_caption(text).split() == [f"w{i}" for i in range(30)]
    assert pre_caption(text, max_words=5) == "w0 w1 w2 w3 w4"
    assert pre_caption(text, max_words=None) == text
    assert pre_caption("a b", max_words=5) == "a b"


def test_pre_caption_is_idempotent() -> None:
    for raw in ['  A "Big" DOG!!  runs.\n', "x " * 50, "كلب 🐶 ~ ok"]:
        once = pre_caption(raw)
        assert pre_caption(once) == once


def test_pre_caption_of_a_long_input_stops_at_the_kept_words() -> None:
    """Work bounded by memory, not wall time: a long caption costs a few copies of its text, not an
    object per word (split stops after max_words). Measured: about 2 bytes per character with the
    bound, 12 when every word is split out (max_words=None)."""
    import tracemalloc

    long_text = "A red circle. " * 8000  # 112,000 characters, 24,000 words

    def peak_bytes(max_words: int | None) -> int:
        tracemalloc.start()
        try:
            out = pre_caption(long_text, max_words)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(out.split()) == (30 if max_words else 24_000)
        return peak

    assert peak_bytes(30) < 3 * len(long_text)
    assert peak_bytes(None) > 6 * len(long_text)  # the check would see a split into every word
    assert pre_caption("x" * 10_000) == "x" * 10_000


def test_pre_caption_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="decode bytes"):
        pre_caption(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_words"):
        pre_caption("a b", max_words=0)


# ---------------------------------------------------------------- tokenizer

SIZES, COLOURS = ("small", "large"), ("red", "green", "blue", "yellow")
SHAPES, RELATIONS = ("circle", "square", "triangle"), ("left of", "right of", "above", "below")
CORPUS = [
    f"a {s1} {c1} {h1} {rel} a {s2} {c2} {h2}"
    for (s1, c1, h1), rel, (s2, c2, h2) in itertools.product(
        [("small", "red", "circle"), ("large", "blue", "square"), ("small", "green", "triangle")],
        RELATIONS,
        itertools.product(SIZES, COLOURS, SHAPES),
    )
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    out_dir = tmp_path_factory.mktemp("tok")
    return train_wordpiece(CORPUS, vocab_size=300, out_dir=out_dir), out_dir


def test_trained_tokenizer_round_trips_corpus_without_unk(trained) -> None:
    tok, _ = trained
    for sentence in CORPUS:
        ids = tok(sentence)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == sentence
    # words the corpus never had still spell out from single characters, never [UNK]
    unseen = tok("Xylophone, zebra-42!")["input_ids"]
    assert tok.unk_token_id not in unseen
    assert tok.decode(unseen, skip_special_tokens=True) == "xylophone, zebra - 42!"


def test_trained_tokenizer_special_tokens(trained) -> None:
    tok, _ = trained
    bert_specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.convert_tokens_to_ids(bert_specials) == list(range(5))
    tokens = tok.tokenize(f"{DEC_TOKEN} a red {ENC_TOKEN} circle")
    assert tokens == [DEC_TOKEN, "a", "red", ENC_TOKEN, "circle"]
    ids = TokenIds.from_tokenizer(tok)
    assert (ids.pad, ids.cls, ids.sep) == (0, 2, 3)
    assert (ids.bos, ids.enc) == (len(tok) - 2, len(tok) - 1)
    assert ids.vocab_size == len(tok) < 300
    assert tok.bos_token == DEC_TOKEN
    assert len({ids.pad, ids.bos, ids.enc, ids.sep, ids.cls}) == 5


def test_tokenize_pads_to_longest_and_truncates(trained) -> None:
    tok, _ = trained
    ids = TokenIds.from_tokenizer(tok)
    batch = tokenize(tok, ["a red circle", CORPUS[0]], max_length=32)
    assert set(batch) == {"input_ids", "attention_mask"}
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    assert input_ids.dtype == torch.int64 and mask.dtype == torch.int64
    longest = len(tok(CORPUS[0])["input_ids"])
    assert input_ids.shape == mask.shape == (2, longest)
    short_len = len(tok("a red circle")["input_ids"])  # [CLS] a red circle [SEP]
    assert short_len == 5
    assert input_ids[0, 0] == ids.cls and input_ids[0, short_len - 1] == ids.sep
    assert (input_ids[0, short_len:] == ids.pad).all()
    assert mask[0].tolist() == [1] * short_len + [0] * (longest - short_len)
    assert mask[1].all()

    cut = tokenize(tok, [CORPUS[0]], max_length=5)["input_ids"]
    assert cut.shape == (1, 5) and cut[0, 0] == ids.cls and cut[0, -1] == ids.sep
    with pytest.raises(TypeError, match="wrap it in a list"):
        tokenize(tok, "a red circle", max_length=8)


def test_saved_tokenizer_loads_with_identical_ids(trained) -> None:
    tok, out_dir = trained
    loaded = load_tokenizer(out_dir)
    plain = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)  # no capfilt involved
    texts = [*CORPUS[:5], f"{ENC_TOKEN} a red circle", "xylophone"]
    expected = tokenize(tok, texts, max_length=20)
    for other in (loaded, plain):
        got = tokenize(other, texts, max_length=20)
        assert torch.equal(got["input_ids"], expected["input_ids"])
        assert torch.equal(got["attention_mask"], expected["attention_mask"])
        assert TokenIds.from_tokenizer(other) == TokenIds.from_tokenizer(tok)
    assert len(loaded) == len(tok)  # nothing added twice


@pytest.fixture()
def bert_like_dir(tmp_path):
    """A saved BERT tokenizer without [DEC]/[ENC], like a local copy of bert-base-uncased."""
    words = ["[PAD]", *[f"[unused{i}]" for i in range(3)], "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += ["a", "red", "circle", "left", "of", "blue", "square", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast.from_pretrained(str(tmp_path)).save_pretrained(str(tmp_path / "saved"))
    return tmp_path / "saved", len(words)


def test_load_tokenizer_adds_dec_and_enc(bert_like_dir) -> None:
    saved, n_words = bert_like_dir
    assert DEC_TOKEN not in AutoTokenizer.from_pretrained(str(saved)).get_vocab()
    tok = load_tokenizer(saved)
    ids = TokenIds.from_tokenizer(tok)
    assert (ids.pad, ids.cls, ids.sep) == (0, 5, 6)  # existing ids are untouched
    assert (ids.bos, ids.enc, ids.vocab_size) == (n_words, n_words + 1, n_words + 2)
    tokens = tok.tokenize(f"{DEC_TOKEN} red circles {ENC_TOKEN}")
    assert tokens == [DEC_TOKEN, "red", "circle", "##s", ENC_TOKEN]
    assert add_blip_special_tokens(tok) is tok and len(tok) == n_words + 2  # idempotent


def test_add_blip_special_tokens_keeps_other_special_tokens(bert_like_dir) -> None:
    saved, _ = bert_like_dir
    tok = AutoTokenizer.from_pretrained(str(saved))
    tok.add_special_tokens({"additional_special_tokens": ["[FOO]"]})
    add_blip_special_tokens(tok)
    assert {"[FOO]", ENC_TOKEN, DEC_TOKEN} <= set(tok.all_special_tokens)


def test_load_tokenizer_errors_say_what_to_do(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_tokenizer(tmp_path / "missing")
    # a tokenizer with no [PAD]/[CLS]/[SEP] cannot feed MED: fail at load time, naming what is missing
    backend = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(str(tmp_path / "wl"))
    with pytest.raises(ValueError, match="no cls, pad, sep token id"):
        load_tokenizer(tmp_path / "wl")


# ---------------------------------------------------------------- transforms


def _two_colour_image(width: int = 64, height: int = 48) -> Image.Image:
    """Left half pure red, right half pure blue."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2, 0] = 255
    array[:, width // 2 :, 2] = 255
    return Image.fromarray(array)


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)


def test_test_transform_shape_normalisation_and_determinism() -> None:
    colour = (200, 100, 50)
    image = Image.new("RGB", (50, 40), colour)
    transform = test_transform(32)
    out = transform(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (torch.tensor(colour) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out, expected.view(3, 1, 1).expand(3, 32, 32), atol=1e-5)
    two = _two_colour_image()
    assert torch.equal(transform(two), transform(two))


def test_train_transform_shape_and_caption_safe_defaults() -> None:
    transform = train_transform(32)
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in transform.transforms)
    image = _two_colour_image()
    for seed in range(20):
        torch.manual_seed(seed)
        out = transform(image)
        assert out.shape == (3, 32, 32)
        rgb = _unnormalise(out)
        # no flip and no hue change: red stays on the left and blue on the right
        assert rgb[0, :, 0].mean() > rgb[2, :, 0].mean(), seed
        assert rgb[2, :, -1].mean() > rgb[0, :, -1].mean(), seed


def test_train_transform_options() -> None:
    image = _two_colour_image()
    flipping = train_transform(32, hflip=True, randaugment=False)
    flipped = 0
    for seed in range(20):
        torch.manual_seed(seed)
        rgb = _unnormalise(flipping(image))
        flipped += int(rgb[2, :, 0].mean() > rgb[0, :, 0].mean())
    assert 0 < flipped < 20
    assert train_transform(24, min_scale=0.2, augment_ops=BLIP_RANDAUGMENT_OPS)(image).shape == (3, 24, 24)
    with pytest.raises(ValueError, match="Unknown RandAugment op"):
        train_transform(32, augment_ops=("Brightnes",))
    with pytest.raises(ValueError, match="min_scale"):
        train_transform(32, min_scale=0.0)


# ---------------------------------------------------------------- decode_image


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_decode_rgba_png_composites_on_white() -> None:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent
    out = decode_image(_encode(image, "PNG"))
    assert out.mode == "RGB" and out.size == (4, 4)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (255, 0, 0)


def test_decode_palette_png() -> None:
    image = Image.new("RGB", (4, 4), (0, 128, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    out = decode_image(_encode(image, "PNG"))
    assert out.mode == "RGB" and out.getpixel((2, 2)) == (0, 128, 0)

    transparent = Image.new("P", (2, 1))
    transparent.putpalette([10, 20, 30, 200, 0, 0])
    transparent.putpixel((1, 0), 1)
    transparent.info["transparency"] = 0
    out = decode_image(_encode(transparent, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (200, 0, 0)


def test_decode_16_bit_png_scales_instead_of_clipping() -> None:
    array = np.array([[0, 32896, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(array), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_image(data)
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_decode_cmyk_jpeg_and_grayscale() -> None:
    red = decode_image(_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    r, g, b = red.getpixel((4, 4))
    assert red.mode == "RGB" and r > 200 and g < 60 and b < 60
    grey = decode_image(_encode(Image.new("L", (8, 8), 90), "JPEG"))
    assert grey.mode == "RGB" and grey.getpixel((4, 4)) == (90, 90, 90)
    for mode in ("1", "LA"):
        assert decode_image(_encode(Image.new(mode, (3, 3)), "PNG")).mode == "RGB"


def test_decode_applies_exif_orientation() -> None:
    image = Image.new("RGB", (4, 2), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    assert decode_image(buffer.getvalue()).size == (2, 4)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20],
    ids=["empty", "garbage", "broken-png"],
)
def test_decode_rejects_undecodable_bytes(data: bytes) -> None:
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_image(data)


def test_decode_rejects_truncated_jpeg() -> None:
    data = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_image(data[: len(data) // 2])
