"""The training driver: ``run_training`` checks the run, prepares the tokenizer and model config once,
launches Ray Train's TorchTrainer on ``train_loop_per_worker`` and writes the final model and summary.

A run folder (``out_dir``) holds ``train_config.json``, ``tokenizer/``, Ray's run folder
``<run_name>/checkpoint_<step>/`` (``capfilt.train.loop``), and at the end ``model/``
(``save_med`` + tokenizer) and ``train_summary.json``.

The run folder may be on object storage (``s3://bucket/runs/x/pretrain``): Ray Train then writes
its checkpoints there itself (``RunConfig(storage_path=..., storage_filesystem=...)``), and the
tokenizer and the final model are written to a local temp folder and uploaded
(``capfilt.core.fs.put``); workers read the tokenizer from its URI.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from capfilt.core import fs
from capfilt.core.errors import ConfigError, StageFailed
from capfilt.core.fs import Location, RemotePath
from capfilt.model import MedConfig, get_config
from capfilt.model.objectives_config import check_queue_size
from capfilt.model.tokenizer import TokenIds, find_tokenizer, load_tokenizer, train_wordpiece
from capfilt.train.config import (
    _RESUME_MAY_CHANGE,
    CONFIG_FILE,
    MODEL_DIR,
    SUMMARY_FILE,
    TOKENIZER_DIR,
    TrainConfig,
)
from capfilt.train.data import count_pairs, iter_texts, pairs_dataset, resolve_sources
from capfilt.train.loop import LOSS_KEYS, load_trained_med, train_loop_per_worker

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TrainSummary", "plan_steps", "run_training"]

logger = logging.getLogger(__name__)


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


def _check_resume(out: Location, cfg: TrainConfig, resume: bool) -> None:
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


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, dest: Location) -> None:
    if isinstance(dest, Path):
        tokenizer.save_pretrained(str(dest))
        return
    with tempfile.TemporaryDirectory(prefix="capfilt-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        fs.put(Path(tmp), dest)


def _prepare_tokenizer(
    cfg: TrainConfig, sources: list[Any], out: Location, model_vocab: int
) -> PreTrainedTokenizerBase:
    """The run's tokenizer, saved once under out/tokenizer: reused on resume (WordPiece training is
    not reproducible), else the given one, the init checkpoint's, or a WordPiece trained on the data."""
    tok_dir = out / TOKENIZER_DIR
    if tok_dir.is_dir():
        return load_tokenizer(tok_dir)
    if cfg.tokenizer is not None or cfg.init:
        try:  # the model's own, by the one rule (capfilt.model.tokenizer.find_tokenizer)
            given = find_tokenizer(cfg.init or ".", override=cfg.tokenizer)
        except ConfigError as err:
            raise ConfigError(
                f"init {cfg.init}: {err}; pass tokenizer= the folder it was trained with"
            ) from None
        tokenizer = load_tokenizer(given)
        _save_tokenizer(tokenizer, tok_dir)
        return tokenizer
    texts = iter_texts(sources, cfg.max_words)
    if cfg.prompt:
        texts = _chain([cfg.prompt], texts)
    logger.info("training a WordPiece tokenizer on the training texts")
    tokenizer = train_wordpiece(texts, vocab_size=cfg.tokenizer_vocab_size or model_vocab)
    _save_tokenizer(tokenizer, tok_dir)
    return tokenizer


def _chain(first: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from first
    yield from rest


def _prepare_model_config(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> MedConfig:
    ids = TokenIds.from_tokenizer(tokenizer)
    if cfg.init:
        from capfilt.model.checkpoint import load_checkpoint

        # fail now, not in a worker; a .pth takes the tokenizer's ids (folders carry their own)
        med = load_checkpoint(cfg.init, cfg.model, enc_token_id=ids.enc, token_ids=ids)
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
    """Before any worker starts: the ITC queue must divide into global batches of this run."""
    global_batch = cfg.batch_size * cfg.num_workers
    check_queue_size(
        cfg.objectives, med_config.queue_size, global_batch, f"{cfg.batch_size} x {cfg.num_workers} workers"
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

    out = fs.location(cfg.out_dir).resolve()
    if cfg.vision_init and not fs.is_remote(cfg.vision_init) and Path(cfg.vision_init).exists():
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
    fs.write_atomic(out / CONFIG_FILE, (cfg.model_dump_json(indent=2) + "\n").encode())
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
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            # A remote folder: its bucket/key and the filesystem object, which Ray hands to every
            # worker (each uploads its own part of a checkpoint); workers need no shared disk.
            storage_path=out.fs_path if isinstance(out, RemotePath) else str(out),
            storage_filesystem=out.filesystem if isinstance(out, RemotePath) else None,
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
    with tempfile.TemporaryDirectory(prefix="capfilt-model-") as tmp:
        local = model_dir if isinstance(model_dir, Path) else Path(tmp) / MODEL_DIR
        save_med(med, local)
        tokenizer.save_pretrained(str(local))
        fs.put(local, model_dir)  # nothing to do for a local run folder
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
        checkpoint=_uri(out, result.checkpoint.path),
        model_dir=str(model_dir),
        tokenizer_dir=str(out / TOKENIZER_DIR),
        world_size=rv["world_size"],
        resumed_from_step=rv["resumed_from_step"],
    )
    fs.write_atomic(out / SUMMARY_FILE, (json.dumps(summary.to_json(), indent=2) + "\n").encode())
    return summary


def _uri(out: Location, path: str) -> str:
    """A checkpoint's path as Ray gives it (bucket/key for a remote folder) as a user names it."""
    return f"{out.scheme}://{path}" if isinstance(out, RemotePath) else path
