"""The one training loop (pretraining, captioner and filter fine-tunes are configs of it) on Ray Train.

Layout, top to bottom: the config; the learning-rate schedule; the training state and its
checkpoint (plain functions, usable without Ray); one optimizer step; the per-worker loop that
Ray Train runs; the driver (`run_training`) that prepares the tokenizer and model config once,
launches TorchTrainer and writes the final model.

A run folder (``out_dir``) holds ``train_config.json``, ``tokenizer/``, Ray's run folder
``<run_name>/checkpoint_<step>/`` (model + objective state in safetensors, optimizer and RNG
state via ``torch.save``), and at the end ``model/`` (``save_med`` + tokenizer) and
``train_summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors.torch import load_model, save_model
from torch import nn

from capfilt.core.errors import ConfigError, StageFailed
from capfilt.core.layout import TRAIN_CONFIG, TRAIN_SUMMARY
from capfilt.model import MedConfig, get_config
from capfilt.model.med import Med
from capfilt.model.objectives import MedObjectives, ObjectiveConfig
from capfilt.model.tokenizer import TokenIds, load_tokenizer, train_wordpiece
from capfilt.train.data import (
    Collator,
    DataSource,
    SkipCounts,
    TrainBatch,
    count_pairs,
    fixed_batches,
    iter_texts,
    pairs_dataset,
    resolve_sources,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TrainConfig",
    "TrainState",
    "TrainSummary",
    "build_state",
    "learning_rate",
    "load_trained_med",
    "restore_checkpoint",
    "run_training",
    "save_checkpoint",
    "train_loop_per_worker",
    "train_step",
]

logger = logging.getLogger(__name__)

# Files of one checkpoint folder. Rank 0 writes the first four; every rank writes its own worker file.
MODEL_FILE = "model.safetensors"  # MedObjectives state: Med, momentum encoders, queues
TRAIN_STATE_FILE = "train_state.pt"  # optimizer, step, epoch, schedule, loss history
MED_FILE = "med.json"  # Med config and heads, to rebuild the model without the run config
OBJECTIVES_FILE = "objectives.json"
WORKER_FILE = "worker_{rank:03d}.pt"  # this rank's RNG states, data position, skip counts

CONFIG_FILE = TRAIN_CONFIG
SUMMARY_FILE = TRAIN_SUMMARY
TOKENIZER_DIR = "tokenizer"
MODEL_DIR = "model"

LOSS_KEYS = ("loss", "loss_itc", "loss_itm", "loss_lm")


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
    warmup_steps: int = Field(3000, ge=0)
    decay_rate: float = Field(0.9, gt=0, le=1)  # per epoch, for step_decay
    schedule: Literal["step_decay", "cosine"] = "step_decay"
    weight_decay: float = Field(0.05, ge=0)
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
    }
)


# ---------------------------------------------------------------------------------------------
# Learning rate.
# ---------------------------------------------------------------------------------------------


def learning_rate(cfg: TrainConfig, step: int, epoch: int, total_steps: int | None) -> float:
    """The lr of optimizer step ``step`` (0-based) in epoch ``epoch``.

    Linear warmup from ``warmup_lr`` over ``warmup_steps``, then BLIP's pretraining
    ``lr * decay_rate ** epoch`` (floored at ``min_lr``), or a cosine from ``lr`` to ``min_lr``
    over the remaining steps (fine-tuning; needs ``total_steps``).
    """
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    if cfg.schedule == "step_decay":
        return max(cfg.min_lr, cfg.lr * cfg.decay_rate**epoch)
    if total_steps is None:
        raise ValueError("the cosine schedule needs the total number of steps")
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Training state and checkpoints (plain functions; the worker loop and tests share them).
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """What a checkpoint saves and restores. ``model`` is what the step calls: ``objectives``
    itself, or a DDP wrapper of it."""

    med: Med
    objectives: MedObjectives
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    epoch_rows: int = 0  # rows of the current epoch this rank has consumed by the last step
    skipped: SkipCounts = field(default_factory=SkipCounts)
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per log window
    resumed_from_step: int | None = None


def _objectives_med(objectives: MedObjectives) -> Med:
    med = objectives.med
    assert isinstance(med, Med), f"MedObjectives.med is a {type(med).__name__}, expected Med"
    return med


def build_med(cfg: TrainConfig, med_config: MedConfig) -> Med:
    """The model to train: ``init``'s weights when given, else fresh ones for ``med_config`` (the ViT
    from ``vision_init`` when given); at
    ``cfg.image_size``, with the heads it will have once trained."""
    if cfg.init:
        from capfilt.model.checkpoint import load_checkpoint

        med = load_checkpoint(cfg.init, cfg.model, enc_token_id=med_config.text.enc_token_id)
        med.heads = med.heads | cfg.trained_heads()
    else:
        med = Med(med_config)
        med.heads = cfg.trained_heads()
        if cfg.vision_init:
            from capfilt.model.backbones import init_vision_from_timm

            init_vision_from_timm(med, cfg.vision_init)
    if cfg.image_size and cfg.image_size != med.config.vision.image_size:
        med.set_image_size(cfg.image_size)
    if cfg.grad_checkpointing:
        med.set_gradient_checkpointing(True)
    return med


def build_state(
    cfg: TrainConfig,
    med_config: MedConfig,
    device: torch.device | str = "cpu",
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> TrainState:
    """A fresh training state: model (seeded by ``cfg.seed``, the same on every rank), objectives,
    optional DDP wrapper (``wrap``), and AdamW over the trainable parameters."""
    torch.manual_seed(cfg.seed)
    med = build_med(cfg, med_config)
    objectives = MedObjectives(med, cfg.objectives).to(device)
    med.train()
    objectives.train()
    model = wrap(objectives) if wrap else objectives
    params = [p for p in objectives.parameters() if p.requires_grad]
    # BLIP decays every parameter, biases and LayerNorms included.
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return TrainState(med=med, objectives=objectives, model=model, optimizer=optimizer)


def _rng_state() -> dict[str, Any]:
    """Every RNG the step uses (dropout, hard negatives, augmentations), as weights_only-safe values."""
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_version, torch.tensor(py_internal, dtype=torch.int64), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_worker(seed: int, rank: int) -> None:
    """Per-rank streams for dropout, hard-negative sampling and augmentation."""
    s = seed * 1000 + rank + 1
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def save_checkpoint(
    state: TrainState, directory: str | Path, rank: int = 0, extra: dict[str, Any] | None = None
) -> None:
    """Write this rank's part of a checkpoint into ``directory``. Rank 0 writes the model and
    objective state (safetensors; shared tensors once), the optimizer, step and schedule; every
    rank writes its RNG states and data position (Ray merges the ranks' folders)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_model(state.objectives, str(d / MODEL_FILE))
        lr = float(state.optimizer.param_groups[0]["lr"])
        torch.save(
            {
                "optimizer": state.optimizer.state_dict(),
                "step": state.step,
                "epoch": state.epoch,
                "lr": lr,  # of the last step taken; the next one recomputes it from step and epoch
                "history": state.history,
                **(extra or {}),
            },
            d / TRAIN_STATE_FILE,
        )
        med_meta = {"config": state.med.config.model_dump(), "heads": sorted(state.med.heads)}
        (d / MED_FILE).write_text(json.dumps(med_meta, indent=2) + "\n")
        objectives_cfg = getattr(state.objectives, "cfg", None)
        if isinstance(objectives_cfg, BaseModel):
            (d / OBJECTIVES_FILE).write_text(objectives_cfg.model_dump_json(indent=2) + "\n")
    torch.save(
        {
            "rng": _rng_state(),
            "epoch_rows": state.epoch_rows,
            "skipped": state.skipped.as_dict(),
            "skip_reasons": dict(state.skipped.reasons),
        },
        d / WORKER_FILE.format(rank=rank),
    )


def restore_checkpoint(state: TrainState, directory: str | Path, rank: int = 0) -> None:
    """Load a checkpoint into a freshly built state: model, momentum encoders and queues,
    optimizer, step, epoch, history, and this rank's RNG and data position."""
    d = Path(directory)
    missing, unexpected = load_model(state.objectives, str(d / MODEL_FILE), strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    saved = torch.load(d / TRAIN_STATE_FILE, weights_only=True, map_location="cpu")
    state.optimizer.load_state_dict(saved["optimizer"])
    state.step, state.epoch = int(saved["step"]), int(saved["epoch"])
    state.history = list(saved["history"])
    state.resumed_from_step = state.step
    worker_path = d / WORKER_FILE.format(rank=rank)
    if worker_path.is_file():
        worker = torch.load(worker_path, weights_only=True)
        _set_rng_state(worker["rng"])
        state.epoch_rows = int(worker["epoch_rows"])
        state.skipped = SkipCounts(**worker["skipped"])
        state.skipped.reasons.update(worker.get("skip_reasons", {}))
    else:  # the run resumed with more workers than it was saved with
        logger.warning("checkpoint %s has no state for rank %d: it restarts the epoch's data", d, rank)
        state.epoch_rows = 0


def load_trained_med(checkpoint_dir: str | Path) -> Med:
    """The Med of a training checkpoint folder (momentum encoders and queues left out)."""
    d = Path(checkpoint_dir)
    meta = json.loads((d / MED_FILE).read_text())
    med = Med(MedConfig.model_validate(meta["config"]))
    objectives_cfg = ObjectiveConfig.model_validate_json((d / OBJECTIVES_FILE).read_text())
    objectives = MedObjectives(med, objectives_cfg)
    load_model(objectives, str(d / MODEL_FILE), strict=True)
    med.heads = frozenset(meta["heads"])
    med.eval()
    return med


# ---------------------------------------------------------------------------------------------
# One optimizer step.
# ---------------------------------------------------------------------------------------------


def train_step(
    state: TrainState, batch: TrainBatch, lr: float, grad_clip: float | None = None, bf16: bool = False
) -> dict[str, torch.Tensor]:
    """Forward all enabled objectives, backward, clip, AdamW, clamp the temperature. Returns the
    objectives' outputs, detached (read them with float() only when logging: a GPU sync)."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    device_type = batch.pixel_values.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16 and device_type == "cuda"):
        out = state.model(
            batch.pixel_values,
            batch.input_ids,
            batch.attention_mask,
            image_ids=batch.image_ids,
            lm_labels=batch.lm_labels,
            step=state.step,
        )
    state.optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if grad_clip:
        nn.utils.clip_grad_norm_([p for g in state.optimizer.param_groups for p in g["params"]], grad_clip)
    state.optimizer.step()
    state.med.clamp_temp()
    state.step += 1
    metrics = {k: v.detach() for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
    negatives = getattr(state.objectives, "last_negatives", None)
    if negatives is not None and negatives.global_batch > len(batch):
        metrics["itm_neg_other_rank"] = _share_from_other_ranks(negatives, len(batch))
    return metrics


def _share_from_other_ranks(negatives: Any, local_batch: int) -> torch.Tensor:
    """Share of this step's ITM hard negatives (texts and images) drawn from another worker's rows
    of the gathered global batch; about (W-1)/W early in training, 0 if negatives were local only."""
    index = torch.cat([negatives.text_index, negatives.image_index])  # [2B], -1 = none
    index = index[index >= 0]
    if index.numel() == 0:
        return torch.zeros(())
    local = (index >= negatives.offset) & (index < negatives.offset + local_batch)
    return (~local).float().mean()


# ---------------------------------------------------------------------------------------------
# The loop Ray Train runs on every worker.
# ---------------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**31


def _all_have(have: bool, device: torch.device) -> bool:
    """True when every rank has a batch: a rank whose shard ran out ends the epoch for all, so DDP
    never waits on a rank that left."""
    if not (dist.is_available() and dist.is_initialized()):
        return have
    flag = torch.tensor([1 if have else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _sum_over_ranks(values: list[int], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(x) for x in t.tolist()]


def _setup_worker_logging(level: int) -> None:
    root = logging.getLogger("capfilt")
    root.setLevel(level)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False


@dataclass
class _Window:
    """Loss sums and timing over the steps since the last log line."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, out: dict[str, torch.Tensor]) -> None:
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        self.steps += 1

    def means(self) -> dict[str, float]:
        return {k: float(v) / self.steps for k, v in self.sums.items()}


class _WorkerLoop:
    """One worker's run: set up from the driver's config (restoring the latest checkpoint), then
    epochs of fixed-size batches until the step or epoch budget, reporting and checkpointing."""

    def __init__(self, config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        self.cfg = cfg = TrainConfig.model_validate(config["train"])
        self.total_steps: int | None = config["total_steps"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        _setup_worker_logging(config.get("log_level", logging.INFO) if self.rank == 0 else logging.WARNING)
        threads = config.get(
            "torch_threads"
        )  # run_training resolved it: cfg.torch_threads or the local default
        if threads:
            torch.set_num_threads(threads)
        self.device = ray.train.torch.get_device()
        find_unused = min(cfg.objectives.itc, cfg.objectives.itm, cfg.objectives.lm) <= 0

        def wrap(module: nn.Module) -> nn.Module:
            # Queues are kept equal on every rank by all-gathering features, so DDP need not
            # broadcast buffers; parameters of disabled objectives get no gradient.
            return ray.train.torch.prepare_model(
                module,
                parallel_strategy_kwargs={"find_unused_parameters": find_unused, "broadcast_buffers": False},
            )

        self.state = build_state(cfg, MedConfig.model_validate(config["med_config"]), self.device, wrap=wrap)
        _seed_worker(cfg.seed, self.rank)
        checkpoint = ray.train.get_checkpoint()
        self.saved_at = -1  # step of the last checkpoint this run holds
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                restore_checkpoint(self.state, d, self.rank)
            self.saved_at = self.state.step
            logger.info(
                "resumed at step %d (epoch %d, %d rows into it)",
                self.state.step,
                self.state.epoch,
                self.state.epoch_rows,
            )
        self.collator = Collator(
            load_tokenizer(config["tokenizer_dir"]),
            self.state.med.config.vision.image_size,
            train=True,
            min_scale=cfg.min_scale,
            max_words=cfg.max_words,
            max_length=cfg.max_length,
            prompt=cfg.prompt,
        )
        shard = ray.train.get_dataset_shard("train")
        assert shard is not None, "run_training passes the dataset as 'train'"
        self.shard = shard
        # Epochs alone end the run at an epoch boundary; steps / stop_at_step end it at a step.
        self.last_step = min((s for s in (cfg.steps, cfg.stop_at_step) if s), default=math.inf)
        self.global_batch = cfg.batch_size * self.world
        self.window = _Window()

    def finished(self) -> bool:
        epochs = self.cfg.epochs
        return self.state.step >= self.last_step or (epochs is not None and self.state.epoch >= epochs)

    def run(self) -> dict[str, Any] | None:
        t0, first_step = time.perf_counter(), self.state.step
        while not self.finished():
            self.run_epoch()
        if self.saved_at != self.state.step:
            self.report(save=True)
        wall = time.perf_counter() - t0
        skipped = self.state.skipped
        undecodable, empty_text = _sum_over_ranks([skipped.undecodable, skipped.empty_text], self.device)
        if self.rank != 0:
            return None
        return {
            "steps": self.state.step,
            "epoch": self.state.epoch,
            "samples": (self.state.step - first_step) * self.global_batch,
            "wall_s": wall,
            "world_size": self.world,
            "history": self.state.history,
            "skipped": {"undecodable": int(undecodable), "empty_text": int(empty_text)},
            "skip_reasons": dict(skipped.reasons),
            "resumed_from_step": self.state.resumed_from_step,
        }

    def run_epoch(self) -> None:
        """Train on the rest of the current epoch (all of it unless resuming mid-epoch)."""
        cfg, state = self.cfg, self.state
        skip_rows = state.epoch_rows
        raw = self.shard.iter_batches(
            batch_size=cfg.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=_epoch_seed(cfg.seed, state.epoch, self.rank) if cfg.shuffle_buffer else None,
        )
        batches = fixed_batches(raw, self.collator, cfg.batch_size, state.skipped, skip_rows=skip_rows)
        steps = 0
        try:
            while state.step < self.last_step:
                item = next(batches, None)
                if not _all_have(item is not None, self.device):
                    break
                assert item is not None
                batch, rows = item
                lr = learning_rate(cfg, state.step, state.epoch, self.total_steps)
                self.window.add(train_step(state, batch.to(self.device), lr, cfg.grad_clip, cfg.bf16))
                state.epoch_rows = rows
                steps += 1
                save = state.step % cfg.checkpoint_every == 0 or state.step >= self.last_step
                if save or state.step % cfg.log_every == 0:
                    self.report(save)
        finally:
            batches.close()
        if state.step >= self.last_step:
            return  # mid-epoch: a resume picks up from epoch_rows
        if steps == 0 and skip_rows == 0:
            raise RuntimeError(
                f"epoch {state.epoch} gave no full batch of {cfg.batch_size} usable rows on rank "
                f"{self.rank}; lower batch_size or add data"
            )
        state.epoch += 1
        state.epoch_rows = 0

    def report(self, save: bool) -> None:
        """Close the log window: a log line on rank 0, ray.train.report on every rank (a barrier),
        with this rank's part of a checkpoint when ``save``."""
        import ray.train

        state = self.state
        metrics: dict[str, Any] = {"step": state.step, "epoch": state.epoch}
        if self.window.steps:
            wall = time.perf_counter() - self.window.t0
            entry = {
                "step": float(state.step),
                "epoch": float(state.epoch),
                "lr": float(state.optimizer.param_groups[0]["lr"]),
                **self.window.means(),
                "samples_per_s": self.window.steps * self.global_batch / max(wall, 1e-9),
            }
            state.history.append(entry)
            metrics.update(entry)
            if self.rank == 0:
                self._log(entry)
        self.window = _Window()
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="capfilt-ckpt-") as tmp:
            save_checkpoint(state, tmp, self.rank, extra={"total_steps": self.total_steps})
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint_{state.step:08d}",
            )
        self.saved_at = state.step

    def _log(self, entry: dict[str, float]) -> None:
        losses = " ".join(f"{k.removeprefix('loss_')} {entry[k]:.3f}" for k in LOSS_KEYS[1:] if k in entry)
        logger.info(
            "step %d/%s epoch %d lr %.2e loss %.4f (%s) %.1f samples/s",
            self.state.step,
            self.total_steps or "?",
            self.state.epoch,
            entry["lr"],
            entry.get("loss", float("nan")),
            losses,
            entry["samples_per_s"],
        )


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's per-worker function; ``config`` is what ``run_training`` prepared. Returns the
    run summary on rank 0 (``Result.return_value``)."""
    return _WorkerLoop(config).run()


# ---------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainSummary:
    """What a run did, for the CLI and for callers (``first``/``final`` are log-window means)."""

    steps: int
    total_steps: int | None
    epochs: int
    samples: int  # trained on by this run (resumed runs count their own)
    wall_s: float
    samples_per_s: float  # over the whole run, start-up included
    steady_samples_per_s: float | None  # median of this run's log windows after its first
    first_losses: dict[str, float]
    final_losses: dict[str, float]
    history: list[dict[str, float]]
    skipped: dict[str, int]  # undecodable / empty_text (read and skipped), plus status -> rows not read
    checkpoint: str
    model_dir: str
    tokenizer_dir: str
    world_size: int
    resumed_from_step: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        def losses(d: dict[str, float]) -> str:
            return ", ".join(f"{k} {d[k]:.4f}" for k in LOSS_KEYS if k in d) or "n/a"

        target = f" of {self.total_steps}" if self.total_steps else ""
        resumed = f" (resumed at {self.resumed_from_step})" if self.resumed_from_step is not None else ""
        return [
            f"steps:          {self.steps}{target}{resumed}, {self.epochs} epoch(s) done",
            f"workers:        {self.world_size}",
            f"samples/s:      {self.samples_per_s:.1f} ({self.samples} samples in {self.wall_s:.1f} s)"
            + (f", {self.steady_samples_per_s:.1f} after warm-up" if self.steady_samples_per_s else ""),
            f"first losses:   {losses(self.first_losses)}",
            f"final losses:   {losses(self.final_losses)}",
            "skipped rows:   " + (", ".join(f"{k} {v}" for k, v in self.skipped.items() if v) or "none"),
            f"checkpoint:     {self.checkpoint}",
            f"model:          {self.model_dir}",
        ]


def _losses(entry: dict[str, float] | None) -> dict[str, float]:
    return {k: v for k, v in (entry or {}).items() if k.startswith("loss")}


def _check_resume(out: Path, cfg: TrainConfig, resume: bool) -> None:
    saved_path = out / CONFIG_FILE
    if not resume:
        if saved_path.exists() or (out / cfg.run_name).exists():
            raise ConfigError(
                f"{out} already holds a training run; pass resume (--resume) to continue it, or a new out_dir"
            )
        return
    if not saved_path.exists():
        raise ConfigError(
            f"nothing to resume in {out}: it has no {CONFIG_FILE}; drop --resume to start a run"
        )
    saved = json.loads(saved_path.read_text())
    now = json.loads(cfg.model_dump_json())
    differ = sorted(k for k in now if k not in _RESUME_MAY_CHANGE and saved.get(k) != now[k])
    if differ:
        raise ConfigError(
            f"cannot resume {out} with a different {', '.join(differ)} (saved: "
            + ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
            + "); resume with the saved values or start a new out_dir"
        )


def _prepare_tokenizer(
    cfg: TrainConfig, sources: list[Any], out: Path, model_vocab: int
) -> PreTrainedTokenizerBase:
    """The run's tokenizer, saved once under out/tokenizer: reused on resume (WordPiece training is
    not reproducible), else the given one, the init checkpoint's, or a WordPiece trained on the data."""
    tok_dir = out / TOKENIZER_DIR
    if tok_dir.is_dir():
        return load_tokenizer(tok_dir)
    given = cfg.tokenizer
    if given is None and cfg.init and (Path(cfg.init) / "tokenizer_config.json").is_file():
        given = cfg.init
    if given is not None:
        tokenizer = load_tokenizer(given)
        tokenizer.save_pretrained(str(tok_dir))
        return tokenizer
    if cfg.init:
        raise ConfigError(
            f"init {cfg.init} has no tokenizer beside it; pass tokenizer= the folder it was trained with"
        )
    texts = iter_texts(sources, cfg.max_words)
    if cfg.prompt:
        texts = _chain([cfg.prompt], texts)
    logger.info("training a WordPiece tokenizer on the training texts")
    return train_wordpiece(texts, vocab_size=cfg.tokenizer_vocab_size or model_vocab, out_dir=tok_dir)


def _chain(first: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from first
    yield from rest


def _prepare_model_config(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> MedConfig:
    ids = TokenIds.from_tokenizer(tokenizer)
    if cfg.init:
        from capfilt.model.checkpoint import load_checkpoint

        med = load_checkpoint(cfg.init, cfg.model, enc_token_id=ids.enc)  # fail now, not in a worker
        t = med.config.text
        if t.vocab_size != ids.vocab_size or (t.dec_token_id, t.enc_token_id) != (ids.bos, ids.enc):
            raise ConfigError(
                f"init {cfg.init} has vocab {t.vocab_size} with [DEC]={t.dec_token_id} [ENC]={t.enc_token_id}, "
                f"the tokenizer {ids.vocab_size} with [DEC]={ids.bos} [ENC]={ids.enc}; pass the tokenizer "
                "the checkpoint was trained with"
            )
        return med.config
    return get_config(cfg.model).with_token_ids(ids)


def plan_steps(cfg: TrainConfig, usable_rows: int, world: int) -> int | None:
    """The run's length in optimizer steps: ``steps``, or ``epochs`` worth of full global batches
    (an estimate: rows that do not decode shorten an epoch)."""
    per_epoch = usable_rows // (cfg.batch_size * world)
    if per_epoch == 0:
        raise ConfigError(
            f"{usable_rows} usable rows make no full global batch of {cfg.batch_size} x {world} workers; "
            "lower batch_size or num_workers"
        )
    by_epochs = cfg.epochs * per_epoch if cfg.epochs else None
    if cfg.steps is None:
        return by_epochs
    return min(cfg.steps, by_epochs) if by_epochs else cfg.steps


def _check_queue(cfg: TrainConfig, med_config: MedConfig) -> None:
    if cfg.objectives.itc <= 0:
        return
    queue = cfg.objectives.queue_size if cfg.objectives.queue_size is not None else med_config.queue_size
    global_batch = cfg.batch_size * cfg.num_workers
    if queue and queue % global_batch:
        raise ConfigError(
            f"the ITC queue ({queue}) must be a multiple of the global batch ({cfg.batch_size} x "
            f"{cfg.num_workers} workers = {global_batch}), as in BLIP; change batch_size or objectives.queue_size"
        )


def run_training(cfg: TrainConfig, ray_address: str | None = None, resume: bool = False) -> TrainSummary:
    """Train on Ray Train and write the run folder (see the module docstring).

    ``resume=True`` continues the run in ``cfg.out_dir`` from its latest checkpoint (same config
    except the fields in ``_RESUME_MAY_CHANGE``); without it an existing run is an error.
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from capfilt.core.cluster import ensure_ray, local_threads_per_worker
    from capfilt.model.checkpoint import save_med

    out = Path(cfg.out_dir).resolve()
    if cfg.vision_init and Path(cfg.vision_init).exists():
        # Workers do not run in the driver's folder: give them an absolute path.
        cfg = cfg.model_copy(update={"vision_init": str(Path(cfg.vision_init).resolve())})
    _check_resume(out, cfg, resume)
    sources = resolve_sources(cfg.data)
    counts = count_pairs(sources)
    total_steps = plan_steps(cfg, counts.usable, cfg.num_workers)
    out.mkdir(parents=True, exist_ok=True)
    base_config = get_config(cfg.model) if not cfg.init else None
    tokenizer = _prepare_tokenizer(cfg, sources, out, base_config.text.vocab_size if base_config else 0)
    med_config = _prepare_model_config(cfg, tokenizer)
    _check_queue(cfg, med_config)
    (out / CONFIG_FILE).write_text(cfg.model_dump_json(indent=2) + "\n")
    logger.info(
        "training %s on %d rows (%s not downloaded) for %s steps with %d worker(s)",
        med_config.name,
        counts.usable,
        sum(counts.not_downloaded.values()),
        total_steps,
        cfg.num_workers,
    )

    ensure_ray(ray_address)
    threads = cfg.torch_threads or (None if cfg.use_gpu else local_threads_per_worker(cfg.num_workers))
    if threads:
        logger.info("%d torch thread(s) per worker", threads)
    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        cast(Any, train_loop_per_worker),  # its return value is Result.return_value (Train V2)
        train_loop_config={
            "train": json.loads(cfg.model_dump_json()),
            "med_config": med_config.model_dump(),
            "tokenizer_dir": str(out / TOKENIZER_DIR),
            "total_steps": total_steps,
            "torch_threads": threads,
            "log_level": logging.getLogger("capfilt").getEffectiveLevel(),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=str(out),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": pairs_dataset(sources, cfg.seed)},
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=cfg.preserve_order)),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps the worker's exception; say which run failed and how to go on
        raise StageFailed(
            f"training in {out} failed: {type(err).__name__}: {err}. Fix the cause and rerun with resume "
            "to continue from the last checkpoint"
        ) from err
    if result.error is not None:
        raise StageFailed(f"training in {out} failed: {result.error}")
    rv: dict[str, Any] | None = getattr(result, "return_value", None)
    if result.checkpoint is None or rv is None:
        raise StageFailed(f"training in {out} ended without a checkpoint or summary")

    with result.checkpoint.as_directory() as ckpt_dir:
        med = load_trained_med(ckpt_dir)
    model_dir = out / MODEL_DIR
    save_med(med, model_dir)
    tokenizer.save_pretrained(str(model_dir))
    history = rv["history"]
    this_run = [h["samples_per_s"] for h in history if h["step"] > (rv["resumed_from_step"] or 0)]
    summary = TrainSummary(
        steps=rv["steps"],
        total_steps=total_steps,
        epochs=rv["epoch"],
        samples=rv["samples"],
        wall_s=rv["wall_s"],
        samples_per_s=rv["samples"] / max(rv["wall_s"], 1e-9),
        steady_samples_per_s=statistics.median(this_run[1:]) if len(this_run) > 1 else None,
        first_losses=_losses(history[0] if history else None),
        final_losses=_losses(history[-1] if history else None),
        history=history,
        skipped={**rv["skipped"], **counts.not_downloaded},
        checkpoint=str(result.checkpoint.path),
        model_dir=str(model_dir),
        tokenizer_dir=str(out / TOKENIZER_DIR),
        world_size=rv["world_size"],
        resumed_from_step=rv["resumed_from_step"],
    )
    (out / SUMMARY_FILE).write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return summary
