"""The `capfilt` command line: thin wrappers over the library, each ending in a short summary."""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from capfilt.cli_config import config_options
from capfilt.core.errors import ConfigError, StageFailed
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.download import DownloadConfig
from capfilt.train.config import TrainConfig

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


_verbose = False


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging, and Ray's own output on the terminal.")
    ] = False,
) -> None:
    global _verbose
    _verbose = verbose
    _setup_logging(verbose)


def _engine_log(run_dir: Any) -> Any:
    """Everything logged (Ray's chatter too) into the run folder's log (a local path or a URI:
    written locally and uploaded, see capfilt.core.logs); the terminal keeps ours."""
    from capfilt.core import fs
    from capfilt.core.layout import LOG_FILE
    from capfilt.core.logs import engine_log

    return engine_log(fs.location(run_dir) / LOG_FILE, verbose=_verbose)


def _log_dir(out: str) -> Path:
    """Where a command's log goes: its output folder, or the working folder for a remote one."""
    from capfilt.core import fs

    loc = fs.location(out)
    return loc if isinstance(loc, Path) else Path(tempfile.gettempdir()) / "capfilt-logs"


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


def _set_option() -> Any:
    return typer.Option(
        "--set",
        help="Set a recipe field, FIELD=VALUE with VALUE in YAML, e.g. --set capfilt.k=3; repeat for more.",
    )


@app.command()
@config_options(DownloadConfig, aliases={"url_policy": "--policy"})
def download(
    urls: Annotated[
        list[str],
        typer.Option(
            help="URL list: a .parquet, .csv, .tsv or .jsonl file (optionally .gz/.zst/.bz2), a "
            "folder of them, or a glob; local or s3://...; repeat for more."
        ),
    ],
    out: Annotated[str, typer.Option(help="Output folder for the Parquet shards (local or s3://...).")],
    url_col: str = "url",
    caption_col: str = "caption",
    input_format: Annotated[
        str | None, typer.Option(help="parquet|csv|tsv|jsonl; default: from extension.")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster; default: local Ray.")
    ] = None,
    allow_loopback: Annotated[
        bool, typer.Option("--allow-loopback", help="Short for --url-policy allow_loopback.")
    ] = False,
    config: dict[str, Any] | None = None,
) -> None:
    """Download a URL list with img2dataset on Ray into Parquet shards, one row per input row.
    Every field of a recipe's `download:` section is an option."""
    from capfilt.stages.download import DownloadConfig, run_download

    options = dict(config or {})
    if allow_loopback:
        options.setdefault("url_policy", "allow_loopback")
    try:
        cfg = _validated(DownloadConfig, options, "download")
        with _engine_log(_log_dir(out)):
            summary = run_download(
                urls if len(urls) > 1 else urls[0],
                out,
                cfg,
                url_col=url_col,
                caption_col=caption_col or None,
                input_format=input_format,
                ray_address=ray_address,
            )
    except (ConfigError, StageFailed) as err:
        _fail(err)
    _print_block("download summary", summary.lines())


def _validated(model: Any, options: dict[str, Any], what: str) -> Any:
    """`model` built from CLI options; a ConfigError naming the option on bad values."""
    from pydantic import ValidationError

    try:
        return model.model_validate(options)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"])
            option = "--" + str(e["loc"][0]).replace("_", "-") if e["loc"] else ""
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {option} ({field}): {msg}" if option else f"  {msg}")
        raise ConfigError(f"invalid {what} options:\n" + "\n".join(lines)) from err


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe, e.g. pipelines/demo.yaml.")],
    out: Annotated[Path | None, typer.Option(help="Override the recipe's run folder.")] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Override the recipe's ray_address (e.g. auto); 'local': local Ray.")
    ] = None,
    set_: Annotated[list[str] | None, _set_option()] = None,
) -> None:
    """Run the stages a recipe names, skipping work already done."""
    from capfilt.core.cluster import ray_running, shutdown_local_ray
    from capfilt.pipeline.recipe import load_recipe, parse_assignments
    from capfilt.pipeline.runner import run_recipe, summary_blocks

    t0 = time.time()
    try:
        overrides = parse_assignments(set_)
        if out:
            overrides["out"] = str(out)
        if ray_address:
            overrides["ray_address"] = None if ray_address == "local" else ray_address
        rec = load_recipe(recipe, overrides)
        ours = not ray_running()  # a Ray this command starts is stopped by it, in the quiet block
        with _engine_log(rec.out):
            try:
                result = run_recipe(rec)
            finally:
                if ours:
                    shutdown_local_ray()  # Ray's last lines go to the log file, not after the summary
    except (ConfigError, StageFailed) as err:
        _fail(err)
    for title, lines in summary_blocks(result):
        _print_block(title, lines)
    typer.echo(f"\nrun {rec.name} finished in {time.time() - t0:.0f} s; outputs in {result.out}")


_TRAIN_FIXED = ("data", "out_dir", "run_name")


@app.command()
@config_options(
    TrainConfig, exclude=_TRAIN_FIXED, aliases={"num_workers": "--workers", "use_gpu": "--gpu/--cpu"}
)
def pretrain(
    out: Annotated[
        str, typer.Option(help="Run folder (a path or s3://...): checkpoints, tokenizer, final model.")
    ],
    data: Annotated[
        list[str] | None,
        typer.Option(help="Download or cleaned shard folder, or COCO-Karpathy JSON; repeat for more."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
    ray_address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster; default: local Ray.")
    ] = None,
    config: dict[str, Any] | None = None,
) -> None:
    """Pretrain MED with ITC + ITM + LM on Ray Train (BLIP's recipe); --resume continues a run.
    Every field of a recipe's training section is an option."""
    from capfilt.core import fs
    from capfilt.train.config import CONFIG_FILE, TrainConfig
    from capfilt.train.driver import run_training

    given = dict(config or {})
    try:
        if resume and not data:
            # Resuming needs no flags again: the run folder remembers them.
            saved_path = fs.location(out) / CONFIG_FILE
            if not saved_path.is_file():
                raise ConfigError(f"nothing to resume in {out}: no {CONFIG_FILE}; pass --data to start a run")
            saved = TrainConfig.model_validate_json(saved_path.read_text())
            cfg = _validated(TrainConfig, saved.model_dump() | given | {"out_dir": str(out)}, "training")
        else:
            if not data:
                raise ConfigError("pass --data with at least one shard folder or JSON file")
            options = {"run_name": "pretrain", **given, "data": [str(d) for d in data], "out_dir": str(out)}
            cfg = _validated(TrainConfig, options, "training")
        with _engine_log(out):
            summary = run_training(cfg, ray_address=ray_address, resume=resume)
    except (ConfigError, ValueError, StageFailed) as err:
        _fail(err)
    _print_block("pretrain summary", summary.lines())


@app.command("capfilt")
@config_options(CapFiltConfig)
def capfilt_cmd(
    data: Annotated[str, typer.Option(help="Download folder (SAMPLE shards) of the web images.")],
    out: Annotated[str, typer.Option(help="Run folder: cleaned/, candidates/, _stats/, _summary.json.")],
    captioner: Annotated[
        str | None,
        typer.Option(
            help="Captioner: capfilt model folder, BlipForConditionalGeneration folder or BLIP .pth."
        ),
    ] = None,
    filter_: Annotated[
        str | None,
        typer.Option(
            "--filter", help="Filter: capfilt model folder, BlipForImageTextRetrieval folder or BLIP .pth."
        ),
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer folder; default: the one saved with each model.")
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            help="Family of a .pth checkpoint (med-base, med-large or a MedConfig JSON); "
            "default: found from its widths. Image size comes from the weights."
        ),
    ] = None,
    human: Annotated[
        str | None, typer.Option(help="Human pairs to pass through: Karpathy-style JSON or a shards folder.")
    ] = None,
    human_images: Annotated[
        str | None, typer.Option(help="Folder the JSON's image paths are relative to. [default: its folder]")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster; default: local Ray.")
    ] = None,
    max_shards: Annotated[
        int | None, typer.Option(help="Stop after this many input shards; rerun to finish.")
    ] = None,
    config: dict[str, Any] | None = None,
) -> None:
    """Caption and filter downloaded images (BLIP's CapFilt) into cleaned shards; reruns resume.
    Every field of a recipe's `capfilt:` section is an option."""
    from capfilt.stages.capfilt.driver import run_capfilt

    try:
        cfg = _validated(CapFiltConfig, dict(config or {}), "CapFilt")
        with _engine_log(out):
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
    except (ConfigError, StageFailed) as err:
        _fail(err)
    _print_block("capfilt summary", summary.lines())


def _reselect(
    run: Annotated[Path, typer.Option(help="A run folder written by `capfilt capfilt`.")],
    threshold: Annotated[
        float | None,
        typer.Option(help="Keep a text when its ITM p(match) >= this (default: as the run had it)."),
    ] = None,
    select: Annotated[
        str | None,
        typer.Option(help="Selection policy: threshold (BLIP), top_n or best (default: as the run had it)."),
    ] = None,
    top_n: Annotated[
        int | None, typer.Option(help="With --select top_n: synthetic captions kept per image.")
    ] = None,
    calibrated: Annotated[
        bool, typer.Option(help="Use the per-source thresholds `capfilt calibrate` wrote into the run.")
    ] = False,
) -> None:
    """Re-decide a CapFilt run from its candidates table at a new threshold, selection policy or n; no model runs."""
    from capfilt.stages.capfilt.rethreshold import rethreshold as rethreshold_run

    if threshold is None and select is None and top_n is None and not calibrated:
        _fail(
            ConfigError(
                "give --threshold, --select, --top-n or --calibrated: with none there is nothing to change"
            )
        )
    try:
        summary = rethreshold_run(run, threshold, select=select, top_n=top_n, calibrated=calibrated)
    except (ConfigError, ValueError, StageFailed) as err:
        _fail(err)
    _print_block("reselect summary", summary.lines())


app.command("reselect")(_reselect)
app.command("rethreshold", help="Same as `reselect` (its older name).")(_reselect)


@app.command()
def calibrate(
    run: Annotated[
        str, typer.Option(help="A CapFilt output folder, or a `capfilt run` folder (its capfilt stage).")
    ],
    labels: Annotated[
        str,
        typer.Option(
            help="Parquet/CSV/JSONL of labelled rows: 'correct' and 'text_uid' (or 'uid' and 'text')."
        ),
    ],
    target_precision: Annotated[
        float, typer.Option(help="The precision the kept texts must reach, e.g. 0.95.")
    ],
    source: Annotated[
        list[str] | None, typer.Option(help="Text source(s) to calibrate: web, synthetic (default both).")
    ] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the intervals.")] = 1000,
) -> None:
    """Pick the ITM threshold per text source that reaches a target precision on a labelled sample,
    with bootstrap intervals; writes _calibration.json into the run for `capfilt rethreshold`."""
    from capfilt.core import fs
    from capfilt.core.layout import STAGES_DIR
    from capfilt.eval.calibrate import SOURCES, calibrate_run

    folder = fs.location(run)
    if (folder / STAGES_DIR).is_dir():
        folder = folder / "capfilt"
    try:
        result = calibrate_run(
            folder, labels, target_precision, sources=source or SOURCES, resamples=resamples
        )
    except (ConfigError, ValueError) as err:
        _fail(err)
    _print_block(
        "calibration", [c.line() for c in result.values()] + [f"written to {folder}/_calibration.json"]
    )


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
    set_: Annotated[list[str] | None, _set_option()] = None,
) -> None:
    """Check a recipe without running it: every field, every cross-stage rule and, unless
    --skip-paths, that every input file and every image the human JSONs name exists."""
    from capfilt.pipeline.recipe import load_recipe, parse_assignments

    try:
        rec = load_recipe(recipe, parse_assignments(set_), check_paths=check_paths)
    except ConfigError as err:
        _fail(err)
    unchecked = "" if check_paths else " (input paths not checked)"
    typer.echo(f"recipe {recipe} is valid{unchecked}: stages {', '.join(rec.stages)}; run folder {rec.out}")


@app.command()
def estimate(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe, e.g. pipelines/demo.yaml.")],
    sample_shards: Annotated[int, typer.Option(help="Shards the pilot downloads and cleans.")] = 2,
    out: Annotated[
        Path | None, typer.Option(help="Pilot folder. [default: the recipe's run folder + '-pilot']")
    ] = None,
    json_: Annotated[
        Path | None, typer.Option("--json", help="Also write the estimate to this file.")
    ] = None,
    cpus: Annotated[float | None, typer.Option(help="Project for a cluster of this many CPUs.")] = None,
    gpus: Annotated[float | None, typer.Option(help="Project for a cluster of this many GPUs.")] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Override the recipe's ray_address (e.g. auto); 'local': local Ray.")
    ] = None,
    set_: Annotated[list[str] | None, _set_option()] = None,
) -> None:
    """Price a job first: run the recipe's download and CapFilt on a few shards, then project the
    full input's wall time, CPU/GPU-hours and bytes on disk on the recipe's (or a given) cluster."""
    from capfilt.core.cluster import ray_running, shutdown_local_ray
    from capfilt.core.fs import write_json_atomic
    from capfilt.pipeline.estimate import default_pilot_dir, run_estimate
    from capfilt.pipeline.recipe import load_recipe, parse_assignments

    try:
        overrides = parse_assignments(set_)
        if ray_address:
            overrides["ray_address"] = None if ray_address == "local" else ray_address
        rec = load_recipe(recipe, overrides)
        pilot = out or default_pilot_dir(rec)
        ours = not ray_running()
        pilot.mkdir(parents=True, exist_ok=True)
        with _engine_log(pilot):
            try:
                est = run_estimate(rec, sample_shards, pilot, cpus=cpus, gpus=gpus)
            finally:
                if ours:
                    shutdown_local_ray()
    except (ConfigError, StageFailed) as err:
        _fail(err)
    if json_ is not None:
        write_json_atomic(json_, est.to_json())
    _print_block(f"estimate for {rec.name} from {est.sample_shards} pilot shard(s) in {pilot}", est.lines())


@app.command()
def status(
    run_dir: Annotated[
        str,
        typer.Argument(
            help="A run folder of `capfilt run` (a path or s3://...), or one stage's output folder."
        ),
    ],
    watch: Annotated[
        bool, typer.Option("--watch", help="Redraw until the run is done or failed (Ctrl-C stops watching).")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between redraws with --watch.", min=0.1)] = 2.0,
) -> None:
    """Summarise a run, finished or in progress: stages done, shards done, failures by reason.
    With --watch: redraw in place with images/s now and the ETA of each running stage."""
    from capfilt.pipeline.status import run_status

    if watch:
        _watch(run_dir, interval)
        return
    try:
        st = run_status(run_dir)
    except ConfigError as err:
        _fail(err)
    for line in st.lines():
        typer.echo(line)


def _watch(run_dir: str, interval: float) -> None:
    """Redraw the watcher's frame every ``interval`` seconds: cursor home, the frame with each line
    cleared to its end, then clear below (on a terminal; one frame after another otherwise)."""
    import shutil

    from capfilt.pipeline.status import Watcher, run_over

    watcher = Watcher(run_dir)
    tty = sys.stdout.isatty()
    interrupted = False
    home = "\x1b[H\x1b[2J"  # the first frame clears the screen; later ones overwrite it
    try:
        while True:
            try:
                st = watcher.poll()
            except ConfigError as err:
                _fail(err)
            frame = watcher.frame(interval)
            if tty:  # a line wider than the terminal would wrap and shift the next redraw
                width = shutil.get_terminal_size().columns
                frame = [line[:width] for line in frame]
                sys.stdout.write(home + "".join(f"{line}\x1b[K\n" for line in frame) + "\x1b[J")
                sys.stdout.flush()
                home = "\x1b[H"
            else:
                typer.echo("\n".join(frame) + "\n")
            if run_over(st):
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        interrupted = True
    typer.echo(watcher.final_line(interrupted))


def entry() -> None:  # pragma: no cover - for `python -m capfilt`
    sys.exit(app())
