"""The `capfilt` command line: thin wrappers over the library, each ending in a short summary."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from capfilt.core.errors import ConfigError, StageFailed

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="capfilt: clean and bootstrap image-text datasets with BLIP's CapFilt, on Ray.",
)
world_app = typer.Typer(no_args_is_help=True, help="The synthetic shapes world: make it, serve it.")
app.add_typer(world_app, name="world")

log = logging.getLogger("capfilt")


def _setup_logging(verbose: bool) -> None:
    from capfilt.core.logs import FORMAT, install

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT, datefmt="%H:%M:%S")
    install(logging.getLogger().handlers)  # " [stage shard]" after the logger name
    for noisy in ("urllib3", "filelock", "fsspec", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    _setup_logging(verbose)


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _print_block(title: str, lines: list[str]) -> None:
    typer.echo("")
    typer.secho(title, bold=True)
    for line in lines:
        typer.echo(f"  {line}")


@world_app.command("make")
def world_make(
    out: Annotated[Path, typer.Option(help="Folder to write the world into.")],
    seed: int = 0,
    n_web: Annotated[int, typer.Option(help="Web (noisy) pairs.")] = 2000,
    n_human: Annotated[int, typer.Option(help="Human-annotated images.")] = 500,
    n_test: Annotated[int, typer.Option(help="Test images.")] = 200,
    image_size: int = 64,
    bad_rate: Annotated[float, typer.Option(help="Share of extra web rows that are bad inputs.")] = 0.05,
) -> None:
    """Make a seeded shapes world: images, noisy web pairs, human captions, test split."""
    from capfilt.world import WorldConfig, make_world

    try:
        cfg = WorldConfig(
            seed=seed, n_web=n_web, n_human=n_human, n_test=n_test, image_size=image_size, bad_rate=bad_rate
        )
    except ValueError as err:
        _fail(err)
    t0 = time.time()
    make_world(out, cfg)
    _print_block("world made", [f"folder: {out}", f"wall time: {time.time() - t0:.1f} s"])


@world_app.command("serve")
def world_serve(
    world_dir: Annotated[Path, typer.Argument(help="A folder made by `capfilt world make`.")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1; 0 picks a free one.")] = 0,
    urls_out: Annotated[Path | None, typer.Option(help="Write the URL list for this server here.")] = None,
) -> None:
    """Serve a world's images on 127.0.0.1 until interrupted."""
    from capfilt.world import WorldServer, write_url_list

    if not (world_dir / "world.json").exists():
        _fail(
            ConfigError(
                f"{world_dir} is not a world folder (no world.json); make one with `capfilt world make`"
            )
        )
    with WorldServer(world_dir, port=port) as server:
        urls = write_url_list(world_dir, server.base_url, urls_out or world_dir / "urls.parquet")
        typer.echo(f"serving {world_dir} at {server.base_url}; URL list: {urls}; Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            typer.echo("stopped")


@app.command()
def download(
    urls: Annotated[Path, typer.Option(help="URL list: .parquet, .csv, .tsv or .jsonl.")],
    out: Annotated[Path, typer.Option(help="Output folder for the Parquet shards.")],
    url_col: str = "url",
    caption_col: str = "caption",
    input_format: Annotated[
        str | None, typer.Option(help="parquet|csv|tsv|jsonl; default: from extension.")
    ] = None,
    image_size: int = 384,
    shard_size: int = 10_000,
    thread_count: int = 32,
    timeout: float = 10.0,
    retries: int = 0,
    source: Annotated[str, typer.Option(help="Dataset name mixed into each row's uid.")] = "web",
    ray_address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster; default: local Ray.")
    ] = None,
    url_policy: Annotated[
        str,
        typer.Option(
            help="Addresses a URL or redirect may reach: public (refuses loopback, private, link-local "
            "and cloud metadata addresses), allow_loopback (also 127.0.0.0/8 and ::1, e.g. `capfilt "
            "world serve`) or allow_private (also private networks). Link-local is always refused."
        ),
    ] = "public",
    allow_loopback: Annotated[
        bool, typer.Option("--allow-loopback", help="Short for --url-policy allow_loopback.")
    ] = False,
) -> None:
    """Download a URL list with img2dataset on Ray into Parquet shards, one row per input row."""
    from capfilt.stages.download import DownloadConfig, run_download

    if allow_loopback and url_policy == "public":
        url_policy = "allow_loopback"

    try:
        cfg = DownloadConfig(
            image_size=image_size,
            shard_size=shard_size,
            thread_count=thread_count,
            timeout=timeout,
            retries=retries,
            source=source,
            url_policy=url_policy,  # type: ignore[arg-type]  # pydantic checks it: a clear error
        )
        summary = run_download(
            urls,
            out,
            cfg,
            url_col=url_col,
            caption_col=caption_col or None,
            input_format=input_format,
            ray_address=ray_address,
        )
    except (ConfigError, ValueError, StageFailed) as err:
        _fail(err)
    _print_block("download summary", summary.lines())


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe, e.g. pipelines/demo.yaml.")],
    out: Annotated[Path | None, typer.Option(help="Override the recipe's run folder.")] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Override the recipe's ray_address (e.g. auto); 'local': local Ray.")
    ] = None,
) -> None:
    """Run the stages a recipe names, skipping work already done."""
    from capfilt.pipeline.recipe import load_recipe
    from capfilt.pipeline.runner import run_recipe, summary_blocks

    t0 = time.time()
    overrides: dict[str, str | None] = {"out": str(out)} if out else {}
    if ray_address:
        overrides["ray_address"] = None if ray_address == "local" else ray_address
    try:
        rec = load_recipe(recipe, overrides)
        result = run_recipe(rec)
    except (ConfigError, StageFailed) as err:
        _fail(err)
    for title, lines in summary_blocks(result):
        _print_block(title, lines)
    typer.echo(f"\nrun {rec.name} finished in {time.time() - t0:.1f} s; outputs in {result.out}")


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, tokenizer, final model.")],
    data: Annotated[
        list[Path] | None,
        typer.Option(help="Download or cleaned shard folder, or COCO-Karpathy JSON; repeat for more."),
    ] = None,
    model: Annotated[
        str, typer.Option(help="Architecture name (see models/) or a MedConfig JSON.")
    ] = "med-tiny",
    init: Annotated[
        str | None, typer.Option(help="Start from this checkpoint (capfilt, transformers or .pth).")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer folder; default: train a WordPiece on the data.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Ray Train workers (DDP).")] = 1,
    gpu: Annotated[bool, typer.Option("--gpu", help="One GPU per worker, bf16 autocast.")] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
    steps: Annotated[int | None, typer.Option(help="Total optimizer steps.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (with --steps: whichever ends first).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Per worker (default 16).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 3e-4).")] = None,
    warmup_steps: Annotated[
        int | None, typer.Option(help="Linear warmup (default 3000, or a tenth of --steps when less).")
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Steps between checkpoints (default 1000).")
    ] = None,
    log_every: Annotated[int | None, typer.Option(help="Steps between log lines (default 50).")] = None,
    seed: int = 0,
    ray_address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster; default: local Ray.")
    ] = None,
) -> None:
    """Pretrain MED with ITC + ITM + LM on Ray Train (BLIP's recipe); --resume continues a run."""
    from pydantic import ValidationError

    from capfilt.train.loop import CONFIG_FILE, TrainConfig, run_training

    options = {
        "steps": steps,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "checkpoint_every": checkpoint_every,
        "log_every": log_every,
    }
    given = {k: v for k, v in options.items() if v is not None}
    try:
        if resume and not data:
            # Resuming needs no flags again: the run folder remembers them.
            saved_path = out / CONFIG_FILE
            if not saved_path.is_file():
                raise ConfigError(f"nothing to resume in {out}: no {CONFIG_FILE}; pass --data to start a run")
            saved = TrainConfig.model_validate_json(saved_path.read_text())
            cfg = TrainConfig.model_validate(
                saved.model_dump() | given | {"num_workers": workers, "use_gpu": gpu, "out_dir": str(out)}
            )
        else:
            if not data:
                raise ConfigError("pass --data with at least one shard folder or JSON file")
            if "warmup_steps" not in given and steps is not None:
                given["warmup_steps"] = min(3000, steps // 10)
            cfg = TrainConfig(
                model=model,
                init=init,
                tokenizer=str(tokenizer) if tokenizer else None,
                data=[str(d) for d in data],
                out_dir=str(out),
                run_name="pretrain",
                num_workers=workers,
                use_gpu=gpu,
                seed=seed,
                **given,
            )
        summary = run_training(cfg, ray_address=ray_address, resume=resume)
    except ValidationError as err:
        _fail(ConfigError(f"invalid training options: {err}"))
    except (ConfigError, ValueError, StageFailed) as err:
        _fail(err)
    _print_block("pretrain summary", summary.lines())


@app.command("capfilt")
def capfilt_cmd(
    data: Annotated[Path, typer.Option(help="Download folder (SAMPLE shards) of the web images.")],
    out: Annotated[Path, typer.Option(help="Run folder: cleaned/, candidates/, _stats/, _summary.json.")],
    captioner: Annotated[
        Path | None,
        typer.Option(
            help="Captioner: capfilt model folder, BlipForConditionalGeneration folder or BLIP .pth."
        ),
    ] = None,
    filter_: Annotated[
        Path | None,
        typer.Option(
            "--filter", help="Filter: capfilt model folder, BlipForImageTextRetrieval folder or BLIP .pth."
        ),
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer folder; default: the one saved with each model.")
    ] = None,
    arch: Annotated[
        str | None, typer.Option(help="Architecture of a .pth checkpoint, e.g. med-base.")
    ] = None,
    k: Annotated[int, typer.Option(help="Synthetic captions per image (BLIP: 1).")] = 1,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.9,
    beam: Annotated[
        int | None, typer.Option(help="Beam search with N beams instead of nucleus sampling (1: greedy).")
    ] = None,
    min_length: Annotated[int, typer.Option(help="Tokens, counting [DEC] and the prompt.")] = 5,
    max_length: Annotated[int, typer.Option(help="Tokens, counting [DEC] and the prompt.")] = 30,
    repetition_penalty: Annotated[
        float | None, typer.Option(help="[default: 1.1 when sampling, 1.0 for beam search]")
    ] = None,
    prompt: Annotated[
        str, typer.Option(help="Decoder prompt, stripped from the captions.")
    ] = "a picture of ",
    seed: Annotated[
        int, typer.Option(help="Caption k of image uid is sampled from seed (seed, uid, k).")
    ] = 0,
    threshold: Annotated[float, typer.Option(help="Keep a text when its ITM p(match) >= this.")] = 0.5,
    images: Annotated[
        str, typer.Option(help="include: copy image bytes into cleaned shards; reference: image_ref only.")
    ] = "include",
    round_: Annotated[int, typer.Option("--round", help="CapFilt round recorded on every row.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 32,
    actors: Annotated[int, typer.Option(help="Actors per model.")] = 1,
    captioner_actors: Annotated[int | None, typer.Option(help="[default: --actors]")] = None,
    filter_actors: Annotated[int | None, typer.Option(help="[default: --actors]")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    human: Annotated[
        Path | None, typer.Option(help="Human pairs to pass through: Karpathy-style JSON or a shards folder.")
    ] = None,
    human_images: Annotated[
        Path | None, typer.Option(help="Folder the JSON's image paths are relative to. [default: its folder]")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster; default: local Ray.")
    ] = None,
    max_shards: Annotated[
        int | None, typer.Option(help="Stop after this many input shards; rerun to finish.")
    ] = None,
) -> None:
    """Caption and filter downloaded images (BLIP's CapFilt) into cleaned shards; reruns resume."""
    from pydantic import ValidationError

    from capfilt.stages.capfilt.config import CapFiltConfig
    from capfilt.stages.capfilt.driver import run_capfilt

    try:
        cfg = CapFiltConfig.model_validate(
            {
                "k": k,
                "top_p": top_p,
                "sample": beam is None,
                "num_beams": beam or 1,
                "min_length": min_length,
                "max_length": max_length,
                "repetition_penalty": repetition_penalty,
                "prompt": prompt,
                "seed": seed,
                "threshold": threshold,
                "images": images,
                "round": round_,
                "batch_size": batch_size,
                "captioner_actors": captioner_actors or actors,
                "filter_actors": filter_actors or actors,
                "dtype": dtype,
            }
        )
        summary = run_capfilt(
            data,
            out,
            captioner,
            filter_,
            cfg,
            ray_address,
            tokenizer=tokenizer,
            arch=arch,
            human=human,
            human_images=human_images,
            max_shards=max_shards,
        )
    except ValidationError as err:
        _fail(ConfigError(f"invalid CapFilt options: {err}"))
    except (ConfigError, ValueError, StageFailed) as err:
        _fail(err)
    _print_block("capfilt summary", summary.lines())


@app.command()
def rethreshold(
    run: Annotated[Path, typer.Option(help="A run folder written by `capfilt capfilt`.")],
    threshold: Annotated[float, typer.Option(help="Keep a text when its ITM p(match) >= this.")],
) -> None:
    """Re-decide a CapFilt run at a new threshold from its candidates table; no model runs."""
    from capfilt.stages.capfilt.rethreshold import rethreshold as rethreshold_run

    try:
        summary = rethreshold_run(run, threshold)
    except (ConfigError, ValueError, StageFailed) as err:
        _fail(err)
    _print_block("rethreshold summary", summary.lines())


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe.")],
    check_paths: Annotated[
        bool,
        typer.Option(
            "--check-paths/--skip-paths",
            help="Check that the recipe's input files exist (skip: a cluster recipe, checked elsewhere).",
        ),
    ] = True,
) -> None:
    """Check a recipe without running it."""
    from capfilt.pipeline.recipe import load_recipe

    try:
        rec = load_recipe(recipe, check_paths=check_paths)
    except ConfigError as err:
        _fail(err)
    unchecked = "" if check_paths else " (input paths not checked)"
    typer.echo(f"recipe {recipe} is valid{unchecked}: stages {', '.join(rec.stages)}; run folder {rec.out}")


@app.command()
def status(
    run_dir: Annotated[
        Path, typer.Argument(help="A run folder of `capfilt run`, or one stage's output folder.")
    ],
) -> None:
    """Summarise a run, finished or in progress: stages done, shards done, failures by reason."""
    from capfilt.pipeline.status import run_status

    try:
        st = run_status(run_dir)
    except ConfigError as err:
        _fail(err)
    for line in st.lines():
        typer.echo(line)


def entry() -> None:  # pragma: no cover - for `python -m capfilt`
    sys.exit(app())
