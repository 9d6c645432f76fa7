"""What CapFilt decides about a text: keep or drop, BLIP's threshold rule, the reasons it records, and
the files a shard's decisions go to."""

from __future__ import annotations

from typing import TYPE_CHECKING

from capfilt.core.layout import CANDIDATES_DIR, CAPTIONS_DIR, CLEANED_DIR, STATS_DIR

if TYPE_CHECKING:
    from capfilt.core.fs import Location

KEEP, DROP = "keep", "drop"
# Reasons are categories; only "image not decodable" and "image file missing" carry a detail, after ": ".
REASON_BELOW = "itm below threshold"
REASON_EMPTY = "empty text"
REASON_UNDECODABLE = "image not decodable"
REASON_NO_FILTER = "unscored (no filter)"
REASON_HUMAN = "human pair (kept unscored)"
REASON_MISSING = "image file missing"


def decide(itm: float, threshold: float) -> tuple[str, str | None]:
    """BLIP's rule: keep a text when the filter's p(match) >= threshold."""
    return (KEEP, None) if itm >= threshold else (DROP, REASON_BELOW)


def reason_key(reason: str) -> str:
    """A reason as counted: the detail after ": " (which image error) is left out."""
    return reason.split(": ", 1)[0]


def kept_dir(filtered: bool) -> str:
    """The folder of a web shard's kept texts: ``cleaned/`` holds only what a filter kept, so a
    caption-only run (no filter) writes its unscored texts to ``captions/`` instead. Human pairs
    always go to ``cleaned/``: they are human truth, kept without a score."""
    return CLEANED_DIR if filtered else CAPTIONS_DIR


def shard_paths(out: Location, name: str, kept: str = CLEANED_DIR) -> tuple[Location, Location, Location]:
    """Shard ``name``'s files in run folder ``out``: every candidate, the kept texts (in folder
    ``kept``, see ``kept_dir``), and the stats (written last: they mark the shard done)."""
    return (
        out / CANDIDATES_DIR / f"{name}.parquet",
        out / kept / f"{name}.parquet",
        out / STATS_DIR / f"{name}.json",
    )
