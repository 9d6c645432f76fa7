"""Names of the files and folders a run writes: the one place every stage, `capfilt status` and the
report read them from. Imports nothing heavy, so any reader of a run folder can use it.

Files and folders whose names start with "_" are skipped by pyarrow, Ray Data and pandas when they
read a folder of Parquet shards, so bookkeeping lives there and the shards stay readable.
"""

from __future__ import annotations

# A run folder (`capfilt run`): one sub-folder per stage, named after the stage.
STAGES_DIR = "_stages"  # _stages/<stage>.json: each stage's manifest (running, then done)
RUN_FILE = "_run.json"  # the recipe's name and stage list, written at start
LOG_FILE = "_run.log"  # everything logged, Ray's own chatter included

# A sharded stage folder (download, CapFilt).
STATS_DIR = "_stats"  # _stats/NNNNN.json, written last: the shard is done
INPUTS_DIR = "_inputs"
TMP_DIR = "_tmp"
MANIFEST = "_manifest.json"
SUMMARY = "_summary.json"

# CapFilt's outputs.
CLEANED_DIR = "cleaned"  # texts a filter kept, one row per (image, text), in the CLEANED schema
CANDIDATES_DIR = "candidates"  # every text considered, with its scores, decision and reason
CAPTIONS_DIR = "captions"  # a caption-only run (no filter): every synthetic caption, unscored
CALIBRATION = "_calibration.json"  # thresholds per text source from a labelled sample (`capfilt calibrate`)
EMBEDDINGS_DIR = "embeddings"  # EMBEDDING: each image's filter embedding, per shard (what dedup reads)
REMOVED_DIR = "removed"  # REMOVED: rows a dedup took out (dedup stage, or CapFilt's dedup_before)
DEDUP_BEFORE = "_dedup_before.parquet"  # CapFilt's dedup_before plan: the images it skips, and why
PARTS_DIR = "_parts"  # _parts/NNNNN/*.parquet: a shard's candidate rows, chunk by chunk, until it is written

# A training folder.
TRAIN_CONFIG = "train_config.json"
TRAIN_SUMMARY = "train_summary.json"
