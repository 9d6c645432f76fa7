"""COCO-Karpathy annotation files (BLIP's human-annotated pairs): reading them, and checking that
every image they name is where the recipe says, before any work starts."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

from capfilt.core import fs
from capfilt.core.errors import ConfigError
from capfilt.core.fs import Location, RemotePath


def read_entries(path: str | Path | RemotePath) -> list[dict[str, Any]]:
    """The entries of a Karpathy JSON (a local path or a URI): a list of ``{"image": relative
    path, "caption": str or [str, ...], ...}``; ConfigError naming the file when it is anything else."""
    path = fs.location(path)
    try:
        entries = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read COCO-Karpathy JSON {path}: {err}") from err
    if not isinstance(entries, list) or any(
        not isinstance(e, dict) or "image" not in e or "caption" not in e for e in entries
    ):
        raise ConfigError(f"{path} is not a COCO-Karpathy list of {{'image', 'caption', 'image_id'}} entries")
    return entries


def missing_images(
    path: str | Path | RemotePath, root: str | Path | RemotePath, examples: int = 3
) -> tuple[int, int, list[Location]]:
    """(images named, images missing, a few missing paths) of the Karpathy JSON at `path`, whose
    image paths are relative to `root`. Every distinct image is checked: a stat per image on a
    local disk (about a second for COCO's 123k), one recursive listing of `root` on object storage
    (a request per 1,000 keys, not one per image)."""
    base: Location = fs.location(root)
    images = list(dict.fromkeys(str(e["image"]) for e in read_entries(path)))
    if isinstance(base, RemotePath):
        have = {str(p)[len(str(base)) + 1 :] for p in base.glob("**/*")}
        missing: list[Location] = [base / p for p in images if posixpath.normpath(p) not in have]
    else:
        missing = [base / p for p in images if not (base / p).is_file()]
    return len(images), len(missing), missing[:examples]
