"""CapFilt's options (``CapFiltConfig``): light, so `capfilt status` and recipes import it without torch or Ray."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from capfilt.eval.dedup import DEFAULT_MIN_COSINE

STAGE = "capfilt"  # the stage's name in manifests and stats


class CapFiltConfig(BaseModel):
    """Options of the CapFilt stage. Defaults are BLIP's: nucleus sampling top_p 0.9, one caption
    per image, keep p(match) >= 0.5."""

    model_config = ConfigDict(extra="forbid")

    # Captioner: what the captions are.
    k: int = Field(1, ge=1, le=64)  # synthetic captions per image; BLIP used 1
    sample: bool = True  # nucleus sampling; False: beam search (num_beams > 1) or greedy
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(50, ge=0)  # what BLIP's released code ran with (transformers' default); 0: off
    num_beams: int = Field(1, ge=1)
    min_length: int = Field(5, ge=0)  # tokens, counting [DEC] and the prompt, as in BLIP
    max_length: int = Field(30, ge=2)
    # None: BLIP's value for the mode (capfilt.model.generation.repetition_penalty: 1.1 when sampling)
    repetition_penalty: float | None = Field(None, gt=0)
    prompt: str = "a picture of "  # fed to the decoder, stripped from the stored caption
    seed: int = 0
    # Filter: how texts are scored and decided.
    threshold: float = Field(0.5, ge=0, le=1)
    # Per text source ("web", "synthetic"), overriding `threshold`: what `capfilt calibrate` picks.
    thresholds: dict[str, float] = Field(default_factory=dict)
    # Which of an image's texts are kept (capfilt.stages.capfilt.select): BLIP's "threshold", the
    # `top_n` best synthetic captions, or the single "best" text; each must reach its threshold.
    select: Literal["threshold", "top_n", "best"] = "threshold"
    top_n: int = Field(1, ge=1)
    max_words: int = Field(30, ge=1)  # pre_caption before scoring; the stored text is the original
    max_text_tokens: int = Field(35, ge=4)  # BLIP's retrieval length
    # Outputs.
    images: Literal["include", "reference"] = "include"
    round: int = Field(1, ge=0)
    human_shard_size: int = Field(10_000, ge=1)
    # "auto": bfloat16 on a GPU that has it (else float16), float32 on CPU (models.inference_dtype)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Execution: none of these changes a single output row (beyond the last float bits).
    # Images per model call, both models. Left unset, a GPU run sizes it (and the actor counts,
    # where those are unset too) from GPU memory: sizing.auto_batch; 32 is the CPU value.
    batch_size: int = Field(32, ge=1)
    attention: Literal["sdpa", "eager"] = "sdpa"  # PyTorch's fused kernel, or transformers' BLIP code
    compile: bool = False  # torch.compile the ViT of both models (benchmarks/realsize.py measures it)
    captioner_actors: int = Field(1, ge=1)
    filter_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(0.5, gt=0)  # fractional, so a 2-core machine keeps CPUs for reading
    gpus_per_actor: float | None = Field(None, ge=0)  # None: one GPU each if the cluster has enough
    # Read + decode tasks. Not the actors' value: Ray fuses map steps with equal resources, and
    # decoding inside a model actor would leave its model idle meanwhile.
    preprocess_cpus: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(None, ge=1)  # None: what Ray gives the worker
    # Dedup before captioning (capfilt.stages.capfilt.dedup_before): embed every image with the
    # filter's ViT + vision_proj first, and neither caption nor score the exact duplicates (same
    # sha256) and near duplicates (cosine >= dedup_min_cosine) of an earlier image; they go to
    # removed/ with the uid they duplicate. Needs a filter.
    dedup_before: bool = False
    dedup_min_cosine: float = Field(DEFAULT_MIN_COSINE, ge=-1, le=1)

    @model_validator(mode="after")
    def _check(self) -> CapFiltConfig:
        if self.sample and self.num_beams > 1:
            raise ValueError(
                f"num_beams {self.num_beams} with sampling: beam search is deterministic decoding; "
                "set sample=False (CLI: --beam N) or num_beams=1"
            )
        if not self.sample and self.k > self.num_beams:
            raise ValueError(
                f"k={self.k} captions per image need at least {self.k} beams without sampling "
                f"(got num_beams {self.num_beams}); raise --beam or lower --k"
            )
        bad = {k: v for k, v in self.thresholds.items() if k not in ("web", "synthetic") or not 0 <= v <= 1}
        if bad:
            raise ValueError(f"thresholds {bad}: give text sources web/synthetic, each in [0, 1]")
        if self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} exceeds max_length {self.max_length}")
        return self

    def output_settings(self) -> dict[str, Any]:
        """The fields that decide what the output rows are; a resumed run must match them."""
        execution = {
            "batch_size",
            "attention",
            "compile",
            "captioner_actors",
            "filter_actors",
            "cpus_per_actor",
            "gpus_per_actor",
            "preprocess_cpus",
            "torch_threads",
            "human_shard_size",
        }
        return {k: v for k, v in self.model_dump().items() if k not in execution}
