"""BLIP's own tiny checkpoints and outputs (../shared/blip_golden, made by salesforce/BLIP's code):
loaded the way a user loads them, every reference must match within ATOL, greedy ids exactly.

The fixture's README says what each tensor is and how BLIP computed it. The tiny models have
2 attention heads, which no registry architecture has, so the tests name their family with a
MedConfig JSON (as a user names med-base); everything else comes from the .pth itself.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capfilt.core.errors import ConfigError
from capfilt.model.blip_keys import (
    DROPPED_BUFFERS,
    DROPPED_TOP_LEVEL,
    blip_name,
    config_from_shapes,
    drop_reason,
    med_name,
)
from capfilt.model.checkpoint import check_role, inspect_checkpoint, load_checkpoint
from capfilt.model.config import MedConfig
from capfilt.model.med import Med
from capfilt.model.tokenizer import TokenIds, load_tokenizer, tokenize
from capfilt.model.weights import CheckpointError
from capfilt.stages.capfilt.caption import prompt_ids
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.capfilt.models import load_model, resolve_model

# ../shared/blip_golden beside the checkout (CI); CAPFILT_BLIP_GOLDEN points elsewhere (a worktree).
GOLDEN = Path(
    os.environ.get(
        "CAPFILT_BLIP_GOLDEN", Path(__file__).resolve().parents[1].parent / "shared" / "blip_golden"
    )
)
pytestmark = pytest.mark.skipif(
    not GOLDEN.is_dir(), reason=f"BLIP golden fixture not found at {GOLDEN} (the shared/ checkout)"
)
ATOL = 1e-5
REPORT: dict[str, float] = {}  # max abs diffs, printed at the end with -s


def _close(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    diff = (ours.float() - ref.float()).abs().max().item()
    REPORT[name] = diff
    print(f"golden {name}: max abs diff {diff:.3g}")
    assert ours.shape == ref.shape, name
    assert diff <= atol, f"{name}: max abs diff {diff}"


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "reference.safetensors")


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((GOLDEN / "reference.json").read_text())


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GOLDEN / "tokenizer")  # adds [DEC]=300, [ENC]=301 as BLIP's init_tokenizer


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """The tiny models' family as a user would write it: heads and eps. Its image size (224) and
    ids are deliberately not the checkpoints': those must come from the .pth and the tokenizer."""
    cfg = {
        "name": "blip-tiny",
        "vision": {"image_size": 224, "patch_size": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                   "mlp_size": 128, "layer_norm_eps": 1e-6},
        "text": {"vocab_size": 30524, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                 "max_position_embeddings": 512, "layer_norm_eps": 1e-12},
        "embed_dim": 16,
    }  # fmt: skip
    path = tmp_path_factory.mktemp("arch") / "blip-tiny.json"
    path.write_text(json.dumps(cfg))
    return path


def _stage_model(name: str, role, family: Path) -> Med:
    """As ``capfilt capfilt --captioner/--filter X.pth --tokenizer DIR --arch FAMILY`` loads it."""
    ref = resolve_model(GOLDEN / name, role, GOLDEN / "tokenizer", str(family))
    assert ref.image_size == 48  # read from visual_encoder.pos_embed, not the family's 224
    return load_model(ref, role, CapFiltConfig())


# ------------------------------------------------------------------------------------ captioner


def test_captioner_matches_blip_decoder(ref, meta, tok, family):
    med = _stage_model("caption_tiny.pth", "captioner", family)
    assert med.heads == {"lm"} and med.config.vision.image_size == 48
    texts = meta["caption_teacher_forcing_texts"]
    batch = tokenize(tok, texts, max_length=40)
    ids = batch["input_ids"].clone()
    ids[:, 0] = 300
    assert torch.equal(ids, ref["caption_input_ids"]) and torch.equal(
        batch["attention_mask"], ref["caption_attention_mask"]
    )
    with torch.no_grad():
        _close("caption_image_embeds", med.encode_image(ref["pixels_48"]), ref["caption_image_embeds"])
        embeds = med.encode_image(ref["pixels_48"].repeat_interleave(2, 0))
        ids, mask = ref["caption_input_ids"], ref["caption_attention_mask"]
        _close("caption_logits", med.lm_logits(embeds, ids, mask), ref["caption_logits"])
        _close(
            "caption_loss", med.lm_loss(embeds, ids, mask, labels=ref["caption_labels"]), ref["caption_loss"]
        )

    prompt = prompt_ids(tok, CapFiltConfig().prompt)  # what the CapFilt stage feeds after [DEC]
    greedy = med.generate(
        ref["pixels_48"], torch.tensor(prompt), sample=False, num_beams=1, max_length=20, min_length=3
    )
    assert torch.equal(greedy, ref["caption_greedy_ids"])
    REPORT["caption_greedy_ids"] = 0.0
    g = meta["caption_greedy"]
    assert tok.batch_decode(greedy, skip_special_tokens=True) == g["decoded_skip_special_tokens"]
    # The stage strips the prompt by tokens; BLIP by characters, which eats the "e" of a "##ed"
    # after "of" (image 2: BLIP "d end placed", the stage "##ed end placed", as the tokenizer
    # decodes a leading continuation). Every other caption is BLIP's string exactly.
    ours = tok.batch_decode(greedy[:, 1 + len(prompt) :], skip_special_tokens=True)
    blip = g["captions_returned_by_blip"]
    assert [ours[i] for i in (0, 1, 3)] == [blip[i] for i in (0, 1, 3)]
    assert ours[2] == "##ed end placed" and blip[2] == "d end placed"


# ------------------------------------------------------------------------------------- retrieval


def _itm_grid(med: Med, embeds, ids, mask, first: int | None) -> torch.Tensor:
    """ITM logits [I, T, 2] for every (image, text); ``first`` None: Med's own ([ENC] first)."""
    rows = []
    for i in range(embeds.shape[0]):
        e = embeds[i : i + 1].expand(ids.shape[0], -1, -1)
        if first is None:
            rows.append(med.itm_logits(e, ids, mask))
        else:  # BLIP_ITM's demo path keeps the tokenizer's [CLS]: the text encoder called directly
            hidden = med.text_encoder(
                input_ids=ids, attention_mask=mask, encoder_hidden_states=e
            ).last_hidden_state
            rows.append(med.itm_head(hidden[:, 0]))
    return torch.stack(rows)


def test_filter_matches_blip_retrieval_and_blip_itm(ref, meta, tok, family):
    med = _stage_model("retrieval_tiny.pth", "filter", family)
    assert med.heads == {"itc", "itm"}
    batch = tokenize(tok, meta["texts"], max_length=35)
    ids, mask = ref["retrieval_text_input_ids_cls"], ref["retrieval_text_attention_mask"]
    n = batch["input_ids"].shape[1]  # BLIP padded to 35; past the mask nothing changes
    assert torch.equal(batch["input_ids"], ids[:, :n]) and not ids[:, n:].any()
    with torch.no_grad():
        embeds = med.encode_image(ref["pixels_48"])
        _close("retrieval_image_embeds", embeds, ref["retrieval_image_embeds"])
        _close("retrieval_image_feat", med.image_feat(embeds), ref["retrieval_image_feat"])
        _close("retrieval_text_feat", med.text_feat(ids, mask), ref["retrieval_text_feat"])
        sim = med.itc_sim(embeds, ids, mask)
        _close("retrieval_itc_sim", sim, ref["retrieval_itc_sim"])
        enc = _itm_grid(med, embeds, ids, mask, None)
        _close("retrieval_itm_enc_logits", enc, ref["retrieval_itm_enc_logits"])
        _close("retrieval_itm_enc_p_match", enc.softmax(-1)[..., 1], ref["retrieval_itm_enc_p_match"])
        _close("retrieval_eval_score_i2t", enc[..., 1] + sim, ref["retrieval_eval_score_i2t"])
        cls = _itm_grid(med, embeds, ids, mask, 2)
        _close("itm_cls_logits", cls, ref["itm_cls_logits"])
        _close("itm_cls_p_match", cls.softmax(-1)[..., 1], ref["itm_cls_p_match"])
        ids_enc = ref["retrieval_text_input_ids_enc"]
        assert (ids_enc[:, 0] == 301).all() and torch.equal(ids_enc[:, 1:], ids[:, 1:])


# -------------------------------------------------------------------------------------- pretrain


def test_pretrain_checkpoint_at_its_own_size_and_resized_on_request(ref, meta, tok, family, caplog):
    ids_tok = TokenIds.from_tokenizer(tok)
    med = load_checkpoint(GOLDEN / "pretrain_tiny.pth", str(family), token_ids=ids_tok)
    assert med.heads == {"itc", "itm", "lm"} and med.config.vision.image_size == 32
    ids, mask = ref["pretrain_text_input_ids_cls"], ref["pretrain_text_attention_mask"]
    with torch.no_grad():
        embeds = med.encode_image(ref["pixels_32"])
        _close("pretrain_image_embeds", embeds, ref["pretrain_image_embeds"])
        _close("pretrain_image_feat", med.image_feat(embeds), ref["pretrain_image_feat"])
        _close("pretrain_text_feat", med.text_feat(ids, mask), ref["pretrain_text_feat"])
        _close("pretrain_itc_sim", med.itc_sim(embeds, ids, mask), ref["pretrain_itc_sim"])
        enc = _itm_grid(med, embeds, ids, mask, None)
        _close("pretrain_itm_enc_logits", enc, ref["pretrain_itm_enc_logits"])
        _close("pretrain_itm_enc_p_match", enc.softmax(-1)[..., 1], ref["pretrain_itm_enc_p_match"])
        lm_ids, lm_mask = ref["pretrain_lm_input_ids"], ref["pretrain_lm_attention_mask"]
        _close("pretrain_lm_logits", med.lm_logits(embeds, lm_ids, lm_mask), ref["pretrain_lm_logits"])
        labels = lm_ids.masked_fill(lm_mask == 0, -100)
        _close(
            "pretrain_lm_loss", med.lm_loss(embeds, lm_ids, lm_mask, labels=labels), ref["pretrain_lm_loss"]
        )

    # BLIP's fine-tuning start: blip_decoder(pretrained=pretrain_tiny.pth, image_size=48).
    with caplog.at_level(logging.WARNING):
        med48 = load_checkpoint(GOLDEN / "pretrain_tiny.pth", str(family), token_ids=ids_tok, image_size=48)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("from 32 px to 48 px" in m for m in warnings), warnings
    pos = med48.vision_model.embeddings.position_embedding
    _close("pretrain_as_decoder48_pos_embed", pos, ref["pretrain_as_decoder48_pos_embed"])
    ids48, mask48 = ref["pretrain_as_decoder48_input_ids"], ref["pretrain_as_decoder48_attention_mask"]
    labels48 = ids48.masked_fill(mask48 == 0, -100)
    labels48[:, :4] = -100  # BLIP_Decoder masks the prompt "a picture of" ([DEC] a picture of)
    with torch.no_grad():
        e48 = med48.encode_image(ref["pixels_48"])
        _close(
            "pretrain_as_decoder48_logits",
            med48.lm_logits(e48, ids48, mask48),
            ref["pretrain_as_decoder48_logits"],
        )
        loss = med48.lm_loss(e48, ids48, mask48, labels=labels48)
    _close("pretrain_as_decoder48_loss", loss, ref["pretrain_as_decoder48_loss"])


def test_a_pth_needs_no_arch_when_its_widths_name_the_family_and_never_resizes_unasked(tmp_path, caplog):
    """A 384 px BLIP-base-shaped .pth with no arch: med-base's family, run at 384, no resize."""
    torch.manual_seed(0)
    base = MedConfig.model_validate(
        json.loads((Path(__file__).resolve().parents[1] / "models" / "med-base.json").read_text())
    )
    keys = json.loads((GOLDEN / "base_keys" / "caption_base_384.json").read_text())["keys"]
    shapes = {k: tuple(v["shape"]) for k, v in keys.items()}
    for arch in (None, "med-base"):
        cfg = config_from_shapes(shapes, arch, "caption_base_384")
        assert cfg.vision.image_size == 384 and cfg.vision.num_heads == base.vision.num_heads
        assert cfg.model_dump(exclude={"vision"}) == base.model_dump(exclude={"vision"})
    with pytest.raises(ConfigError, match="med-large has 1024 x 24"):
        config_from_shapes(shapes, "med-large", "caption_base_384")


# -------------------------------------------------------------------- every key accounted for


@pytest.mark.parametrize(
    "manifest", sorted(p.name for p in (GOLDEN / "base_keys").glob("*.json")) if GOLDEN.is_dir() else []
)
def test_every_real_key_is_mapped_or_dropped_by_name(manifest):
    data = json.loads((GOLDEN / "base_keys" / manifest).read_text())
    shapes = {k: tuple(v["shape"]) for k, v in data["keys"].items()}
    kept = {k: s for k, s in shapes.items() if drop_reason(k) is None}
    cfg = config_from_shapes(kept, None, manifest)  # base or large found by widths alone
    with torch.device("meta"):
        med = Med(cfg)
    target = {k: tuple(v.shape) for k, v in med.state_dict().items()}
    unmapped = [k for k in kept if med_name(k) not in target]
    assert not unmapped, unmapped
    misshaped = [k for k, s in kept.items() if target[med_name(k)] != s]
    assert not misshaped, misshaped
    dropped = {k for k in shapes if k not in kept}
    assert {k.split(".", 1)[0] for k in dropped if k not in DROPPED_BUFFERS} <= set(DROPPED_TOP_LEVEL)
    # Names map both ways, so a missing key is reported in BLIP's naming.
    assert all(blip_name(med_name(k)) == k for k in kept)
    if "retrieval" in manifest or "pretrain" in manifest:
        assert {"visual_encoder_m", "text_encoder_m", "image_queue", "text_queue"} <= {
            k.split(".")[0] for k in dropped
        }


# ----------------------------------------------------------------------- errors before any work


def test_roles_are_checked_from_key_names(tmp_path):
    assert check_role(GOLDEN / "caption_tiny.pth", "captioner") == {"lm"}
    assert check_role(GOLDEN / "retrieval_tiny.pth", "filter") == {"itc", "itm"}
    assert check_role(GOLDEN / "pretrain_tiny.pth", "filter") == {"itc", "itm", "lm"}
    with pytest.raises(
        ConfigError, match=r"--filter .*caption_tiny\.pth \(blip_pth\) has heads \['lm'\]; a filter needs ITM"
    ):
        check_role(GOLDEN / "caption_tiny.pth", "filter", label="--filter")
    with pytest.raises(
        ConfigError, match=r"retrieval_tiny\.pth .*has heads \['itc', 'itm'\]; a captioner needs an LM"
    ):
        resolve_model(GOLDEN / "retrieval_tiny.pth", "captioner", GOLDEN / "tokenizer")


def test_unknown_and_missing_keys_are_named_in_blips_naming(tmp_path, family, tok, caplog):
    state = torch.load(GOLDEN / "caption_tiny.pth", weights_only=True)["model"]
    state["text_decoder.adapter.weight"] = torch.zeros(2)
    del state["visual_encoder.blocks.1.attn.qkv.bias"]
    path = tmp_path / "odd.pth"
    torch.save({"model": state}, path)
    ids = TokenIds.from_tokenizer(tok)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, str(family), token_ids=ids)
    assert "1 unexpected keys: text_decoder.adapter.weight" in str(err.value)
    assert "1 missing keys: visual_encoder.blocks.1.attn.qkv.bias" in str(err.value)
    state["visual_encoder.blocks.1.attn.qkv.bias"] = torch.zeros(96)
    torch.save({"model": state}, path)
    with caplog.at_level(logging.WARNING):
        load_checkpoint(path, str(family), token_ids=ids, strict=False)
    assert "text_decoder.adapter.weight" in caplog.text


def test_dropped_keys_are_logged_by_prefix_and_in_full_at_debug(family, tok, caplog):
    with caplog.at_level(logging.DEBUG, logger="capfilt.model.blip_keys"):
        load_checkpoint(GOLDEN / "retrieval_tiny.pth", str(family), token_ids=TokenIds.from_tokenizer(tok))
    info = [r.message for r in caplog.records if r.levelno == logging.INFO and "dropped" in r.message]
    assert (
        info
        and "visual_encoder_m (" in info[0]
        and "image_queue (1)" in info[0]
        and "idx_queue (1)" in info[0]
    )
    debug = [r.message for r in caplog.records if r.levelno == logging.DEBUG and "dropped keys" in r.message]
    assert debug and "text_encoder_m.embeddings.word_embeddings.weight" in debug[0]


def test_inspect_reads_the_config_of_a_pth_from_its_shapes(family, tok):
    info = inspect_checkpoint(
        GOLDEN / "pretrain_tiny.pth", str(family), token_ids=TokenIds.from_tokenizer(tok)
    )
    assert info.config.vision.image_size == 32 and info.config.text.vocab_size == 302
    assert (info.config.text.dec_token_id, info.config.text.enc_token_id, info.config.text.sep_token_id) == (
        300,
        301,
        3,
    )
    assert info.heads == {"itc", "itm", "lm"}


# ------------------------------------------------------------------ exports usable as is

# Runs in a fresh interpreter that never imports capfilt: what a transformers user does.
_PLAIN_TRANSFORMERS = r"""
import json, os, sys
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor, pipeline

cap_dir, filt_dir, golden = sys.argv[1:4]
images = [Image.open(os.path.join(golden, "images", n)).convert("RGB") for n in sorted(os.listdir(os.path.join(golden, "images")))]
out = {}
proc = BlipProcessor.from_pretrained(cap_dir)
out["pixels"] = proc(images=images, return_tensors="pt").pixel_values.tolist()
cap = BlipForConditionalGeneration.from_pretrained(cap_dir).eval()
# The model numerics on the fixture's own pixels; the processor's are compared on their own.
pixels = load_file(os.path.join(golden, "reference.safetensors"))["pixels_48"]
inputs = proc(images=images, text=["a picture of"] * 4, return_tensors="pt")
inputs["pixel_values"] = pixels
with torch.no_grad():
    out["greedy"] = cap.generate(**inputs, max_length=20, min_length=3, do_sample=False, num_beams=1).tolist()
# transformers 5 resolves "image-to-text" to "image-text-to-text", which wants a text prompt.
pipe = pipeline("image-to-text", model=cap_dir)
kwargs = {} if pipe.task == "image-to-text" else {"text": "a picture of"}
out["pipeline"] = pipe(images[0], generate_kwargs={"max_length": 20, "do_sample": False}, **kwargs)
out["pipeline_task"] = pipe.task

fproc = BlipProcessor.from_pretrained(filt_dir)
filt = BlipForImageTextRetrieval.from_pretrained(filt_dir).eval()
texts = json.load(open(os.path.join(golden, "reference.json")))["texts"]
enc = filt.config.text_config.capfilt_enc_token_id
cls_p, enc_p, itc = [], [], []
with torch.no_grad():
    for i, image in enumerate(images):
        batch = fproc(images=[image] * len(texts), text=texts, padding="max_length", max_length=35, return_tensors="pt")
        batch["pixel_values"] = pixels[i : i + 1].expand(len(texts), -1, -1, -1)
        cls_p.append(filt(**batch).itm_score.softmax(-1)[:, 1].tolist())
        itc.append(filt(**batch, use_itm_head=False).itm_score[0].tolist())
        batch["input_ids"][:, 0] = enc  # BLIP-trained ITM wants [ENC] first
        enc_p.append(filt(**batch).itm_score.softmax(-1)[:, 1].tolist())
out |= {"itm_cls_p": cls_p, "itm_enc_p": enc_p, "itc": itc, "capfilt_imported": "capfilt" in sys.modules}
print(json.dumps(out))
"""


def test_exports_run_in_plain_transformers(tmp_path, ref, meta, tok, family):
    import subprocess
    import sys

    from capfilt.model.hf import export_captioner, export_filter

    ids = TokenIds.from_tokenizer(tok)
    cap = export_captioner(
        load_checkpoint(GOLDEN / "caption_tiny.pth", str(family), token_ids=ids), tmp_path / "cap", tok
    )
    filt = export_filter(
        load_checkpoint(GOLDEN / "retrieval_tiny.pth", str(family), token_ids=ids), tmp_path / "filt", tok
    )
    pre = json.loads((cap / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 48, "width": 48} and pre["image_processor_type"] == "BlipImageProcessor"
    script = tmp_path / "plain.py"
    script.write_text(_PLAIN_TRANSFORMERS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(cap), str(filt), str(GOLDEN)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["capfilt_imported"] is False
    # Both squash with PIL bicubic; BlipImageProcessor rounds the resized image differently,
    # so pixels may differ by one grey level (1/255 / std 0.26 = 0.015 after normalising).
    _close("export_processor_pixels", torch.tensor(out["pixels"]), ref["pixels_48"], atol=0.016)
    assert torch.equal(torch.tensor(out["greedy"]), ref["caption_greedy_ids"])
    text = meta["caption_greedy"]["decoded_skip_special_tokens"][0]
    assert out["pipeline"][0]["generated_text"] == text, out["pipeline"]
    _close("export_itm_cls_p_match", torch.tensor(out["itm_cls_p"]), ref["itm_cls_p_match"])
    _close("export_itm_enc_p_match", torch.tensor(out["itm_enc_p"]), ref["retrieval_itm_enc_p_match"])
    _close("export_itc_sim", torch.tensor(out["itc"]), ref["retrieval_itc_sim"])


def test_a_recipe_may_leave_out_arch_for_a_pth_but_not_its_tokenizer(tmp_path):
    from capfilt.pipeline.recipe import recipe_model

    human = {"karpathy_train": str(tmp_path / "train.json")}  # not read: check_paths is off
    base = {"name": "golden", "out": str(tmp_path), "stages": ["capfilt"], "human": human}
    init = {"captioner": str(GOLDEN / "caption_tiny.pth"), "filter": str(GOLDEN / "retrieval_tiny.pth")}
    rec = recipe_model().model_validate(
        base | {"init": init | {"tokenizer": str(GOLDEN / "tokenizer")}}, context={"check_paths": False}
    )
    assert rec.init.arch is None
    with pytest.raises(ValueError, match="init.tokenizer"):
        recipe_model().model_validate(base | {"init": init}, context={"check_paths": False})


def test_a_published_model_of_the_wrong_role_fails_in_validate(tmp_path):
    """A retrieval .pth given as the captioner is refused by `capfilt validate`, before any work,
    naming the field, the file and the heads it has (it used to fail inside the Ray actor)."""
    import yaml
    from typer.testing import CliRunner

    from capfilt.cli import app

    body = {
        "name": "roles",
        "out": str(tmp_path / "run"),
        "stages": ["world", "finetune"],
        "world": {"n_web": 10, "n_human": 4, "n_test": 4},
        "init": {
            "captioner": str(GOLDEN / "retrieval_tiny.pth"),
            "filter": str(GOLDEN / "retrieval_tiny.pth"),
            "tokenizer": str(GOLDEN / "tokenizer"),
        },
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    out = CliRunner().invoke(app, ["validate", str(path)])
    assert out.exit_code == 2
    assert "init.captioner" in out.output and "retrieval_tiny.pth" in out.output
    assert "['itc', 'itm']" in out.output and "captioner needs an LM" in out.output
    body["init"]["captioner"] = str(GOLDEN / "caption_tiny.pth")
    path.write_text(yaml.safe_dump(body))
    ok = CliRunner().invoke(app, ["validate", str(path)])
    assert ok.exit_code == 0, ok.output


def test_check_role_maps_the_file_instead_of_reading_its_weights(monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mmap"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    check_role(GOLDEN / "retrieval_tiny.pth", "filter")
    assert calls == [True]
