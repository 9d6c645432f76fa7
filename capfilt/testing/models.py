"""The one tiny model fixture: a WordPiece tokenizer of TINY_VOCAB words and a random med-tiny."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from capfilt.model.med import Med

__all__ = ["TINY_VOCAB", "center_itm", "one_torch_thread", "tiny_med", "tiny_models", "tiny_tokenizer"]

# Every tiny tokenizer the tests and benchmarks train has this many words at most.
TINY_VOCAB = 300
# Pairs the ITM head is centred on (center_itm): enough for a stable median, quick to score.
CENTER_PAIRS = 32


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the block: tiny models run faster so, and a busy 2-core machine
    crawls with two; one thread also makes CPU kernels bitwise deterministic."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_tokenizer(captions: Iterable[str], out_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """A WordPiece tokenizer trained on ``captions`` (cleaned with pre_caption first), saved to
    ``out_dir`` when given."""
    from capfilt.core.text import pre_caption
    from capfilt.model.tokenizer import train_wordpiece

    return train_wordpiece([pre_caption(c) for c in captions], vocab_size=TINY_VOCAB, out_dir=out_dir)


def tiny_med(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> Med:
    """A random med-tiny (weights seeded by ``seed``) sized for ``tokenizer``, in eval mode."""
    import torch

    from capfilt.model import create_med, get_config
    from capfilt.model.tokenizer import TokenIds

    cfg = get_config("med-tiny").with_token_ids(TokenIds.from_tokenizer(tokenizer))
    torch.manual_seed(seed)
    return create_med(cfg).eval()


def center_itm(med: Med, tokenizer: PreTrainedTokenizerBase, world: Path) -> None:
    """Shift the random ITM head so the world's median good pair (of its first CENTER_PAIRS)
    scores 0.5: a random model's scores differ only in the third decimal, and a filter needs keeps
    and drops."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from capfilt.stages.capfilt.config import CapFiltConfig
    from capfilt.stages.capfilt.pixels import preprocess_batch
    from capfilt.stages.capfilt.score import score_batch

    labels = pq.read_table(world / "web_labels.parquet").to_pylist()
    good = [r for r in labels if r["expect"] == "success" and r["bad_kind"] is None][:CENTER_PAIRS]
    raw = {
        "uid": np.asarray([str(i) for i in range(len(good))], dtype=object),
        "text": np.asarray([r["caption"] for r in good], dtype=object),
        "image": np.asarray([(world / r["path"]).read_bytes() for r in good], dtype=object),
    }
    batch = preprocess_batch(raw, [64])
    scores = score_batch(med, tokenizer, batch, CapFiltConfig()).column("itm_score").to_numpy()
    with torch.no_grad():
        med.itm_head.bias[1] -= float(np.nanmedian(np.log(scores / (1 - scores))))


def tiny_models(world: Path, root: Path, center: bool = True) -> dict[str, Path]:
    """A tokenizer trained on the world's web captions and a random med-tiny (ITM centred on the
    world unless ``center`` is False), exported under ``root`` as a transformers captioner and
    filter, the tokenizer beside each: ``{"captioner": dir, "filter": dir}``."""
    import pyarrow.parquet as pq

    from capfilt.model.hf import export_captioner, export_filter

    tok = tiny_tokenizer(pq.read_table(world / "web.parquet").column("caption").to_pylist())
    med = tiny_med(tok)
    if center:
        center_itm(med, tok, world)
    return {
        "captioner": export_captioner(med, root / "captioner", tok),
        "filter": export_filter(med, root / "filter", tok),
    }
