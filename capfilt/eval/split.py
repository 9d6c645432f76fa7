"""A test split in BLIP's karpathy_test.json form: its images (decoded lazily) and reference captions.
The JSON and the images may be local or on object storage (``capfilt.core.fs``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, overload

import numpy as np

from capfilt.core import fs
from capfilt.core.errors import ConfigError
from capfilt.core.fs import Location, RemotePath
from capfilt.core.text import pre_caption

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["EvalSplit", "load_split", "load_world_test_split"]


@dataclass(frozen=True)
class EvalSplit:
    """A test split in BLIP's karpathy_test.json form: images, each with its reference captions."""

    image_paths: tuple[Location, ...]
    captions: tuple[tuple[str, ...], ...]  # the references as written, per image

    def __post_init__(self) -> None:
        if len(self.image_paths) != len(self.captions):
            raise ValueError(f"{len(self.image_paths)} images but {len(self.captions)} caption lists")
        empty = [str(p) for p, caps in zip(self.image_paths, self.captions, strict=True) if not caps]
        if empty:
            raise ValueError(f"{len(empty)} test image(s) have no caption, e.g. {empty[:3]}")

    def __len__(self) -> int:
        return len(self.image_paths)

    def texts(self, max_words: int | None = 30) -> list[str]:
        """Every reference, cleaned with pre_caption, image by image (the retrieval gallery)."""
        return [pre_caption(c, max_words) for caps in self.captions for c in caps]

    def txt2img(self) -> np.ndarray:
        """[N_txt] int64: the image of each text in ``texts()`` order."""
        return np.repeat(np.arange(len(self.captions)), [len(c) for c in self.captions]).astype(np.int64)

    def images(self) -> _LazyImages:
        """The images as a sequence that decodes on access, so a large split is never all in memory.
        Fails now if any file is missing."""
        there = fs.files_exist(self.image_paths)
        missing = [str(p) for p, ok in zip(self.image_paths, there, strict=True) if not ok]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} test image(s) not found, e.g. {missing[:3]}; check the split's image root"
            )
        return _LazyImages(self.image_paths)


class _LazyImages(Sequence["Image.Image"]):
    """Image files decoded to RGB when indexed; a slice is another lazy sequence."""

    def __init__(self, paths: Sequence[Location]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, i: int) -> Image.Image: ...
    @overload
    def __getitem__(self, i: slice) -> _LazyImages: ...
    def __getitem__(self, i: int | slice) -> Image.Image | _LazyImages:
        if isinstance(i, slice):
            return _LazyImages(self.paths[i])
        from capfilt.model.transforms import decode_image

        return decode_image(self.paths[i].read_bytes())


def load_split(
    annotation: str | Path | RemotePath, image_root: str | Path | RemotePath | None = None
) -> EvalSplit:
    """Read a karpathy_test.json-style list of ``{"image": path, "caption": [str, ...]}``; image
    paths are relative to ``image_root`` (default: the annotation file's folder)."""
    path = fs.location(annotation)
    root = fs.location(image_root) if image_root is not None else path.parent
    items = json.loads(path.read_bytes().decode("utf-8"))
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path} must hold a non-empty JSON list of {{'image', 'caption'}} objects")
    paths, captions = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item or "caption" not in item:
            raise ConfigError(f"{path}: item {i} lacks 'image' or 'caption': {str(item)[:200]}")
        caps = item["caption"]
        paths.append(root / item["image"])
        captions.append(tuple([caps] if isinstance(caps, str) else caps))
    return EvalSplit(tuple(paths), tuple(captions))


def load_world_test_split(world_root: str | Path | RemotePath) -> EvalSplit:
    """The shapes world's test split (human/karpathy_test.json, paths relative to the world root)."""
    root = fs.location(world_root)
    return load_split(root / "human" / "karpathy_test.json", root)
