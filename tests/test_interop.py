"""Interop: transformers BLIP directories, BLIP's original .pth, timm ViT and BERT into MED, and exports out.

The parity tests build tiny random transformers models, save them, load them into MED and compare
outputs on the same inputs. Tolerances: ATOL below (float32 on CPU; the observed max abs diff
is 0 for most checks, as both sides run the same modules).
"""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertModel,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
)

from capfilt.model import create_med
from capfilt.model.backbones import init_text_from_bert, init_vision_from_timm
from capfilt.model.blip_pth import load_blip_pth
from capfilt.model.checkpoint import load_checkpoint, load_med, save_med
from capfilt.model.config import MedConfig
from capfilt.model.hf import export_captioner, export_filter, load_hf, med_config_from_blip
from capfilt.model.med import Med
from capfilt.model.weights import CheckpointError
from capfilt.testing.blip import blip_names

ATOL = 1e-5
VOCAB, BOS, ENC, PAD, SEP = 99, 97, 98, 0, 2


def _hf_config() -> BlipConfig:
    # transformers-style values on purpose (vision eps 1e-5, no dropout), so loading must carry
    # them over rather than assume BLIP's.
    text = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=40,
        bos_token_id=BOS,
        pad_token_id=PAD,
        sep_token_id=SEP,
        eos_token_id=SEP,
        label_smoothing=0.1,
    )
    vision = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-5,
    )
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (LayerNorms and the near-zero default vision init included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.fixture(scope="module")
def hf_captioner(tmp_path_factory):
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(_hf_config()).eval()
    _perturb(model, 1)
    path = tmp_path_factory.mktemp("hf") / "captioner"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def hf_filter(tmp_path_factory):
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(_hf_config()).eval()
    _perturb(model, 2)
    path = tmp_path_factory.mktemp("hf") / "filter"
    model.save_pretrained(path)
    return model, path


def _inputs(batch: int = 3, length: int = 9, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, 32, 32, generator=gen)
    ids = torch.randint(3, 90, (batch, length), generator=gen)
    ids[:, -1] = SEP
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = PAD, 0  # one padded row
    return pixels, ids, mask


# ------------------------------------------------------------------------------ transformers parity


def test_captioner_logits_loss_and_generation_match_transformers(hf_captioner):
    hf, path = hf_captioner
    med = load_hf(path)
    assert med.heads == {"lm"}
    assert med.config.vision.layer_norm_eps == 1e-5 and med.config.text.enc_token_id == ENC
    pixels, ids, mask = _inputs()
    ids[:, 0] = BOS  # transformers' forward uses the ids as given; MED puts [DEC] first itself
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
        embeds = med.encode_image(pixels)
        logits = med.lm_logits(embeds, ids, mask)
        loss = med.lm_loss(embeds, ids, mask, labels=labels)
    torch.testing.assert_close(embeds, ref.image_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, ref.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, ref.loss, atol=ATOL, rtol=0)

    greedy = med.generate(pixels, sample=False, num_beams=1, max_length=14, min_length=1)
    assert torch.equal(greedy, hf.generate(pixel_values=pixels, max_length=14, do_sample=False, num_beams=1))
    beams = med.generate(pixels, sample=False, num_beams=3, max_length=12, min_length=4)
    assert torch.equal(beams, hf.generate(pixel_values=pixels, max_length=12, min_length=4, num_beams=3))
    # A prompt: transformers takes [CLS] prompt [SEP] and swaps/strips them; MED takes the bare prompt.
    prompt = torch.tensor([11, 12, 13])
    hf_prompt = torch.tensor([[5, 11, 12, 13, SEP]]).repeat(3, 1)
    ours = med.generate(pixels, prompt, sample=False, max_length=12, min_length=1)
    assert torch.equal(
        ours, hf.generate(pixel_values=pixels, input_ids=hf_prompt, max_length=12, do_sample=False)
    )
    assert torch.equal(ours[:, 1:4], prompt.expand(3, -1))


def test_filter_itm_and_itc_match_transformers_given_the_same_first_token(hf_filter):
    hf, path = hf_filter
    med = load_hf(path)
    assert med.heads == {"itc", "itm"}
    pixels, ids, mask = _inputs()
    with torch.no_grad():
        embeds = med.encode_image(pixels)
        # transformers keeps the first token as given (issues 22732, 25629): hand it [ENC] already.
        enc_ids = ids.clone()
        enc_ids[:, 0] = ENC
        ref_itm = hf(input_ids=enc_ids, pixel_values=pixels, attention_mask=mask).itm_score.softmax(-1)[:, 1]
        torch.testing.assert_close(med.itm_prob(embeds, ids, mask), ref_itm, atol=ATOL, rtol=0)
        ref_itc = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
        torch.testing.assert_close(med.itc_sim(embeds, ids, mask), ref_itc, atol=ATOL, rtol=0)
        # ... and with transformers' own first token the two differ: the divergence is real.
        plain = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score.softmax(-1)[:, 1]
        assert not torch.allclose(med.itm_prob(embeds, ids, mask), plain, atol=1e-3)


def test_captioner_cannot_be_used_as_filter(hf_captioner):
    med = load_hf(hf_captioner[1])
    pixels, ids, mask = _inputs()
    with pytest.raises(RuntimeError, match="no trained ITM weights.*BlipForImageTextRetrieval"):
        med.itm_prob(med.encode_image(pixels), ids, mask)
    with pytest.raises(RuntimeError, match=r"no trained ITC, ITM weights"):
        export_filter(med, "unused")


# ------------------------------------------------------------------------------------------ export


def _assert_same_tensors(hf_model: torch.nn.Module, med: Med, prefixes: tuple[str, ...]) -> None:
    ours = {k: v for k, v in med.state_dict().items() if k.startswith(prefixes)}
    theirs = hf_model.state_dict()
    assert set(ours) == set(theirs)
    unequal = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not unequal, unequal


def test_export_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    cfg = MedConfig.model_validate(
        {
            "vision": {"image_size": 32, "patch_size": 8, "hidden_size": 48, "num_layers": 2, "num_heads": 4, "mlp_size": 96},
            "text": {
                "vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
                "max_position_embeddings": 32, "sep_token_id": 2, "dec_token_id": 62, "enc_token_id": 63,
            },
            "embed_dim": 16,
        }
    )  # fmt: skip
    med = Med(cfg).eval()
    _perturb(med, 3)

    cap = BlipForConditionalGeneration.from_pretrained(export_captioner(med, tmp_path / "cap")).eval()
    _assert_same_tensors(cap, med, ("vision_model.", "text_decoder."))
    filt = BlipForImageTextRetrieval.from_pretrained(export_filter(med, tmp_path / "filt")).eval()
    _assert_same_tensors(
        filt, med, ("vision_model.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head.")
    )
    assert filt.config.text_config.capfilt_enc_token_id == 63
    assert (tmp_path / "cap" / "model.safetensors").is_file()

    # Loading the exports back gives the same model, functions included.
    pixels, ids, mask = (
        torch.randn(2, 3, 32, 32),
        torch.randint(3, 60, (2, 6)),
        torch.ones(2, 6, dtype=torch.long),
    )
    with torch.no_grad():
        embeds = med.encode_image(pixels)
        back_cap, back_filt = load_hf(tmp_path / "cap"), load_hf(tmp_path / "filt")
        assert torch.equal(back_cap.lm_logits(embeds, ids, mask), med.lm_logits(embeds, ids, mask))
        assert torch.equal(back_filt.itm_prob(embeds, ids, mask), med.itm_prob(embeds, ids, mask))
    assert back_filt.config == back_cap.config.model_copy(update={"name": "filt"})


def test_capfilt_format_round_trip(tmp_path):
    med = create_med("med-tiny")
    _perturb(med, 4)
    med.heads = frozenset({"lm"})
    back = load_checkpoint(save_med(med, tmp_path / "m"))
    assert back.heads == {"lm"} and back.config == med.config
    ours, theirs = med.state_dict(), back.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # Shared tensors are stored once.
    assert len(load_file(tmp_path / "m" / "model.safetensors")) == len({id(p) for p in med.parameters()})
    with pytest.raises(CheckpointError, match="capfilt_med.json"):
        load_med(tmp_path)


# -------------------------------------------------------------------------------- original BLIP .pth


def _with_training_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What BLIP's checkpoints also carry: momentum copies, queues, temp, position_ids buffers."""
    extra = {
        f"visual_encoder_m.{k.split('.', 1)[1]}": v + 1
        for k, v in state.items()
        if k.startswith("visual_encoder.")
    }
    extra |= {
        "image_queue": torch.randn(16, 8),
        "text_queue": torch.randn(16, 8),
        "ptr_queue": torch.zeros(1),
    }
    extra |= {"temp": torch.tensor(0.05), "text_encoder_m.embeddings.word_embeddings.weight": torch.zeros(3)}
    return state | extra


def test_original_pth_loads_with_identical_outputs(tmp_path, hf_captioner, hf_filter):
    pixels, ids, mask = _inputs()
    for hf, kind in ((hf_captioner[0], "caption"), (hf_filter[0], "retrieval")):
        state = _with_training_state(blip_names(hf.state_dict()))
        state[
            "text_decoder.bert.embeddings.position_ids"
            if kind == "caption"
            else "text_encoder.embeddings.position_ids"
        ] = torch.arange(40)[None]
        path = tmp_path / f"model_base_{kind}.pth"
        torch.save({"model": state, "epoch": 4, "config": {"image_size": 32}}, path)
        med = load_checkpoint(path, med_config_from_blip(hf.config))
        with torch.no_grad():
            embeds = med.encode_image(pixels)
            if kind == "caption":
                assert med.heads == {"lm"}
                ids_bos = ids.clone()
                ids_bos[:, 0] = BOS
                ours = med.lm_logits(embeds, ids, mask)
                # Same tensors, same call: exact. transformers' forward runs its decoder with the
                # KV cache on (use_cache defaults to True), whose cross-attention path rounds
                # differently (max 2e-6 here): close, not equal, and not a loading error.
                ref = hf.text_decoder(
                    input_ids=ids_bos, attention_mask=mask, encoder_hidden_states=embeds, use_cache=False
                ).logits
                assert torch.equal(ours, ref)
                forward = hf(pixel_values=pixels, input_ids=ids_bos, attention_mask=mask).logits
                torch.testing.assert_close(ours, forward, atol=ATOL, rtol=0)
            else:
                assert med.heads == {"itc", "itm"} and med.temp.item() == pytest.approx(0.05)
                enc_ids = ids.clone()
                enc_ids[:, 0] = ENC
                ref = hf(input_ids=enc_ids, pixel_values=pixels, attention_mask=mask).itm_score.softmax(-1)[
                    :, 1
                ]
                assert torch.equal(med.itm_prob(embeds, ids, mask), ref)


def test_original_pretrain_pth_with_every_part_and_a_resized_position_table(tmp_path):
    torch.manual_seed(0)
    src = create_med("med-tiny").eval()
    _perturb(src, 5)
    state = _with_training_state(blip_names(src.state_dict()))
    path = tmp_path / "model_base.pth"
    torch.save({"model": state}, path)
    med = load_blip_pth(path, "med-tiny")
    assert med.heads == {"itc", "itm", "lm"}
    unequal = [k for k, v in med.state_dict().items() if not torch.equal(v, src.state_dict()[k])]
    assert unequal == ["temp"] and med.temp.item() == pytest.approx(0.05)  # temp comes from the checkpoint

    # The image size is the checkpoint's (64 px) whatever the family says; another one is asked
    # for explicitly, and only then is the 8x8 grid resized (to 12x12).
    big = med.config.model_dump()
    big["vision"]["image_size"] = 96
    assert load_blip_pth(path, MedConfig.model_validate(big)).config.vision.image_size == 64
    med96 = load_blip_pth(path, "med-tiny", image_size=96)
    assert med96.encode_image(torch.randn(1, 3, 96, 96)).shape == (1, 145, 96)

    # A decoder whose shared tensors differ from the encoder's cannot be one MED.
    state["text_decoder.bert.embeddings.LayerNorm.weight"] = (
        state["text_encoder.embeddings.LayerNorm.weight"] + 1
    )
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"different values.*embeddings\.LayerNorm\.weight"):
        load_blip_pth(path, "med-tiny")


def test_a_pth_runs_at_its_own_image_size_without_arch_and_without_resizing(tmp_path, caplog):
    torch.manual_seed(0)
    src = create_med("med-tiny").eval()
    src.set_image_size(96)  # as a 384 px BLIP checkpoint is to med-base's 224
    _perturb(src, 8)
    path = tmp_path / "model_96.pth"
    torch.save({"model": _with_training_state(blip_names(src.state_dict()))}, path)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        med = load_checkpoint(path)  # no arch: med-tiny is the one family with these widths
    assert med.config.vision.image_size == 96 and med.config.model_dump(
        exclude={"name"}
    ) == src.config.model_dump(exclude={"name"})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "visual_encoder_m (" in caplog.text and "image_queue (1)" in caplog.text  # drops counted by prefix
    pixels = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(med.encode_image(pixels), src.encode_image(pixels))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # would create the marker file when unpickled


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"visual_encoder.cls_token": torch.zeros(1)}, "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*weights_only=True"):
        load_blip_pth(path, "med-tiny")
    assert not marker.exists()


def test_key_mismatch_names_the_keys(tmp_path, hf_captioner):
    _, path = hf_captioner
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "generation_config.json"):
        (bad / name).write_bytes((path / name).read_bytes())
    state = load_file(path / "model.safetensors")
    del state["text_decoder.bert.encoder.layer.1.attention.self.key.bias"]
    state["text_decoder.bert.extra.weight"] = torch.zeros(2)
    state["vision_model.post_layernorm.weight"] = torch.zeros(7)
    save_file(state, bad / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_hf(bad)
    msg = str(err.value)
    assert "1 missing keys: text_decoder.bert.encoder.layer.1.attention.self.key.bias" in msg
    assert "1 unexpected keys: text_decoder.bert.extra.weight" in msg
    assert "vision_model.post_layernorm.weight: checkpoint [7] vs model [48]" in msg


# ------------------------------------------------------------------------------------ timm and BERT


def test_timm_vit_gives_the_same_features():
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=96, depth=3, num_heads=4,
        mlp_ratio=4.0, num_classes=10,
    ).eval()  # fmt: skip
    _perturb(vit, 6)
    med = create_med("med-tiny").eval()
    init_vision_from_timm(med, vit)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # timm's fused attention and BlipAttention's matmul-softmax differ in float rounding only.
        torch.testing.assert_close(
            med.encode_image(pixels), vit.forward_features(pixels), atol=ATOL, rtol=1e-5
        )

    deeper = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=64,
        patch_size=8,
        embed_dim=96,
        depth=4,
        num_heads=4,
    )
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.3\.attn\.proj\.bias"):
        init_vision_from_timm(med, deeper)


def test_bert_init_matches_bert_without_token_types():
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(vocab_size=1000, hidden_size=96, num_hidden_layers=3, num_attention_heads=4, intermediate_size=384, max_position_embeddings=128)
    ).eval()  # fmt: skip
    _perturb(bert, 7)
    with torch.no_grad():
        bert.embeddings.token_type_embeddings.weight.zero_()  # MED has no token types
    med = create_med("med-tiny").eval()
    new_rows = med.text_encoder.embeddings.word_embeddings.weight[1000:].clone()
    init_text_from_bert(med, bert.state_dict())
    ids = torch.randint(5, 1000, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(med.encode_text(ids), bert(ids).last_hidden_state, atol=ATOL, rtol=0)
    # The decoder's self-attention starts from BERT's too, as its own copy; [DEC]/[ENC] rows keep their init.
    enc_q = med.text_encoder.encoder.layer[0].attention.self.query.weight
    dec_q = med.text_decoder.bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(enc_q, dec_q) and enc_q is not dec_q
    assert torch.equal(med.text_encoder.embeddings.word_embeddings.weight[1000:], new_rows)
