"""Image decoding and the train/test image transforms (BLIP's crop, RandAugment, CLIP normalisation)."""

from __future__ import annotations

from collections.abc import Sequence

from timm.data.auto_augment import NAME_TO_OP, RandAugment, rand_augment_ops
from torchvision import transforms as T

# Decoding lives in a module without torch, for the download workers; it is re-exported here.
from capfilt.io.imagedecode import decode_image

__all__ = [
    "BLIP_RANDAUGMENT_OPS",
    "CAPTION_SAFE_RANDAUGMENT_OPS",
    "CLIP_MEAN",
    "CLIP_STD",
    "decode_image",
    "test_transform",
    "train_transform",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Default RandAugment ops (timm names). A caption states facts the augmentation must not make false:
# - no colour-changing ops: Solarize, Posterize, Invert and Color change colour words ("a red
#   circle" could become cyan or grey); AutoContrast and Equalize work per RGB channel and so
#   shift hue too;
# - no ShearX/ShearY: they turn circles into ellipses and squares into parallelograms;
# - no Rotate/Translate: rotation can swap "left of"/"above" for pairs near a diagonal or a
#   vertical, and translation (up to 22% at magnitude 5) can push an object out of the frame,
#   which RandomResizedCrop (min_scale) already risks enough.
# What remains changes lightness, contrast and sharpness but keeps hue and geometry. The
# "Increasing" variants scale by 1 +- 0.09 * magnitude with a random sign; timm's plain
# Brightness/Contrast/Sharpness are the identity at magnitude 5, so they would do nothing here.
# At large magnitudes even these can blur white/grey/black; keep the magnitude modest.
CAPTION_SAFE_RANDAUGMENT_OPS: tuple[str, ...] = (
    "BrightnessIncreasing",
    "ContrastIncreasing",
    "SharpnessIncreasing",
)
# BLIP's own RandomAugment list in timm names (BLIP also has Identity, which timm lacks): for
# reproducing the paper on web captions, which seldom hinge on colour or left/right.
BLIP_RANDAUGMENT_OPS: tuple[str, ...] = (
    "AutoContrast",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "Equalize",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
    "Rotate",
)


def train_transform(
    image_size: int,
    min_scale: float = 0.5,
    randaugment: bool = True,
    ops: int = 2,
    magnitude: float = 5,
    hflip: bool = False,
    augment_ops: Sequence[str] = CAPTION_SAFE_RANDAUGMENT_OPS,
) -> T.Compose:
    """RGB PIL image -> normalised float tensor (3, image_size, image_size) with training augmentation.

    RandomResizedCrop(scale=(min_scale, 1), bicubic), optional horizontal flip, RandAugment
    (``ops`` ops per image from ``augment_ops``, each applied with probability 0.5), ToTensor, CLIP
    normalisation. BLIP pretrains with min_scale 0.2 and fine-tunes with 0.5.

    ``hflip`` defaults to False: flipping mirrors the image but not the caption, so "a circle left of
    a square" becomes false. BLIP flipped because web captions rarely rely on left/right; turn it
    on only for data like that. ``augment_ops`` defaults to ops that keep colour and geometry (see
    ``CAPTION_SAFE_RANDAUGMENT_OPS``); pass ``BLIP_RANDAUGMENT_OPS`` for the paper's set.
    """
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    unknown = [name for name in augment_ops if name not in NAME_TO_OP]
    if unknown:
        raise ValueError(f"Unknown RandAugment op(s) {unknown}; choose from timm's {sorted(NAME_TO_OP)}")
    steps: list[object] = [
        T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if randaugment and ops > 0:
        # If geometric ops are chosen (rotate, shear, translate), uncovered pixels get the mean colour.
        hparams = {"img_mean": tuple(round(255 * m) for m in CLIP_MEAN)}
        ra_ops = rand_augment_ops(
            magnitude=magnitude, prob=0.5, hparams=hparams, transforms=list(augment_ops)
        )
        steps.append(RandAugment(ra_ops, num_layers=ops))
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(steps)


def test_transform(image_size: int) -> T.Compose:
    """RGB PIL image -> normalised float tensor (3, image_size, image_size); deterministic (bicubic resize)."""
    return T.Compose(
        [
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


# The name is the one the rest of capfilt uses; this keeps pytest from collecting it as a test
# when a test module imports it.
test_transform.__test__ = False  # type: ignore[attr-defined]
