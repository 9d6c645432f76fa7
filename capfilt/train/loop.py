"""The training loop itself: learning-rate schedule, training state and its checkpoint, one optimizer
step, and the per-worker loop Ray Train runs (``train_loop_per_worker``); ``capfilt.train.driver``
launches it.

A checkpoint folder ``<run_name>/checkpoint_<step>/`` holds the model and objective state in
safetensors, and the optimizer, step, schedule and every rank's RNG state and data position via
``torch.save``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel
from safetensors.torch import load_model, save_model
from torch import nn

from capfilt.model import MedConfig
from capfilt.model.med import Med
from capfilt.model.objectives import MedObjectives, ObjectiveConfig
from capfilt.model.tokenizer import load_tokenizer
from capfilt.train.config import TrainConfig
from capfilt.train.data import Collator, SkipCounts, TrainBatch, fixed_batches

__all__ = [
    "LOSS_KEYS",
    "MODEL_FILE",
    "TRAIN_STATE_FILE",
    "TrainConfig",
    "TrainState",
    "build_med",
    "build_state",
    "learning_rate",
    "load_trained_med",
    "restore_checkpoint",
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

LOSS_KEYS = ("loss", "loss_itc", "loss_itm", "loss_lm")


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

        # med_config is what the driver read from this checkpoint: a .pth's family and token ids.
        med = load_checkpoint(cfg.init, med_config, enc_token_id=med_config.text.enc_token_id)
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
    if cfg.vision_lr_scale == 0:
        med.vision_model.requires_grad_(False)
    vision = {id(p) for p in med.vision_model.parameters()}
    params = [p for p in objectives.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in vision], "lr_scale": 1.0}]
    if cfg.vision_lr_scale > 0:
        groups.append({"params": [p for p in params if id(p) in vision], "lr_scale": cfg.vision_lr_scale})
    # BLIP decays every parameter, biases and LayerNorms included.
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
        group["lr"] = lr * group.get("lr_scale", 1.0)
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
