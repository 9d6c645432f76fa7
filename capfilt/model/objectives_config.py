"""The objectives' settings (``ObjectiveConfig``) and the ITC queue-size rule, without torch: the
training config, the recipe and ``capfilt status`` import them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from capfilt.core.errors import ConfigError

__all__ = ["ObjectiveConfig", "check_queue_size"]


class ObjectiveConfig(BaseModel):
    """Which objectives run and how. Defaults are BLIP's pretraining values."""

    model_config = ConfigDict(extra="forbid")

    # Loss weights; 0 disables an objective and skips its compute.
    itc: float = Field(1.0, ge=0)
    itm: float = Field(1.0, ge=0)
    lm: float = Field(1.0, ge=0)
    momentum: float = Field(0.995, ge=0, le=1)
    alpha: float = Field(0.4, ge=0, le=1)
    # alpha rises linearly from 0 to `alpha` over this many steps (BLIP: the first 2 epochs); 0 = constant.
    alpha_ramp_steps: int = Field(0, ge=0)
    # How hard ITM's negatives are: they are drawn with probability softmax(h * ITC similarity),
    # h = 1 being BLIP's hard negatives and h = 0 uniformly random ones. h rises linearly from 0
    # to `itm_hardness` over `itm_hardness_ramp_steps` (0 = no ramp). A model trained from
    # scratch needs easier negatives: ITC-hard ones are too hard for an ITM head that has learnt
    # nothing yet, and ITM then stays at the 1:2 class prior. Measured on the demo world
    # (experiments/itm_hardness.py): uniform negatives (0) learn; a ramp from 0 to 1 over the run
    # learns and then falls back to the prior as the negatives harden.
    itm_hardness: float = Field(1.0, ge=0)
    itm_hardness_ramp_steps: int = Field(0, ge=0)
    # None takes MedConfig.queue_size. Must be a multiple of the global batch. 0 turns the queues
    # off: in-batch negatives only, as CLIP. A small model trained from scratch needs that (or
    # ``distill``): with a queue but no momentum encoder, the in-batch columns get gradient and
    # the queue's do not, which pulls every feature towards one direction and ITC collapses.
    queue_size: int | None = Field(None, ge=0)
    # Momentum distillation for ITC. It also decides what the queues hold: the momentum encoders'
    # features (True, BLIP), or the trained model's own detached features with no momentum copy (False).
    distill: bool = True
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    # "image_id": every text of the same image is an ITC positive (retrieval fine-tune on
    # several human captions per image); "pair": only text i is image i's positive (pretraining).
    positives: Literal["pair", "image_id"] = "pair"

    @model_validator(mode="after")
    def _check(self) -> ObjectiveConfig:
        if self.itc == 0 and self.itm == 0 and self.lm == 0:
            raise ValueError("every objective weight (itc, itm, lm) is 0; set at least one above 0")
        return self


def check_queue_size(cfg: ObjectiveConfig, model_queue_size: int, global_batch: int, batch: str = "") -> None:
    """Fail fast unless ITC's queue is a multiple of the global batch (BLIP's assumption, which keeps
    every enqueue a contiguous slice). The queue is ``cfg.queue_size``, else the model's; 0 or ITC
    off needs nothing. ``batch`` says how the global batch is made (e.g. ``"16 x 2 workers"``)."""
    queue = cfg.queue_size if cfg.queue_size is not None else model_queue_size
    if cfg.itc > 0 and queue and queue % global_batch:
        made_of = f" ({batch})" if batch else ""
        raise ConfigError(
            f"queue_size {queue} is not a multiple of the global batch {global_batch}{made_of}, as BLIP "
            f"needs; set objectives.queue_size (or the model's queue_size) to a multiple of {global_batch}, "
            f"e.g. {max(1, queue // global_batch) * global_batch}, or change the batch size"
        )
