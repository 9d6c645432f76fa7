"""The `capfilt` command line: thin wrappers over the library, each ending in a short summary."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from capfilt.errors import ConfigError, StageFailed

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="capfilt: clean and bootstrap image-text datasets with BLIP's CapFilt, on Ray.",
)
world_app = typer.Typer(no_args_is_help=True, help="The synthetic shapes world: make it, serve it.")
app.add_typer(world_app, name="world")

log = logging.getLogger("capfilt")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
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
) -> None:
    """Download a URL list with img2dataset on Ray into Parquet shards, one row per input row."""
    from capfilt.download import DownloadConfig, run_download

    try:
        cfg = DownloadConfig(
            image_size=image_size,
            shard_size=shard_size,
            thread_count=thread_count,
            timeout=timeout,
            retries=retries,
            source=source,
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
) -> None:
    """Run the stages a recipe names, skipping work already done."""
    from capfilt.pipeline import run_recipe
    from capfilt.recipe import load_recipe

    t0 = time.time()
    try:
        rec = load_recipe(recipe, {"out": str(out)} if out else None)
        result = run_recipe(rec)
    except (ConfigError, StageFailed) as err:
        _fail(err)
    if result.world:
        counts = result.world.get("counts", {})
        _print_block("world", [f"{k}: {v}" for k, v in counts.items()] or [str(result.out / "world")])
    if result.download:
        _print_block("download", result.download.lines())
    typer.echo(f"\nrun {rec.name} finished in {time.time() - t0:.1f} s; outputs in {result.out}")


@app.command()
def validate(recipe: Annotated[Path, typer.Argument(help="A YAML recipe.")]) -> None:
    """Check a recipe without running it."""
    from capfilt.recipe import load_recipe

    try:
        rec = load_recipe(recipe)
    except ConfigError as err:
        _fail(err)
    typer.echo(f"recipe {recipe} is valid: stages {', '.join(rec.stages)}; run folder {rec.out}")


def entry() -> None:  # pragma: no cover - for `python -m capfilt`
    sys.exit(app())
