"""COCO-Karpathy annotation files (BLIP's human-annotated pairs): reading them, and checking that
every image they name is where the recipe says, before any work starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from capfilt.core.errors import ConfigError


def read_entries(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a Karpathy JSON: a list of ``{"image": relative path, "caption": str or
    [str, ...], ...}``; ConfigError naming the file when it is anything else."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read COCO-Karpathy JSON {path}: {err}") from err
    if not isinstance(entries, list) or any(
        not isinstance(e, dict) or "image" not in e or "caption" not in e for e in entries
    ):
        raise ConfigError(f"{path} is not a COCO-Karpathy list of {{'image', 'caption', 'image_id'}} entries")
    return entries


def missing_images(path: str | Path, root: str | Path, examples: int = 3) -> tuple[int, int, list[Path]]:
    """(images named, images missing, a few missing paths) of the Karpathy JSON at `path`, whose
    image paths are relative to `root`. Every distinct image is checked: a stat per image, about a
    second for COCO's 123k on a local disk."""
    root = Path(root)
    images = list(dict.fromkeys(str(e["image"]) for e in read_entries(path)))
    missing = [root / p for p in images if not (root / p).is_file()]
    return len(images), len(missing), missing[:examples]
