"""Images for the models: bytes decoded to uint8 pixels on CPU tasks (one reason per bad row), normalised on the model's device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from capfilt.core import schema as S
from capfilt.stages.capfilt.decisions import REASON_UNDECODABLE

if TYPE_CHECKING:
    import torch

    from capfilt.model.med import Med


def pixel_column(image_size: int) -> str:
    return f"pixels_{image_size}"


def preprocess_batch(batch: dict[str, Any], image_sizes: Sequence[int]) -> dict[str, Any]:
    """Decode each image and resize it (bicubic) to every size in ``image_sizes``.

    Returns ``uid``, ``text``, ``row``, ``error`` ("" or why the image did not decode) and one
    uint8 column ``pixels_<S>`` [N, S, S, 3] per size; the pixels of a failed row are zeros. Rows
    with a ``status`` other than success are not images and are left out. Pixels stay uint8 so the
    object store carries a quarter of the float bytes; ``pixel_values`` normalises them exactly as
    ``capfilt.model.transforms.test_transform``.
    """
    from PIL import Image

    from capfilt.model.transforms import decode_image

    n = len(batch["uid"])
    keep = [i for i in range(n) if "status" not in batch or batch["status"][i] == S.SUCCESS]
    out: dict[str, Any] = {
        "uid": np.asarray([batch["uid"][i] for i in keep], dtype=object),
        "text": np.asarray([batch["text"][i] for i in keep], dtype=object),
        "row": np.asarray([batch["row"][i] for i in keep] if "row" in batch else keep, dtype=np.int64),
    }
    errors: list[str | None] = []
    pixels = {s: np.zeros((len(keep), s, s, 3), dtype=np.uint8) for s in image_sizes}
    for j, i in enumerate(keep):
        try:
            image = decode_image(batch["image"][i])
            for s in image_sizes:
                pixels[s][j] = np.asarray(image.resize((s, s), Image.Resampling.BICUBIC))
        except Exception as err:  # any undecodable row becomes a reason, never a crashed batch
            errors.append(f"{REASON_UNDECODABLE}: {err}".splitlines()[0][:300])
            continue
        errors.append("")  # not None: a column of nulls does not survive Ray's conversions
    out["error"] = np.asarray(errors, dtype=object)
    for s in image_sizes:
        out[pixel_column(s)] = pixels[s]
    return out


def pixel_values(pixels: np.ndarray, device: Any = "cpu", dtype: Any = None) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> normalised float [N, 3, S, S] (ToTensor + CLIP Normalize)."""
    import torch

    from capfilt.model.transforms import CLIP_MEAN, CLIP_STD

    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)  # [N, S, S, 3] uint8
    x = x.permute(0, 3, 1, 2).float().div_(255.0)  # [N, 3, S, S] in [0, 1]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.to(dtype) if dtype is not None else x


def device_dtype(med: Med) -> tuple[torch.device, torch.dtype]:
    p = next(med.parameters())
    return p.device, p.dtype


def str_or_none(value: Any) -> str | None:
    """A string cell as str or None: Ray may hand an all-null object column back as NaN floats."""
    return value if isinstance(value, str) else None


def error_column(batch: dict[str, Any], n: int) -> list[str | None]:
    """The ``error`` column with "" (no error) as None."""
    return [str_or_none(e) or None for e in batch["error"]] if "error" in batch else [None] * n
