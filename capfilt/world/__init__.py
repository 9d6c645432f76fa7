"""The shapes world: a seeded synthetic dataset whose ground truth measures how well cleaning works."""

from capfilt.world.captions import near_miss, true_captions, weak_or_spam
from capfilt.world.checker import CheckResult, Mention, StatedRelation, check_caption, explain_caption
from capfilt.world.make import (
    BAD_KINDS,
    CAPTION_KINDS,
    EXPECT,
    FAIL_KINDS,
    LABELS,
    NOISE_LABELS,
    World,
    WorldConfig,
    WorldInfo,
    load_world,
    make_world,
)
from capfilt.world.render import render
from capfilt.world.scene import COLOURS, MARGIN, SHAPES, SIZES, Obj, Scene, holds, sample_scene
from capfilt.world.server import WorldServer, write_url_list

__all__ = [
    "BAD_KINDS",
    "CAPTION_KINDS",
    "COLOURS",
    "EXPECT",
    "FAIL_KINDS",
    "LABELS",
    "MARGIN",
    "NOISE_LABELS",
    "SHAPES",
    "SIZES",
    "CheckResult",
    "Mention",
    "Obj",
    "Scene",
    "StatedRelation",
    "World",
    "WorldConfig",
    "WorldInfo",
    "WorldServer",
    "check_caption",
    "explain_caption",
    "holds",
    "load_world",
    "make_world",
    "near_miss",
    "render",
    "sample_scene",
    "true_captions",
    "weak_or_spam",
    "write_url_list",
]
