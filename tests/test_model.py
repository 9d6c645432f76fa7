"""MED: the config registry, shapes of every function, encoder/decoder sharing, and training hooks."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from capfilt.core.errors import ConfigError
from capfilt.model import create_med, get_config, list_configs
from capfilt.model.config import MedConfig


@pytest.fixture(scope="module")
def med():
    torch.manual_seed(0)
    return create_med("med-tiny").eval()


def _batch(med, batch: int = 3, length: int = 8):
    t = med.config.text
    pixels = torch.randn(batch, 3, med.config.vision.image_size, med.config.vision.image_size)
    ids = torch.randint(5, t.vocab_size - 2, (batch, length))
    ids[:, -1] = t.sep_token_id
    mask = torch.ones_like(ids)
    ids[0, 5:], mask[0, 5:] = t.pad_token_id, 0
    return pixels, ids, mask


# ------------------------------------------------------------------------------------------ configs


def test_registry_knows_the_three_architectures():
    assert {"med-tiny", "med-base", "med-large"} <= set(list_configs())


def test_base_and_large_have_blips_sizes():
    base, large = get_config("med-base"), get_config("med-large")
    for cfg in (base, large):
        t = cfg.text
        assert (t.vocab_size, t.hidden_size, t.num_layers, t.num_heads, t.intermediate_size) == (
            30524,
            768,
            12,
            12,
            3072,
        )
        assert (t.dropout, t.dec_token_id, t.enc_token_id, t.sep_token_id, t.pad_token_id) == (
            0.1,
            30522,
            30523,
            102,
            0,
        )
        assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.layer_norm_eps) == (224, 16, 1e-6)
        assert (cfg.embed_dim, cfg.queue_size, cfg.label_smoothing, cfg.temp) == (256, 57600, 0.1, 0.07)
    v = base.vision
    assert (v.hidden_size, v.num_layers, v.num_heads, v.mlp_size) == (768, 12, 12, 3072)  # ViT-B/16
    v = large.vision
    assert (v.hidden_size, v.num_layers, v.num_heads, v.mlp_size) == (1024, 24, 16, 4096)  # ViT-L/16


def test_configs_with_the_retired_momentum_and_alpha_still_load(tmp_path):
    # MedConfig no longer has momentum / alpha (the objectives' config holds them); the registry's
    # files and configs saved inside older checkpoints still carry them.
    assert not {"momentum", "alpha"} & set(MedConfig.model_fields)
    old = get_config("med-tiny").model_dump() | {"momentum": 0.995, "alpha": 0.4}
    assert MedConfig.model_validate(old) == get_config("med-tiny")
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert get_config(path) == get_config("med-tiny")
    with pytest.raises(ValueError, match="momentm"):
        MedConfig.model_validate(old | {"momentm": 0.9})  # any other unknown field is still refused


def test_generation_defaults_are_blips_and_stated_once():
    from capfilt.model.generation import Decoding, repetition_penalty

    assert (repetition_penalty(True), repetition_penalty(False), repetition_penalty(False, 1.3)) == (
        1.1,
        1.0,
        1.3,
    )
    text = get_config("med-tiny").text
    sampled = Decoding().generation_config(text)
    assert (sampled.do_sample, sampled.top_p, sampled.top_k, sampled.repetition_penalty) == (
        True,
        0.9,
        50,
        1.1,
    )
    beams = Decoding(sample=False, num_beams=3).generation_config(text)
    assert (beams.do_sample, beams.num_beams, beams.repetition_penalty) == (False, 3, 1.0)
    own = Decoding().generation_config(text, own_sampler=True)  # CapFilt's seeded sampler picks
    assert (own.do_sample, own.num_beams, own.repetition_penalty) == (False, 1, 1.1)
    assert (own.bos_token_id, own.eos_token_id, own.pad_token_id) == (
        text.dec_token_id,
        text.sep_token_id,
        text.pad_token_id,
    )


def test_config_errors_say_what_to_change(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model 'med-huge'; known: .*med-base"):
        get_config("med-huge")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vision": {"image_size": 60, "patch_size": 16}}))
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        get_config(bad)
    bad.write_text(json.dumps({"text": {"hidden_szie": 10}}))
    with pytest.raises(ConfigError, match="hidden_szie"):
        get_config(bad)
    good = tmp_path / "mine.json"
    good.write_text(get_config("med-tiny").to_json())
    assert get_config(good) == get_config("med-tiny")


def test_with_tokens_follows_a_tokenizer():
    cfg = get_config("med-tiny").with_tokens(
        vocab_size=300, pad_token_id=0, sep_token_id=2, dec_token_id=298, enc_token_id=299
    )
    assert (cfg.text.vocab_size, cfg.text.enc_token_id) == (300, 299)
    with pytest.raises(ValueError, match="do not fit vocab_size"):
        cfg.with_tokens(vocab_size=100, pad_token_id=0, sep_token_id=2, dec_token_id=298, enc_token_id=299)


# ------------------------------------------------------------------------------------------ shapes


def test_every_function_has_the_documented_shape(med):
    cfg = med.config
    pixels, ids, mask = _batch(med)
    patches = cfg.vision.num_patches
    with torch.no_grad():
        embeds = med.encode_image(pixels)
        assert embeds.shape == (3, 1 + patches, cfg.vision.hidden_size)
        assert med.image_feat(embeds).shape == (3, cfg.embed_dim)
        assert med.encode_text(ids, mask).shape == (3, 8, cfg.text.hidden_size)
        feat = med.text_feat(ids, mask)
        assert feat.shape == (3, cfg.embed_dim)
        torch.testing.assert_close(feat.norm(dim=-1), torch.ones(3))
        sim = med.itc_sim(embeds[:2], ids, mask)
        assert sim.shape == (2, 3) and sim.abs().max() <= 1 + 1e-6
        assert med.itc_logits(med.image_feat(embeds), feat).shape == (3, 3)
        assert med.itm_logits(embeds, ids, mask).shape == (3, 2)
        prob = med.itm_prob(embeds, ids, mask)
        assert prob.shape == (3,) and ((prob > 0) & (prob < 1)).all()
        assert med.lm_logits(embeds, ids, mask).shape == (3, 8, cfg.text.vocab_size)
        assert med.lm_loss(embeds, ids, mask).shape == ()
        assert med.lm_loss(embeds, ids, mask, reduction="none").shape == (3,)


def test_generate_shapes_prompt_and_options(med):
    pixels, _, _ = _batch(med, batch=2)
    t = med.config.text
    out = med.generate(pixels, sample=True, top_p=0.9, max_length=10, min_length=10, num_return_sequences=3)
    assert out.shape == (6, 10) and (out[:, 0] == t.dec_token_id).all()
    prompt = torch.tensor([7, 8, 9])
    out = med.generate(pixels, prompt, sample=False, num_beams=3, max_length=9, repetition_penalty=1.2)
    assert out.shape[0] == 2 and out.shape[1] <= 9
    assert (out[:, 1:4] == prompt).all()
    with pytest.raises(ValueError, match="leaves no room"):
        med.generate(pixels, prompt, max_length=4)
    with pytest.raises(TypeError, match="top_q"):
        med.generate(pixels, top_q=0.9)  # a misspelt option is an error, not ignored


def test_itm_always_uses_enc_and_lm_always_uses_dec(med):
    pixels, ids, mask = _batch(med)
    other = ids.clone()
    other[:, 0] = 17
    with torch.no_grad():
        embeds = med.encode_image(pixels)
        assert torch.equal(med.itm_logits(embeds, ids, mask), med.itm_logits(embeds, other, mask))
        assert torch.equal(med.lm_logits(embeds, ids, mask), med.lm_logits(embeds, other, mask))
        # ITC keeps the tokenizer's first token ([CLS]): changing it changes the feature.
        assert not torch.equal(med.text_feat(ids, mask), med.text_feat(other, mask))


def test_lm_loss_ignores_padding_and_smooths_labels(med):
    pixels, ids, mask = _batch(med)
    with torch.no_grad():
        embeds = med.encode_image(pixels)
        logits = med.lm_logits(embeds, ids, mask)[:, :-1]
        targets = ids.masked_fill(mask == 0, -100)[:, 1:]
        expected = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, label_smoothing=0.1
        )
        torch.testing.assert_close(med.lm_loss(embeds, ids, mask), expected)
        # Masking a prompt: labels -100 on its positions.
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :4] = -100
        assert med.lm_loss(embeds, ids, mask, labels=labels) != med.lm_loss(embeds, ids, mask)


# ------------------------------------------------------------------------------------------ sharing


def test_decoder_shares_everything_but_self_attention(med):
    enc, dec = med.text_encoder, med.text_decoder.bert
    for name, p in enc.embeddings.named_parameters():
        assert dict(dec.embeddings.named_parameters())[name] is p
    for enc_layer, dec_layer in zip(enc.encoder.layer, dec.encoder.layer, strict=True):
        for part in ("crossattention", "intermediate", "output"):
            mine = dict(getattr(enc_layer, part).named_parameters())
            theirs = dict(getattr(dec_layer, part).named_parameters())
            assert mine.keys() == theirs.keys() and mine
            assert all(theirs[k] is v and theirs[k].data_ptr() == v.data_ptr() for k, v in mine.items())
        # Self-attention (q, k, v, output dense and its LayerNorm) is the decoder's own.
        for (name, a), b in zip(
            enc_layer.attention.named_parameters(), dec_layer.attention.parameters(), strict=True
        ):
            assert a is not b and a.data_ptr() != b.data_ptr(), name
    # The LM head's output matrix is the (shared) word embedding; its transform is the decoder's own.
    assert med.text_decoder.cls.predictions.decoder.weight is enc.embeddings.word_embeddings.weight
    assert med.text_decoder.cls.predictions.decoder.bias is med.text_decoder.cls.predictions.bias


def test_one_optimiser_step_moves_shared_weights_for_both_paths():
    torch.manual_seed(0)
    med = create_med("med-tiny")
    pixels, ids, mask = _batch(med)
    embeds = med.encode_image(pixels)
    loss = (
        med.lm_loss(embeds, ids, mask)
        + med.itm_logits(embeds, ids, mask).sum()
        + med.itc_sim(embeds, ids, mask).sum()
    )
    loss.backward()
    shared = med.text_encoder.encoder.layer[0].crossattention.self.query.weight
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    dec_self = med.text_decoder.bert.encoder.layer[0].attention.self.query.weight
    assert dec_self.grad is not None and dec_self.grad.abs().sum() > 0
    assert med.vision_model.encoder.layers[0].self_attn.qkv.weight.grad.abs().sum() > 0


def test_momentum_copy_keeps_the_sharing():
    med = create_med("med-tiny")
    twin = copy.deepcopy(med)
    assert twin.text_decoder.bert.embeddings is twin.text_encoder.embeddings
    assert twin.text_encoder.embeddings is not med.text_encoder.embeddings
    ours, theirs = med.itc_parameters(), twin.itc_parameters()
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    names = {n.split(".", 1)[0] for n, _ in ours}
    assert names == {"vision_model", "vision_proj", "text_encoder", "text_proj"}
    assert not any("text_decoder" in n or "itm_head" in n for n, _ in ours)


# ------------------------------------------------------------------------------------------ training


def test_init_is_trainable_not_near_zero(med):
    # transformers' BlipVisionConfig defaults to an init std of 1e-10; MED sets config.init_std.
    std = med.config.init_std
    assert 0.8 * std < med.vision_model.encoder.layers[0].self_attn.qkv.weight.std() < 1.2 * std
    assert 0.8 * std < med.vision_model.embeddings.position_embedding.std() < 1.2 * std
    assert 0.8 * std < med.text_encoder.encoder.layer[0].crossattention.self.query.weight.std() < 1.2 * std
    assert med.temp.item() == pytest.approx(0.07)
    with torch.no_grad():
        med.temp.fill_(5.0)
    med.clamp_temp()
    assert med.temp.item() == pytest.approx(0.5)
    with torch.no_grad():
        med.temp.fill_(0.07)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    med = create_med("med-tiny").train()
    pixels, ids, mask = _batch(med)

    calls: list[str] = []
    med.vision_model.encoder.layers[0].self_attn.register_forward_hook(lambda *_: calls.append("vision"))
    med.text_encoder.encoder.layer[0].intermediate.register_forward_hook(lambda *_: calls.append("text"))

    def grads():
        calls.clear()
        med.zero_grad()
        torch.manual_seed(1)  # same dropout masks
        embeds = med.encode_image(pixels)
        (med.lm_loss(embeds, ids, mask) + med.itm_logits(embeds, ids, mask).sum()).backward()
        return [p.grad.clone() for p in med.parameters() if p.grad is not None]

    plain = grads()
    plain_calls = {part: calls.count(part) for part in ("vision", "text")}
    med.set_gradient_checkpointing(True)
    checkpointed = grads()
    # Layers ran again in the backward pass (hooks sit on early submodules: torch stops a
    # recompute once the last saved tensor is rebuilt, before the layer's final submodule returns).
    assert all(calls.count(part) > n for part, n in plain_calls.items()), (calls, plain_calls)
    med.set_gradient_checkpointing(False)
    assert len(plain) == len(checkpointed)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_set_image_size_resizes_the_position_table():
    med = create_med("med-tiny").eval()
    med.set_image_size(96)
    assert med.config.vision.image_size == 96
    with torch.no_grad():
        assert med.encode_image(torch.randn(1, 3, 96, 96)).shape == (1, 1 + 144, 96)


def test_config_is_validated():
    with pytest.raises(ValueError, match="enc_token_id"):
        MedConfig.model_validate({"text": {"dec_token_id": 5, "enc_token_id": 5}})
