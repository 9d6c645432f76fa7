"""How a model is evaluated (``EvalConfig``, BLIP's settings) without torch: the recipe imports it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["RECALL_AT", "EvalConfig"]

RECALL_AT: tuple[int, ...] = (1, 5, 10)


class EvalConfig(BaseModel):
    """How to evaluate a model on a test split. Defaults follow BLIP's evaluation, except ``k``
    (BLIP: 256 on COCO, 128 on Flickr), which suits test sets of a few hundred images."""

    model_config = ConfigDict(extra="forbid")

    retrieval: bool = True
    captioning: bool = True
    k: int = Field(16, ge=1)  # ITC candidates re-ranked by ITM, per query, in each direction
    batch_size: int = Field(64, ge=1)  # images or texts per forward pass
    itm_batch_size: int = Field(256, ge=1)  # (image, text) pairs per ITM forward pass
    max_text_length: int = Field(35, ge=2)  # tokens, [CLS] and [SEP] included (BLIP's retrieval eval)
    max_words: int = Field(30, ge=1)  # pre_caption's truncation of the test texts
    # Captioning, as BLIP's caption eval: beam search 3, at most 20 and at least 5 tokens, the
    # lengths counting [DEC] and the prompt. The prompt must be the one the model was trained with.
    prompt: str = "a picture of "
    num_beams: int = Field(3, ge=1)
    sample: bool = False
    max_length: int = Field(20, ge=2)
    min_length: int = Field(5, ge=0)
    device: str | None = None  # None: "cuda" when available, else "cpu"
    n_examples: int = Field(8, ge=0)  # generated captions kept in the results for reading

    @field_validator("k")
    @classmethod
    def _k_covers_recall(cls, v: int) -> int:
        if v < max(RECALL_AT):
            raise ValueError(
                f"k={v} re-ranks fewer candidates than R@{max(RECALL_AT)} looks at; use k >= {max(RECALL_AT)} "
                "(BLIP: 256 on COCO, 128 on Flickr)"
            )
        return v
