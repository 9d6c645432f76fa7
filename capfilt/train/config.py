"""The training run's settings (``TrainConfig``, ``DataSource``) and run-folder names, without torch or
Ray: the recipe and ``capfilt status`` import them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from capfilt.core.layout import TRAIN_CONFIG, TRAIN_SUMMARY
from capfilt.model.objectives_config import ObjectiveConfig

__all__ = ["CONFIG_FILE", "MODEL_DIR", "SUMMARY_FILE", "TOKENIZER_DIR", "DataSource", "TrainConfig"]

# Names in a run folder (``out_dir``).
CONFIG_FILE = TRAIN_CONFIG
SUMMARY_FILE = TRAIN_SUMMARY
TOKENIZER_DIR = "tokenizer"
MODEL_DIR = "model"


class DataSource(BaseModel):
    """One input of a training run.

    ``path`` is a download folder (SAMPLE shards: only rows with status success are read), a
    CapFilt output folder (CLEANED shards, images included), or a COCO-Karpathy JSON file
    (``[{"image": relative path, "caption": str or [str], "image_id": ...}]``) whose image paths
    are relative to ``image_root`` (default: the JSON's folder). ``kind="auto"`` tells them apart
    by the file suffix and the shards' columns.
    """

    model_config = ConfigDict(extra="forbid")

    path: str
    kind: Literal["auto", "samples", "cleaned", "karpathy"] = "auto"
    image_root: str | None = None


class TrainConfig(BaseModel):
    """Everything one training run needs. Defaults are BLIP's pretraining values where BLIP has one;
    the captioner fine-tune sets ``objectives`` to LM only with ``prompt="a picture of "``, the
    filter fine-tune sets ITC+ITM with ``positives="image_id"``; both ``schedule="cosine"``."""

    model_config = ConfigDict(extra="forbid")

    # What to train.
    model: str = "med-tiny"  # registry name or MedConfig JSON path; the architecture of a .pth init
    init: str | None = None  # capfilt dir (save_med), transformers dir, or BLIP .pth to start from
    # A timm ViT checkpoint for the image encoder of a model built fresh (BLIP: DeiT-base ImageNet
    # weights for ViT-B); the text side keeps its init. Not with ``init``, which sets every weight.
    vision_init: str | None = None
    tokenizer: str | None = None  # tokenizer dir; default: the init dir's, else WordPiece trained here
    tokenizer_vocab_size: int | None = Field(None, ge=64)  # WordPiece bound; default: the model's vocab
    objectives: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    prompt: str | None = None  # prepended to every text and masked from the LM loss

    # Data and output.
    data: list[DataSource] = Field(min_length=1)
    out_dir: str
    run_name: str = "train"

    # Steps and schedule.
    batch_size: int = Field(16, ge=1)  # per worker
    steps: int | None = Field(None, ge=1)  # total optimizer steps
    epochs: int | None = Field(None, ge=1)
    stop_at_step: int | None = Field(None, ge=1)  # end this run early with a checkpoint; resume goes on
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    warmup_steps: int = Field(3000, ge=0)  # BLIP's 3000; unset with `steps`: min(3000, steps // 10)
    decay_rate: float = Field(0.9, gt=0, le=1)  # per epoch, for step_decay
    schedule: Literal["step_decay", "cosine"] = "step_decay"
    weight_decay: float = Field(0.05, ge=0)
    # The image encoder's lr as a share of ``lr``: 1 trains it like the rest (BLIP); below 1 keeps
    # more of what its init (``vision_init``, or a round-1 model) learnt; 0 freezes it (no backward
    # through the ViT at all).
    vision_lr_scale: float = Field(1.0, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0)

    # Inputs.
    image_size: int | None = Field(None, ge=16)  # default: the model's; else its position table is resized
    min_scale: float = Field(0.2, gt=0, le=1)  # RandomResizedCrop; BLIP: 0.2 pretrain, 0.5 fine-tune
    max_words: int = Field(30, ge=1)
    max_length: int = Field(30, ge=4)  # text tokens, [CLS] and [SEP] included
    shuffle_buffer: int = Field(1000, ge=0)  # rows; 0 reads in file order
    preserve_order: bool = True  # deterministic data order (exact resume); off for throughput on clusters
    seed: int = 0

    # Hardware.
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)  # fractional on small machines so read tasks get CPU too
    # How Ray places the workers: PACK fills one node first (DDP over local sockets); SPREAD spreads
    # them where it can, STRICT_SPREAD puts each on its own node (one per host, or per GPU node).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    # None: on the embedded local instance, the machine's cores / num_workers; on a cluster, what
    # Ray gives a worker (OMP_NUM_THREADS = its CPU reservation).
    torch_threads: int | None = Field(None, ge=1)
    bf16: bool = True  # autocast on GPU only
    grad_checkpointing: bool = False

    # Bookkeeping.
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int | None = Field(2, ge=1)  # None keeps all
    log_every: int = Field(50, ge=1)
    max_failures: int = Field(0, ge=-1)  # worker failures Ray Train recovers from (from the last checkpoint)

    @field_validator("data", mode="before")
    @classmethod
    def _paths_to_sources(cls, v: Any) -> Any:
        items = v if isinstance(v, list | tuple) else [v]
        return [DataSource(path=str(x)) if isinstance(x, str | Path) else x for x in items]

    @model_validator(mode="before")
    @classmethod
    def _warmup_default(cls, value: Any) -> Any:
        # The one warmup rule, for recipes and the CLI alike: BLIP warms up over 3000 steps; a
        # shorter run that names no warmup warms up over its first tenth.
        if isinstance(value, dict) and value.get("warmup_steps") is None and value.get("steps"):
            value = {**value, "warmup_steps": min(3000, int(value["steps"]) // 10)}
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.steps is None and self.epochs is None:
            raise ValueError("give steps or epochs (or both: training stops at whichever comes first)")
        if self.steps is not None and self.warmup_steps >= self.steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps}); lower warmup_steps"
            )
        o = self.objectives
        if o.itc <= 0 and o.itm <= 0 and o.lm <= 0:
            raise ValueError("every objective weight is 0: enable at least one of itc, itm, lm")
        if self.init and self.vision_init:
            raise ValueError(
                "vision_init: init already sets every weight, the ViT's included; give one of the two"
            )
        return self

    def trained_heads(self) -> frozenset[str]:
        o = self.objectives
        return frozenset(h for h, w in (("itc", o.itc), ("itm", o.itm), ("lm", o.lm)) if w > 0)


# Fields a resumed run may change without changing the curve it continues.
_RESUME_MAY_CHANGE = frozenset(
    {
        "steps",
        "epochs",
        "stop_at_step",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "max_failures",
        "torch_threads",
        "out_dir",
        "num_workers",
        "cpus_per_worker",
        "use_gpu",
        "placement_strategy",
    }
)
