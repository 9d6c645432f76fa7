"""BLIP's three pretraining objectives on a Med (ITC with momentum distillation and queues, ITM with
hard negatives from every worker's batch, LM with label smoothing) as one module for the training loop.

The training loop wraps ``MedObjectives`` (not the bare Med) in DDP and per step calls ``forward``,
``backward``, ``optimizer.step()`` and ``med.clamp_temp()``. ``forward`` itself performs BLIP's
in-step momentum (EMA) update and the queue's dequeue/enqueue; both live in this module's
``state_dict`` so a checkpoint restores them exactly.

Shapes: B local batch, W world size, N = W * B global batch, Q queue size, E embed_dim, L text
length, P image patches, Dv vision width.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from capfilt.model.med import Med
from capfilt.model.objectives_config import ObjectiveConfig, check_queue_size

__all__ = [
    "HardNegatives",
    "MedObjectives",
    "ObjectiveConfig",
    "all_gather_with_grad",
    "concat_all_gather",
    "itc_ground_truth",
    "sample_hard_negatives",
    "soft_cross_entropy",
]

logger = logging.getLogger(__name__)

# Queue slots that have never held a real sample; image ids must be >= 0 so they never match.
_NO_ID = -1


@dataclass(frozen=True)
class HardNegatives:
    """One step's ITM hard negatives as rows of the gathered global batch, where rank r's rows are
    ``r * B ... r * B + B - 1``. -1 marks a row that had no valid negative (its pair got weight 0)."""

    text_index: Tensor  # [B] the negative text drawn for each local image
    image_index: Tensor  # [B] the negative image drawn for each local text
    offset: int  # this rank's first row in the global batch
    global_batch: int


# ------------------------------------------------------------------------------- distributed


def _world() -> tuple[int, int]:
    """(world size, rank); (1, 0) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order, without gradient. Identity on one process."""
    world, _ = _world()
    if world == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own slice summed over every
    rank's loss (DDP then averages parameter gradients, which makes the total the gradient of the
    mean loss). Every rank must run backward through it, or the all_reduce waits forever."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> tuple[Tensor, ...]:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Tensor:
        stacked = torch.stack([g.contiguous() for g in grads])  # [W, *x.shape]
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Every rank's ``x`` concatenated along dim 0, with gradient flowing back to each rank's slice."""
    world, _ = _world()
    if world == 1:
        return x
    return torch.cat(_AllGatherWithGrad.apply(x), dim=0)


# ---------------------------------------------------------------------------- pure functions


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of ``-sum(targets * log_softmax(logits))``; [B, N] x [B, N] -> scalar."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


def itc_ground_truth(image_ids: Tensor, column_ids: Tensor, positives: Literal["pair", "image_id"]) -> Tensor:
    """ITC targets without distillation, [B, C] with rows summing to 1. The columns are the batch's
    B samples then the queue's; ``image_ids`` [B] and ``column_ids`` [C] are their image ids.

    ``"pair"``: one-hot on column i. ``"image_id"``: uniform over every column whose image id equals
    row i's, so all texts of the same image, in the batch or the queue, are positives.
    """
    batch, columns = image_ids.shape[0], column_ids.shape[0]
    if positives == "pair":
        targets = torch.zeros(batch, columns, device=image_ids.device)
        targets[:, :batch] = torch.eye(batch, device=image_ids.device)
        return targets
    same = (image_ids.view(-1, 1) == column_ids.view(1, -1)).float()  # [B, C]
    return same / same.sum(dim=1, keepdim=True)


def sample_hard_negatives(logits: Tensor, forbidden: Tensor) -> tuple[Tensor, Tensor]:
    """One column per row drawn with probability softmax(logits) over the allowed columns.

    ``logits`` [B, N]; ``forbidden`` [B, N] bool (the positive and same-image columns). Returns
    (index [B] long, valid [B] bool); a row whose columns are all forbidden gets index -1 and
    valid False. Masking with -inf before the softmax (rather than zeroing probabilities after it)
    means a sharp softmax can never leave an allowed row with all-zero weights.
    """
    valid = ~forbidden.all(dim=1)  # [B]
    probs = (
        logits.float().masked_fill(forbidden, float("-inf")).softmax(dim=1)
    )  # [B, N]; NaN rows if none allowed
    probs = torch.where(valid.unsqueeze(1), probs, torch.ones_like(probs))  # any distribution for those rows
    index = torch.multinomial(probs, 1).squeeze(1)  # [B]
    return torch.where(valid, index, torch.full_like(index, -1)), valid


# ------------------------------------------------------------------------------------ module


class MedObjectives(nn.Module):
    """ITC + ITM + LM on a Med, weighted by ``ObjectiveConfig``. ``self.med`` is the trained model.

    When ITC is on, the module holds feature queues (buffers ``image_queue``, ``text_queue`` [Q, E],
    ``idx_queue`` [Q] and ``queue_ptr``) and, with ``distill``, a momentum copy of the ITC towers
    (``momentum_med``, no gradient). ITM needs neither: it samples negatives from the trained
    model's own in-batch ITC similarities, as BLIP does.
    """

    image_queue: Tensor
    text_queue: Tensor
    idx_queue: Tensor
    queue_ptr: Tensor

    def __init__(self, med: Med, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.med = med
        self.cfg = cfg
        self.queue_size = cfg.queue_size if cfg.queue_size is not None else med.config.queue_size
        needed = [name for name in ("itc", "itm", "lm") if getattr(cfg, name) > 0]
        med.require(*needed)
        # The last step's ITM negatives, for inspection and tests; None before the first ITM step.
        self.last_negatives: HardNegatives | None = None

        if cfg.itc > 0 and not cfg.distill and self.queue_size > 0:
            logger.warning(
                "ITC has a queue (%d) but no momentum encoder (distill=False): features trained from "
                "scratch tend to collapse this way; set queue_size=0 or distill=True",
                self.queue_size,
            )
        self.momentum_med: Med | None = None
        if cfg.itc > 0:
            if cfg.distill:
                self.momentum_med = self._momentum_copy(med)
            dim = med.config.embed_dim
            # BLIP starts the queues with random unit vectors: harmless negatives until filled.
            self.register_buffer("image_queue", F.normalize(torch.randn(self.queue_size, dim), dim=1))
            self.register_buffer("text_queue", F.normalize(torch.randn(self.queue_size, dim), dim=1))
            self.register_buffer("idx_queue", torch.full((self.queue_size,), _NO_ID, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        logger.debug(
            "objectives itc=%s itm=%s lm=%s queue=%d distill=%s positives=%s",
            cfg.itc,
            cfg.itm,
            cfg.lm,
            self.queue_size,
            cfg.distill,
            cfg.positives,
        )

    @staticmethod
    def _momentum_copy(med: Med) -> Med:
        """A deep copy holding only the ITC towers: the memo maps the decoder, ITM head and
        temperature to None, so they are neither copied nor stored in the state_dict."""
        memo: dict[int, Any] = {id(med.text_decoder): None, id(med.itm_head): None, id(med.temp): None}
        momentum = copy.deepcopy(med, memo)
        momentum.heads = frozenset({"itc"})
        for p in momentum.parameters():
            p.requires_grad_(False)
        names = [n for n, _ in med.itc_parameters()]
        if names != [n for n, _ in momentum.itc_parameters()]:
            raise RuntimeError("momentum copy's ITC parameters do not line up with the model's")
        return momentum

    # ------------------------------------------------------------------------------ schedule

    def alpha_at(self, step: int) -> float:
        """Distillation weight at ``step``: linear from 0 to ``cfg.alpha`` over ``alpha_ramp_steps``."""
        if self.cfg.alpha_ramp_steps == 0:
            return self.cfg.alpha
        return self.cfg.alpha * min(1.0, step / self.cfg.alpha_ramp_steps)

    def hardness_at(self, step: int) -> float:
        """ITM negative hardness at ``step``: linear from 0 to ``cfg.itm_hardness`` over
        ``itm_hardness_ramp_steps``."""
        if self.cfg.itm_hardness_ramp_steps == 0:
            return self.cfg.itm_hardness
        return self.cfg.itm_hardness * min(1.0, step / self.cfg.itm_hardness_ramp_steps)

    def check_batch_size(self, global_batch: int) -> None:
        """Fail fast unless the queue size is a multiple of the global batch (``check_queue_size``).
        Call it before training starts."""
        check_queue_size(self.cfg, self.queue_size, global_batch)

    # ------------------------------------------------------------------------------ momentum

    @torch.no_grad()
    def momentum_update(self) -> None:
        """p_m = m * p_m + (1 - m) * p over the ITC towers (BLIP runs it at the start of every step)."""
        if self.momentum_med is None:
            return
        m = self.cfg.momentum
        online = [p.detach() for _, p in self.med.itc_parameters()]
        target: list[Tensor] = [p for _, p in self.momentum_med.itc_parameters()]
        torch._foreach_mul_(target, m)
        torch._foreach_add_(target, online, alpha=1.0 - m)

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Copy the trained model's ITC towers into the momentum copy (e.g. after loading new weights
        into ``med`` once this module exists)."""
        if self.momentum_med is None:
            return
        for (_, p), (_, p_m) in zip(
            self.med.itc_parameters(), self.momentum_med.itc_parameters(), strict=True
        ):
            p_m.copy_(p)

    @torch.no_grad()
    def _enqueue(self, image_feat: Tensor, text_feat: Tensor, image_ids: Tensor) -> None:
        """Write the global batch's features [N, E] and ids [N] at the pointer, then advance it (mod Q)."""
        if self.queue_size == 0:
            return
        n = image_feat.shape[0]
        ptr = int(self.queue_ptr)
        self.image_queue[ptr : ptr + n] = image_feat
        self.text_queue[ptr : ptr + n] = text_feat
        self.idx_queue[ptr : ptr + n] = image_ids
        self.queue_ptr.fill_((ptr + n) % self.queue_size)

    # ------------------------------------------------------------------------------- forward

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_ids: Tensor | None = None,
        lm_labels: Tensor | None = None,
        step: int = 0,
    ) -> dict[str, Tensor]:
        """One step's losses. ``image_ids`` [B] long (>= 0) are needed for ``positives="image_id"``
        and, when given, keep ITM from drawing a same-image negative. ``lm_labels`` [B, L] are
        aligned with ``input_ids`` with -100 where no loss (default: ``input_ids`` with padding
        -100). Returns ``loss`` (weighted sum, with gradient) and a detached ``loss_<name>`` per
        enabled objective."""
        cfg = self.cfg
        world, _ = _world()
        batch = input_ids.shape[0]
        if cfg.itc > 0:
            self.check_batch_size(batch * world)
        if image_ids is not None and bool((image_ids < 0).any()):
            raise ValueError(f"image_ids must be >= 0 (got {image_ids.min().item()})")
        if cfg.positives == "image_id" and image_ids is None and (cfg.itc > 0 or cfg.itm > 0):
            raise ValueError('positives="image_id" needs image_ids: pass the image id of every row')

        image_embeds = self.med.encode_image(pixel_values)  # [B, 1+P, Dv]
        losses: dict[str, Tensor] = {}
        image_feat = text_feat = None
        if cfg.itc > 0:
            image_feat = self.med.image_feat(image_embeds)  # [B, E]
            text_feat = self.med.text_feat(input_ids, attention_mask)  # [B, E]
            losses["itc"] = self._itc(
                pixel_values, input_ids, attention_mask, image_ids, image_feat, text_feat, step
            )
        if cfg.itm > 0:
            if image_feat is None or text_feat is None:
                with torch.no_grad():  # only needed to draw the negatives
                    image_feat = self.med.image_feat(image_embeds)
                    text_feat = self.med.text_feat(input_ids, attention_mask)
            losses["itm"] = self._itm(
                image_embeds,
                input_ids,
                attention_mask,
                image_ids,
                image_feat,
                text_feat,
                self.hardness_at(step),
            )
        if cfg.lm > 0:
            losses["lm"] = self.med.lm_loss(
                image_embeds, input_ids, attention_mask, labels=lm_labels, label_smoothing=cfg.label_smoothing
            )

        weighted = [getattr(cfg, name) * value for name, value in losses.items()]
        out = {"loss": sum(weighted[1:], weighted[0])}
        out.update({f"loss_{name}": value.detach() for name, value in losses.items()})
        return out

    # ----------------------------------------------------------------------------------- ITC

    def _itc(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_ids: Tensor | None,
        image_feat: Tensor,
        text_feat: Tensor,
        step: int,
    ) -> Tensor:
        """Contrastive loss of the local batch against (momentum) features of the batch plus the queue."""
        cfg = self.cfg
        batch = image_feat.shape[0]
        ids = image_ids if image_ids is not None else torch.full((batch,), _NO_ID, device=image_feat.device)
        if self.momentum_med is not None:
            with torch.no_grad():
                self.momentum_update()
                image_key = self.momentum_med.image_feat(
                    self.momentum_med.encode_image(pixel_values)
                )  # [B, E]
                text_key = self.momentum_med.text_feat(input_ids, attention_mask)  # [B, E]
        else:
            image_key, text_key = image_feat, text_feat  # gradient flows through both sides, as in CLIP
        image_cols = torch.cat([image_key, self.image_queue.to(image_key.dtype)])  # [B+Q, E]
        text_cols = torch.cat([text_key, self.text_queue.to(text_key.dtype)])  # [B+Q, E]
        sim_i2t = self.med.itc_logits(image_feat, text_cols)  # [B, B+Q]
        sim_t2i = self.med.itc_logits(image_cols, text_feat).t()  # [B, B+Q]

        with torch.no_grad():
            column_ids = torch.cat([ids, self.idx_queue])  # [B+Q]
            truth = itc_ground_truth(ids, column_ids, cfg.positives)  # [B, B+Q]
            targets_i2t = targets_t2i = truth
            if self.momentum_med is not None:
                alpha = self.alpha_at(step)
                sim_i2t_m = self.med.itc_logits(image_key, text_cols)  # [B, B+Q]
                sim_t2i_m = self.med.itc_logits(image_cols, text_key).t()  # [B, B+Q]
                targets_i2t = alpha * sim_i2t_m.float().softmax(dim=1) + (1 - alpha) * truth
                targets_t2i = alpha * sim_t2i_m.float().softmax(dim=1) + (1 - alpha) * truth

        loss = (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2
        # The queue takes every worker's keys, so all ranks hold the same queue.
        self._enqueue(
            concat_all_gather(image_key.detach()),
            concat_all_gather(text_key.detach()),
            concat_all_gather(ids),
        )
        return loss

    # ----------------------------------------------------------------------------------- ITM

    def _itm(
        self,
        image_embeds: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_ids: Tensor | None,
        image_feat: Tensor,
        text_feat: Tensor,
        hardness: float = 1.0,
    ) -> Tensor:
        """Binary matching on B positives, B (image, hard negative text) and B (hard negative image,
        text) pairs, the negatives drawn from the global batch of every worker with probability
        softmax(hardness * ITC similarity) (hardness 1: BLIP; 0: uniform).

        A row with no valid negative (a batch of one, or every row of the global batch sharing its
        image id) keeps its pair in the batch with weight 0, so shapes, the autograd graph and the
        collectives stay the same on every rank; the loss is the weighted mean over the rest. A step
        where no row has a negative therefore trains ITM on its positives only.
        """
        world, rank = _world()
        batch = input_ids.shape[0]
        offset = rank * batch
        pad_id = self.med.config.text.pad_token_id

        # Ranks may pad their texts to different lengths; pad to the longest before gathering.
        sizes = concat_all_gather(
            torch.tensor([[batch, input_ids.shape[1]]], device=input_ids.device)
        )  # [W, 2]
        if bool((sizes[:, 0] != batch).any()):
            raise ValueError(
                f"ITM needs the same local batch on every worker; got {sizes[:, 0].tolist()} (drop the last partial batch)"
            )
        length = int(sizes[:, 1].max())
        if input_ids.shape[1] < length:
            extra = length - input_ids.shape[1]
            input_ids = F.pad(input_ids, (0, extra), value=pad_id)
            attention_mask = F.pad(attention_mask, (0, extra), value=0)

        image_embeds_all = all_gather_with_grad(image_embeds)  # [N, 1+P, Dv]
        with torch.no_grad():
            ids_all = concat_all_gather(input_ids)  # [N, L]
            mask_all = concat_all_gather(attention_mask)  # [N, L]
            image_feat_all = concat_all_gather(image_feat)  # [N, E]
            text_feat_all = concat_all_gather(text_feat)  # [N, E]
            total = ids_all.shape[0]
            rows = torch.arange(batch, device=input_ids.device)
            forbidden = torch.zeros(batch, total, dtype=torch.bool, device=input_ids.device)  # [B, N]
            forbidden[rows, offset + rows] = True
            if image_ids is not None:
                image_ids_all = concat_all_gather(image_ids)  # [N]
                forbidden |= image_ids.view(-1, 1) == image_ids_all.view(1, -1)
            # A text identical to the positive one is no negative, whatever image it came with:
            # web data repeats alt-texts ("image", "photo"), and in the shapes world many images
            # share a caption. Training ITM to call them mismatched teaches it noise.
            same_text = (input_ids.unsqueeze(1) == ids_all.unsqueeze(0)).all(dim=2)  # [B, N]
            forbidden |= same_text
            sim_i2t = hardness * self.med.itc_logits(image_feat, text_feat_all)  # [B, N]
            sim_t2i = hardness * self.med.itc_logits(image_feat_all, text_feat).t()  # [B, N]
            neg_text, text_ok = sample_hard_negatives(sim_i2t, forbidden)  # [B], [B]
            neg_image, image_ok = sample_hard_negatives(sim_t2i, forbidden)  # [B], [B]
        self.last_negatives = HardNegatives(neg_text, neg_image, offset, total)
        if not bool(text_ok.all() and image_ok.all()):
            logger.debug(
                "ITM: %d of %d rows have no valid negative (same image id across the global batch)",
                int((~text_ok).sum()),
                batch,
            )

        neg_text, neg_image = neg_text.clamp(min=0), neg_image.clamp(min=0)  # weight-0 rows point at row 0
        pair_images = torch.cat([image_embeds, image_embeds, image_embeds_all[neg_image]])  # [3B, 1+P, Dv]
        pair_ids = torch.cat([input_ids, ids_all[neg_text], input_ids])  # [3B, L]
        pair_mask = torch.cat([attention_mask, mask_all[neg_text], attention_mask])  # [3B, L]
        logits = self.med.itm_logits(pair_images, pair_ids, pair_mask)  # [3B, 2]

        labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(logits.device)  # [3B]
        weights = torch.cat(
            [torch.ones(batch, device=logits.device), text_ok.float(), image_ok.float()]
        )  # [3B]
        per_pair = F.cross_entropy(logits.float(), labels, reduction="none")  # [3B]
        return (per_pair * weights).sum() / weights.sum()
