"""BLIP's objectives: each one learns, momentum and queues follow BLIP exactly, hard negatives are
valid and come from every worker's batch, and the whole state survives a state_dict round trip."""

from __future__ import annotations

import datetime
import logging
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from pydantic import ValidationError

from capfilt.core.errors import ConfigError
from capfilt.model import create_med, get_config
from capfilt.model.config import MedConfig
from capfilt.model.objectives import (
    MedObjectives,
    ObjectiveConfig,
    all_gather_with_grad,
    itc_ground_truth,
    sample_hard_negatives,
)

logger = logging.getLogger(__name__)

CLS, SEP, PAD = 2, 3, 0


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


def micro_config() -> MedConfig:
    """Smaller than med-tiny (32 px, width 64, 2 layers) and without dropout, so a few dozen steps
    on a fixed batch show each objective learning."""
    cfg = get_config("med-tiny").model_dump()
    cfg["vision"].update(image_size=32, hidden_size=64, num_layers=2, mlp_size=128)
    cfg["text"].update(
        vocab_size=256,
        hidden_size=64,
        num_layers=2,
        intermediate_size=128,
        max_position_embeddings=16,
        dropout=0.0,
        attention_dropout=0.0,
        dec_token_id=254,
        enc_token_id=255,
    )
    cfg["embed_dim"] = 32
    return MedConfig.model_validate(cfg)


def make_batch(
    batch: int = 8, length: int = 8, seed: int = 0, size: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch`` solid-colour images of distinct random colours and as many random captions
    ``[CLS] w1 .. wk [SEP]``; the first row is padded to show masking works."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(batch, 3, generator=g) * 4 - 2  # roughly CLIP-normalised range
    pixels = colours[:, :, None, None].expand(batch, 3, size, size).clone()  # [B, 3, S, S]
    ids = torch.randint(5, 250, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[0, length - 2], ids[0, length - 1], mask[0, length - 1] = SEP, PAD, 0
    return pixels, ids, mask


def build(seed: int = 0, **cfg: object) -> MedObjectives:
    torch.manual_seed(seed)
    return MedObjectives(create_med(micro_config()), ObjectiveConfig.model_validate(cfg))


def train(obj: MedObjectives, steps: int, lr: float = 1e-3, key: str = "loss") -> list[float]:
    """AdamW on one fixed batch, the way the training loop drives the module; returns ``key`` per step.
    Gradients are clipped to norm 1: ITM from scratch sits on a plateau, then escapes with spikes."""
    pixels, ids, mask = make_batch()
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    curve = []
    for step in range(steps):
        out = obj(pixels, ids, mask, image_ids=torch.arange(8), step=step)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(obj.parameters(), 1.0)
        opt.step()
        obj.med.clamp_temp()
        curve.append(out[key].item())
    return curve


# ------------------------------------------------------------------------------------ learning

# name: (config, steps, lr, the mean of the last 10 losses must be below this fraction of the first).
# ITC uses momentum 0.9 and a queue of one batch: on a fixed 8-sample batch BLIP's 0.995 barely
# moves the momentum keys in 30 steps, and a long queue fills with stale copies of each sample's own
# positive, which caps how low the loss can go. ITM alone starts at the prior (~0.64, a third of the
# pairs match) and must learn the colour-caption binding from scratch: the slowest of the three.
# The first ITC loss depends on the random initial queue (2.8 to 4.7 over seeds 0-3), hence the
# looser ITC margin; over seeds 0-3 the ratios were ITC 0.32-0.64, ITM 0.21-0.59, LM 0.62, all 0.46-0.57.
LEARNING = {
    "itc": ({"itm": 0, "lm": 0, "momentum": 0.9, "queue_size": 8}, 30, 1e-3, 0.7),
    "itm": ({"itc": 0, "lm": 0}, 100, 2e-3, 0.75),
    "lm": ({"itc": 0, "itm": 0}, 40, 1e-3, 0.7),
    "all": ({"momentum": 0.9, "queue_size": 8}, 40, 1e-3, 0.65),
}


@pytest.mark.parametrize("name", list(LEARNING))
def test_each_objective_alone_and_all_together_learn(name):
    cfg, steps, lr, ratio = LEARNING[name]
    obj = build(**cfg)
    curve = train(obj, steps, lr, key="loss" if name == "all" else f"loss_{name}")
    start, end = curve[0], sum(curve[-10:]) / 10
    logger.info("%s: start %.3f, mean of last 10 %.3f after %d steps", name, start, end, steps)
    assert all(math.isfinite(v) for v in curve)
    assert end < ratio * start, f"{name} loss went {start:.3f} -> {end:.3f}, wanted below {ratio} x start"


def test_disabled_objectives_are_skipped_and_build_nothing():
    obj = build(itc=0, itm=0)
    assert obj.momentum_med is None and not hasattr(obj, "image_queue")
    out = obj(*make_batch())
    assert set(out) == {"loss", "loss_lm"}
    assert out["loss"].requires_grad and not out["loss_lm"].requires_grad
    assert set(build(itm=0, lm=0)(*make_batch())) == {"loss", "loss_itc"}
    with pytest.raises(ValidationError, match="at least one"):
        ObjectiveConfig(itc=0, itm=0, lm=0)


def test_loss_is_the_weighted_sum_and_lm_labels_are_used():
    obj = build(itc=0.5, itm=2.0, lm=3.0).eval()
    pixels, ids, mask = make_batch()
    labels = ids.clone()
    labels[:, :3] = -100  # a masked prompt
    out = obj(pixels, ids, mask, lm_labels=labels)
    expected = 0.5 * out["loss_itc"] + 2.0 * out["loss_itm"] + 3.0 * out["loss_lm"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    with torch.no_grad():
        lm = obj.med.lm_loss(obj.med.encode_image(pixels), ids, mask, labels=labels, label_smoothing=0.1)
    torch.testing.assert_close(out["loss_lm"], lm)


# --------------------------------------------------------------------------- momentum and queues


def test_momentum_copy_holds_only_the_itc_towers_without_grad():
    obj = build()
    assert obj.momentum_med is not None
    assert obj.momentum_med.text_decoder is None and obj.momentum_med.itm_head is None
    assert all(not p.requires_grad for p in obj.momentum_med.parameters())
    online = dict(obj.med.itc_parameters())
    for name, p_m in obj.momentum_med.itc_parameters():
        assert torch.equal(p_m, online[name]) and p_m.data_ptr() != online[name].data_ptr()


def test_momentum_update_is_exactly_blips_ema():
    obj = build(itm=0, lm=0, momentum=0.9).eval()
    assert obj.momentum_med is not None
    with torch.no_grad():
        for _, p_m in obj.momentum_med.itc_parameters():
            p_m.add_(torch.randn_like(p_m))  # make the copy differ, or the update is a no-op
    before = [p.clone() for _, p in obj.momentum_med.itc_parameters()]
    online = [p.detach().clone() for _, p in obj.med.itc_parameters()]
    obj(*make_batch())
    for p_m_old, p, (name, p_m) in zip(before, online, obj.momentum_med.itc_parameters(), strict=True):
        expected = p_m_old * 0.9 + p * (1 - 0.9)
        torch.testing.assert_close(p_m, expected, rtol=0, atol=1e-6, msg=name)
        assert not torch.equal(p_m, p_m_old), name


def test_queue_pointer_advances_by_the_batch_wraps_and_holds_the_momentum_feats():
    obj = build(itm=0, lm=0, queue_size=16).eval()
    assert obj.momentum_med is not None
    for step, (seed, start) in enumerate([(1, 0), (2, 8), (3, 0)]):
        pixels, ids, mask = make_batch(seed=seed)
        image_ids = torch.arange(8) + 10 * seed
        assert int(obj.queue_ptr) == start
        obj(pixels, ids, mask, image_ids=image_ids, step=step)
        assert int(obj.queue_ptr) == (start + 8) % 16
        with torch.no_grad():  # the momentum weights after this step's update are the ones it used
            image_m = obj.momentum_med.image_feat(obj.momentum_med.encode_image(pixels))
            text_m = obj.momentum_med.text_feat(ids, mask)
        torch.testing.assert_close(obj.image_queue[start : start + 8], image_m)
        torch.testing.assert_close(obj.text_queue[start : start + 8], text_m)
        assert torch.equal(obj.idx_queue[start : start + 8], image_ids)


def test_itc_loss_is_blips_distillation_formula():
    """Recompute the loss by hand: online feats against momentum feats + queue, targets
    alpha * softmax(momentum sim) + (1 - alpha) * one-hot, mean of both directions."""
    obj = build(itm=0, lm=0, queue_size=16, alpha=0.4, alpha_ramp_steps=10).eval()
    assert obj.momentum_med is not None
    pixels, ids, mask = make_batch()
    image_queue, text_queue = obj.image_queue.clone(), obj.text_queue.clone()
    loss = obj(pixels, ids, mask, step=5)["loss_itc"]
    alpha = 0.2  # halfway up the ramp
    with torch.no_grad():
        med, mom = obj.med, obj.momentum_med
        img, txt = med.image_feat(med.encode_image(pixels)), med.text_feat(ids, mask)
        img_m, txt_m = mom.image_feat(mom.encode_image(pixels)), mom.text_feat(ids, mask)
        all_txt, all_img = torch.cat([txt_m, text_queue]), torch.cat([img_m, image_queue])
        one_hot = torch.eye(8, 24)
        total = 0.0
        for q, keys, q_m in ((img, all_txt, img_m), (txt, all_img, txt_m)):
            targets = alpha * (q_m @ keys.t() / med.temp).softmax(1) + (1 - alpha) * one_hot
            total += -(F.log_softmax(q @ keys.t() / med.temp, dim=1) * targets).sum(1).mean() / 2
    torch.testing.assert_close(loss, torch.as_tensor(total), rtol=1e-5, atol=1e-5)


def test_alpha_ramps_linearly_then_holds():
    obj = build(itm=0, lm=0, alpha=0.4, alpha_ramp_steps=100)
    assert [obj.alpha_at(s) for s in (0, 50, 100, 1000)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    assert build(itm=0, lm=0, alpha=0.4).alpha_at(0) == 0.4


def test_itm_hardness_ramps_linearly_then_holds():
    obj = build(itc=0, lm=0, itm_hardness=0.8, itm_hardness_ramp_steps=100)
    assert [obj.hardness_at(s) for s in (0, 50, 100, 1000)] == pytest.approx([0.0, 0.4, 0.8, 0.8])
    assert build(itc=0, lm=0).hardness_at(0) == 1.0  # BLIP: hard negatives from the first step


@pytest.mark.parametrize("hardness,share", [(1.0, (0.95, 1.0)), (0.0, (0.05, 0.25))])
def test_itm_negatives_are_as_hard_as_the_hardness_says(monkeypatch, hardness, share):
    """ITC similarity rigged so that text (i+1) % 8 is by far the nearest to image i: hardness 1
    (BLIP) nearly always draws it, hardness 0 draws each of the 7 allowed texts alike (1/7)."""
    obj = build(itc=0, lm=0, itm_hardness=hardness)
    rigged = torch.zeros(8, 8)
    rigged[torch.arange(8), (torch.arange(8) + 1) % 8] = 20.0
    monkeypatch.setattr(obj.med, "itc_logits", lambda image_feat, text_feat: rigged)
    pixels, ids, mask = make_batch()
    nearest = 0
    for _ in range(40):
        obj(pixels, ids, mask, image_ids=torch.arange(8))
        assert obj.last_negatives is not None
        nearest += int((obj.last_negatives.text_index == (torch.arange(8) + 1) % 8).sum())
    assert share[0] <= nearest / 320 <= share[1], nearest / 320


def test_queue_size_must_be_a_multiple_of_the_global_batch():
    obj = build(itm=0, lm=0, queue_size=100)
    with pytest.raises(ConfigError, match=r"queue_size 100 is not a multiple of the global batch 8"):
        obj(*make_batch())
    with pytest.raises(ConfigError, match="global batch 48"):
        obj.check_batch_size(48)
    obj.check_batch_size(50)
    assert build(itm=0, lm=0).queue_size == micro_config().queue_size == 256


def test_state_dict_round_trip_restores_queues_pointer_and_momentum():
    obj = build(queue_size=24)
    train(obj, 2)
    assert int(obj.queue_ptr) == 16
    fresh = build(seed=1, queue_size=24)
    fresh.load_state_dict(obj.state_dict())
    for name in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):
        assert torch.equal(getattr(fresh, name), getattr(obj, name)), name
    assert fresh.momentum_med is not None and obj.momentum_med is not None
    for (name, a), (_, b) in zip(
        obj.momentum_med.itc_parameters(), fresh.momentum_med.itc_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    assert all(not p.requires_grad for p in fresh.momentum_med.parameters())
    assert not any(
        k.startswith(("momentum_med.text_decoder", "momentum_med.itm_head")) for k in obj.state_dict()
    )


# ------------------------------------------------------------------------ targets and negatives


def test_image_id_targets_spread_over_every_text_of_the_image():
    image_ids = torch.tensor([0, 0, 1, 2])
    column_ids = torch.cat([image_ids, torch.tensor([1, 0, -1, 5])])  # the batch, then the queue
    targets = itc_ground_truth(image_ids, column_ids, "image_id")
    assert torch.allclose(targets[0], torch.tensor([1, 1, 0, 0, 0, 1, 0, 0]) / 3)
    assert torch.allclose(targets[2], torch.tensor([0, 0, 1, 0, 1, 0, 0, 0]) / 2)
    assert torch.allclose(targets[3], torch.tensor([0, 0, 0, 1, 0, 0, 0, 0.0]))
    assert torch.equal(itc_ground_truth(image_ids, column_ids, "pair"), torch.eye(4, 8))


def test_image_id_positives_need_image_ids_and_train():
    obj = build(lm=0, positives="image_id", queue_size=8)
    pixels, ids, mask = make_batch()
    with pytest.raises(ValueError, match="needs image_ids"):
        obj(pixels, ids, mask)
    out = obj(pixels, ids, mask, image_ids=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert math.isfinite(out["loss"].item())
    out["loss"].backward()


def test_hard_negatives_never_pick_the_positive_or_a_same_image_text():
    torch.manual_seed(0)
    image_ids = torch.tensor([0, 0, 1, 1, 2, 3])
    forbidden = image_ids.view(-1, 1) == image_ids.view(1, -1)  # [6, 6], includes the diagonal
    logits = torch.randn(6, 6)
    logits[forbidden] = 1e4  # the forbidden columns are by far the most similar
    for _ in range(200):
        index, valid = sample_hard_negatives(logits, forbidden)
        assert bool(valid.all())
        assert not bool(forbidden[torch.arange(6), index].any())
    # A row with no allowed column is flagged, not sampled.
    index, valid = sample_hard_negatives(torch.randn(2, 3), torch.tensor([[True] * 3, [True, False, True]]))
    assert index.tolist() == [-1, 1] and valid.tolist() == [False, True]


def test_forward_draws_itm_negatives_from_other_images_only():
    obj = build(itc=0, lm=0)
    pixels, ids, mask = make_batch()
    image_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for _ in range(10):
        obj(pixels, ids, mask, image_ids=image_ids)
        neg = obj.last_negatives
        assert neg is not None and (neg.offset, neg.global_batch) == (0, 8)
        assert bool((image_ids[neg.text_index] != image_ids).all())
        assert bool((image_ids[neg.image_index] != image_ids).all())
    # Without image ids only the pair itself is excluded.
    obj(pixels, ids, mask)
    assert obj.last_negatives is not None
    assert bool((obj.last_negatives.text_index != torch.arange(8)).all())


@pytest.mark.parametrize(
    "batch,image_ids", [(1, None), (4, torch.zeros(4, dtype=torch.long))], ids=["one", "same-id"]
)
def test_itm_without_any_valid_negative_trains_on_positives_without_nan(batch, image_ids):
    obj = build(lm=0, queue_size=8)
    pixels, ids, mask = make_batch(batch=batch)
    out = obj(pixels, ids, mask, image_ids=image_ids)
    assert math.isfinite(out["loss_itm"].item()) and math.isfinite(out["loss_itc"].item())
    out["loss"].backward()
    assert obj.med.itm_head.weight.grad is not None and bool(obj.med.itm_head.weight.grad.isfinite().all())
    neg = obj.last_negatives
    assert neg is not None and (neg.text_index == -1).all() and (neg.image_index == -1).all()


# --------------------------------------------------------------------------------- distributed

WORLD, LOCAL = 2, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_rank(rank: int, port: int) -> None:
    """One rank: every local row shares one image id (the rank), so the only valid ITM negatives
    live on the other rank. Ranks pad their texts to different lengths."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        # The autograd all-gather: each rank's slice gets the gradient of every rank's loss.
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        gathered = all_gather_with_grad(x)  # [4, 3]
        assert torch.equal(gathered.detach()[:, 0], torch.tensor([1.0, 1.0, 2.0, 2.0]))
        weight = torch.arange(12.0).view(4, 3) * (rank + 1)
        (gathered * weight).sum().backward()
        assert torch.equal(x.grad, 3 * torch.arange(12.0).view(4, 3)[2 * rank : 2 * rank + 2])

        obj = build(seed=0, queue_size=16)  # same seed: identical weights on both ranks
        model = torch.nn.parallel.DistributedDataParallel(obj)
        opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3)
        pixels, ids, mask = make_batch(batch=LOCAL, length=6 + 2 * rank, seed=10 + rank)
        image_ids = torch.full((LOCAL,), rank)
        other = set(range((1 - rank) * LOCAL, (2 - rank) * LOCAL))
        for step in range(2):  # a second step shows DDP found every parameter used
            out = model(pixels, ids, mask, image_ids=image_ids, step=step)
            neg = obj.last_negatives
            assert neg is not None and (neg.offset, neg.global_batch) == (rank * LOCAL, WORLD * LOCAL)
            assert set(neg.text_index.tolist()) <= other, (rank, neg.text_index)
            assert set(neg.image_index.tolist()) <= other, (rank, neg.image_index)
            assert math.isfinite(out["loss"].item())
            opt.zero_grad()
            out["loss"].backward()
            grad = obj.med.vision_model.embeddings.patch_embedding.weight.grad
            assert grad is not None and bool(grad.isfinite().all()) and bool(grad.abs().sum() > 0)
            grads = [torch.empty_like(grad) for _ in range(WORLD)]
            dist.all_gather(grads, grad)
            assert torch.equal(grads[0], grads[1])  # DDP averaged them
            opt.step()
            # The queue took the global batch: both ranks hold the same 8 new rows and pointer.
            assert int(obj.queue_ptr) == (step + 1) * WORLD * LOCAL % 16
            queues = [torch.empty_like(obj.idx_queue) for _ in range(WORLD)]
            dist.all_gather(queues, obj.idx_queue)
            assert torch.equal(queues[0], queues[1])
            start = step * WORLD * LOCAL
            assert obj.idx_queue[start : start + 8].tolist() == [0] * 4 + [1] * 4
    finally:
        dist.destroy_process_group()


def _spawned_rank(index: int, port: int) -> None:
    torch.set_num_threads(1)
    _run_rank(index + 1, port)


def test_two_gloo_ranks_draw_itm_negatives_from_the_other_rank(monkeypatch):
    """This process is rank 0 and spawns rank 1, so only one interpreter pays torch's import."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    port = _free_port()
    ctx = mp.start_processes(_spawned_rank, args=(port,), nprocs=WORLD - 1, join=False, start_method="spawn")
    try:
        _run_rank(0, port)
    except BaseException:
        for proc in ctx.processes:  # rank 1 may wait on a collective rank 0 will never join
            proc.terminate()
        raise
    finally:
        while not ctx.join(timeout=60):
            pass


def test_queue_size_zero_is_clip_in_batch_contrast_and_keeps_no_queue():
    obj = build(itm=0, lm=0, distill=False, queue_size=0).eval()
    pixels, ids, mask = make_batch()
    loss = obj(pixels, ids, mask)["loss_itc"]
    assert obj.image_queue.shape[0] == 0 and int(obj.queue_ptr) == 0
    with torch.no_grad():
        med = obj.med
        logits = med.image_feat(med.encode_image(pixels)) @ med.text_feat(ids, mask).t() / med.temp
        target = torch.arange(8)
        clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(loss, clip, rtol=1e-5, atol=1e-5)
    obj.check_batch_size(48)  # no queue, so any global batch goes


def test_queue_without_momentum_pulls_features_together_at_a_collapsed_start():
    """Why a from-scratch run must not combine a queue with distill=False: when every feature is
    the same vector v, in-batch CLIP gradients cancel (each column's softmax mass sums to 1), but
    a queue of detached copies takes half the mass, leaving each text feature a net gradient along
    -v, i.e. towards the image direction, which feeds the collapse. Measured by the projection of
    the text-feature gradient on v."""
    obj = build(itm=0, lm=0, distill=False, queue_size=8).eval()
    torch.manual_seed(0)
    v = F.normalize(torch.randn(1, 32), dim=1)
    image_feat = F.normalize(v + 1e-3 * torch.randn(8, 32), dim=1)
    text_feat = F.normalize(v + 1e-3 * torch.randn(8, 32), dim=1).requires_grad_(True)
    ids = torch.arange(8)

    def pull(queue: bool) -> float:
        text_feat.grad = None
        obj.image_queue.copy_(image_feat.detach())
        obj.text_queue.copy_(text_feat.detach())
        obj.queue_size = 8 if queue else 0
        if not queue:
            obj.image_queue, obj.text_queue = obj.image_queue[:0], obj.text_queue[:0]
            obj.idx_queue = obj.idx_queue[:0]
        loss = obj._itc(None, None, None, ids, image_feat, text_feat, step=0)  # type: ignore[arg-type]
        loss.backward()
        return float((text_feat.grad @ v.t()).mean())

    with_queue, without = pull(True), pull(False)
    assert with_queue < -0.2  # descent moves every text feature along +v (measured -0.45)
    assert abs(without) < 0.05 * abs(with_queue), (with_queue, without)


def test_itm_never_takes_an_identical_text_as_a_negative():
    """Rows 1 and 5 carry the same caption under different images: neither may be the other's
    negative, in either direction, however similar ITC finds them."""
    obj = build(itc=0, lm=0)
    pixels, ids, mask = make_batch()
    ids[5], mask[5] = ids[1], mask[1]
    for seed in range(20):
        torch.manual_seed(seed)
        obj(pixels, ids, mask, image_ids=torch.arange(8))
        neg = obj.last_negatives
        assert neg is not None
        assert int(neg.text_index[1]) != 5 and int(neg.text_index[5]) != 1
        assert int(neg.image_index[1]) != 5 and int(neg.image_index[5]) != 1
