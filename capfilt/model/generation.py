"""Caption decoding: its settings with BLIP's defaults, stated once, and the transformers
GenerationConfig they make."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from capfilt.model.config import TextConfig

__all__ = ["SAMPLING_REPETITION_PENALTY", "Decoding", "repetition_penalty"]

# BLIP's captioner (models/blip.py generate) penalises repeats only when it samples.
SAMPLING_REPETITION_PENALTY = 1.1


def repetition_penalty(sample: bool, given: float | None = None) -> float:
    """``given``, else BLIP's value for the mode: 1.1 when sampling, 1.0 for greedy and beam search."""
    if given is not None:
        return given
    return SAMPLING_REPETITION_PENALTY if sample else 1.0


@dataclass(frozen=True)
class Decoding:
    """How captions are decoded. Defaults are BLIP's: nucleus sampling with top_p 0.9 (top_k 50 is
    what BLIP's released code ran with, via transformers' default; 0 disables it), 5 to 30 tokens
    counting [DEC] and the prompt; ``sample=False`` is greedy (num_beams 1) or beam search."""

    sample: bool = True
    top_p: float = 0.9
    top_k: int = 50
    num_beams: int = 1
    max_length: int = 30
    min_length: int = 5
    repetition_penalty: float | None = None  # None: repetition_penalty(sample)
    num_return_sequences: int = 1

    def generation_config(self, text: TextConfig, *, own_sampler: bool = False) -> GenerationConfig:
        """The GenerationConfig for MED's decoder. ``own_sampler``: a logits processor picks each
        token (CapFilt's seeded sampler), so generate runs greedy and only takes its pick; the
        sampling settings are that processor's, and the penalty is still the sampling one."""
        from transformers import GenerationConfig

        penalty = repetition_penalty(self.sample, self.repetition_penalty)
        ids = {"bos_token_id": text.dec_token_id, "eos_token_id": text.sep_token_id}
        ids["pad_token_id"] = text.pad_token_id
        if own_sampler:
            return GenerationConfig(
                max_length=self.max_length,
                min_length=self.min_length,
                do_sample=False,
                num_beams=1,
                repetition_penalty=penalty,
                **ids,
            )
        return GenerationConfig(
            max_length=self.max_length,
            min_length=self.min_length,
            do_sample=self.sample,
            top_p=self.top_p if self.sample else None,
            top_k=self.top_k if self.sample else None,
            num_beams=self.num_beams,
            repetition_penalty=penalty,
            num_return_sequences=self.num_return_sequences,
            **ids,
        )
