"""Text tokenizers for MED: any local transformers tokenizer plus BLIP's [DEC]/[ENC], or a trained WordPiece."""

from __future__ import annotations

import inspect
import json
import logging
import string
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from capfilt.core import fs
from capfilt.core.errors import ConfigError
from capfilt.core.fs import Location, RemotePath

__all__ = [
    "DEC_TOKEN",
    "ENC_TOKEN",
    "TOKENIZER_FILES",
    "TokenIds",
    "add_blip_special_tokens",
    "find_tokenizer",
    "is_tokenizer_dir",
    "load_tokenizer",
    "tokenize",
    "train_wordpiece",
]

logger = logging.getLogger(__name__)

DEC_TOKEN = "[DEC]"  # first token of the image-grounded decoder (LM); BLIP registers it as bos
ENC_TOKEN = "[ENC]"  # first token of the image-grounded encoder (ITM)
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in a trained vocab
# Every single character of these is in a trained vocab, and letters/digits also as "##x"
# continuations, so any ASCII word tokenizes without [UNK] even if the corpus never had it.
_ALPHABET = string.ascii_lowercase + string.digits
_INITIAL_ALPHABET = _ALPHABET + string.punctuation


@dataclass(frozen=True)
class TokenIds:
    """The token ids MED needs, read once from a tokenizer.

    ``vocab_size`` is ``len(tokenizer)`` (added tokens included): size the text embeddings with it,
    not with ``tokenizer.vocab_size``, which leaves out [DEC] and [ENC] when they were added.
    """

    pad: int
    bos: int  # [DEC]
    enc: int  # [ENC]
    sep: int  # end of text; the decoder's eos
    cls: int
    vocab_size: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> TokenIds:
        ids = {
            "pad": tokenizer.pad_token_id,
            "bos": tokenizer.bos_token_id,
            "enc": _special_id(tokenizer, ENC_TOKEN),
            "sep": tokenizer.sep_token_id,
            "cls": tokenizer.cls_token_id,
        }
        missing = sorted(name for name, value in ids.items() if value is None)
        if missing:
            raise ValueError(
                f"tokenizer has no {', '.join(missing)} token id; MED needs pad, cls and sep "
                "(a BERT-style tokenizer) and [DEC]/[ENC]: load it with capfilt.model.tokenizer.load_tokenizer"
            )
        if tokenizer.bos_token != DEC_TOKEN:
            raise ValueError(
                f"tokenizer's bos_token is {tokenizer.bos_token!r}, BLIP uses {DEC_TOKEN!r}; "
                "call capfilt.model.tokenizer.add_blip_special_tokens(tokenizer) first"
            )
        return cls(vocab_size=len(tokenizer), **ids)


def _special_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    if token not in tokenizer.all_special_tokens:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id if isinstance(token_id, int) else None


def add_blip_special_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add BLIP's tokens in place, as BLIP's ``init_tokenizer`` does; a no-op when already there.

    ``[DEC]`` becomes the bos token and ``[ENC]`` an additional special token; other additional
    special tokens the tokenizer already has are kept. New tokens get ids after the existing ones
    (bert-base-uncased: [DEC]=30522, [ENC]=30523).
    """
    if tokenizer.bos_token != DEC_TOKEN:
        if tokenizer.bos_token is not None:
            logger.warning("replacing bos_token %r with %r, as BLIP does", tokenizer.bos_token, DEC_TOKEN)
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    if ENC_TOKEN not in tokenizer.all_special_tokens:
        # transformers 5 renamed "additional" special tokens to "extra"; the dict key is still
        # accepted by both, the keep-the-others flag is not, so pick its name from the signature.
        params = inspect.signature(tokenizer.add_special_tokens).parameters
        keep = next(
            (
                {name: False}
                for name in ("replace_extra_special_tokens", "replace_additional_special_tokens")
                if name in params
            ),
            {},
        )
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]}, **keep)
    return tokenizer


# Any of these files makes a folder a saved tokenizer (save_pretrained, or a bare BERT vocab).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt")


def is_tokenizer_dir(path: str | Path | RemotePath) -> bool:
    """Whether ``path`` (a local path or a URI) is a folder holding a saved tokenizer."""
    loc = fs.location(path)
    return loc.is_dir() and any((loc / f).is_file() for f in TOKENIZER_FILES)


def find_tokenizer(
    model_path: str | Path | RemotePath, override: str | Path | RemotePath | None = None
) -> Location:
    """The tokenizer saved with a model: the model folder itself, ``tokenizer/`` inside it, or
    ``tokenizer/`` next to it; ``override`` wins. Local paths or URIs; a URI is looked up where
    it is (``load_tokenizer`` copies it)."""
    path = fs.location(model_path)
    base = path if path.is_dir() else path.parent
    candidates = (
        [fs.location(override)] if override else [base, base / "tokenizer", base.parent / "tokenizer"]
    )
    for c in candidates:
        if is_tokenizer_dir(c):
            return c
    raise ConfigError(
        f"no tokenizer for {path} (looked in {', '.join(str(c) for c in candidates)}); "
        "pass --tokenizer DIR (a folder written by save_pretrained)"
    )


def load_tokenizer(path_or_dir: str | Path | RemotePath) -> PreTrainedTokenizerBase:
    """Load a transformers tokenizer directory (never the hub) and add [DEC]/[ENC] if missing.

    Works for a saved bert-base-uncased as for a directory written by :func:`train_wordpiece`; a
    URI is copied to the local cache first (``capfilt.core.fs.local_copy``).
    """
    given = fs.location(path_or_dir)
    if not given.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {given} does not exist; pass a directory written by "
            "save_pretrained (e.g. a saved bert-base-uncased) or by capfilt.model.tokenizer.train_wordpiece"
        )
    path = fs.local_copy(given)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {path} does not exist; pass a local directory written by "
            "save_pretrained (e.g. a saved bert-base-uncased) or by capfilt.model.tokenizer.train_wordpiece"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    add_blip_special_tokens(tokenizer)
    TokenIds.from_tokenizer(tokenizer)  # fail now, not mid-training, if pad/cls/sep are missing
    return tokenizer


def train_wordpiece(
    texts: Iterable[str],
    vocab_size: int = 1000,
    out_dir: str | Path | None = None,
    min_frequency: int = 1,
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """Train a lowercase BERT-style WordPiece tokenizer on ``texts`` and add [DEC]/[ENC].

    Ids: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then the learnt vocabulary, then [DEC] and
    [ENC] as the last two ids. ``vocab_size`` is an upper bound: a small corpus stops earlier, so
    size embeddings with ``TokenIds.from_tokenizer(tok).vocab_size``. Pass captions already cleaned
    with :func:`capfilt.core.text.pre_caption` so the vocabulary matches what the model will see.
    The result is a ``BertTokenizerFast`` (``[CLS] text [SEP]``, padding, truncation, attention
    masks) that ``save_pretrained`` writes to ``out_dir`` when given, loadable by
    :func:`load_tokenizer` or by plain ``AutoTokenizer.from_pretrained``.

    Not reproducible across calls: the ``tokenizers`` trainer breaks ties between equally frequent
    merges in hash order, so two trainings on the same texts can learn different subwords and ids.
    Train once, save beside the model, and load that directory everywhere else (workers, resume).
    """
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(BERT_SPECIAL_TOKENS),
        initial_alphabet=list(_INITIAL_ALPHABET),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    learnt = backend.get_vocab()
    vocab = sorted(learnt, key=learnt.__getitem__)
    vocab += [f"##{c}" for c in _ALPHABET if f"##{c}" not in learnt]
    assert vocab[: len(BERT_SPECIAL_TOKENS)] == list(BERT_SPECIAL_TOKENS), vocab[:5]

    # Rebuild through BERT's own vocab.txt loader, so the result is a fast BertTokenizer that
    # transformers' BlipProcessor accepts and that loads the same way in transformers 4 and 5.
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": model_max_length}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        tokenizer = AutoTokenizer.from_pretrained(tmp, use_fast=True, local_files_only=True)
    assert isinstance(tokenizer, PreTrainedTokenizerFast), type(tokenizer)
    add_blip_special_tokens(tokenizer)
    logger.info("trained WordPiece tokenizer: %d tokens (asked for at most %d)", len(tokenizer), vocab_size)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
        logger.info("saved tokenizer to %s", out_dir)
    return tokenizer


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenize a batch as ``[CLS] text [SEP]``, truncated to ``max_length`` and padded to the longest.

    Returns ``input_ids`` and ``attention_mask``, both int64 of shape (batch, length); no
    ``token_type_ids`` (MED has no token-type embeddings). Callers swap the first token for
    [ENC] (ITM) or [DEC] (LM) themselves, as BLIP does.
    """
    if isinstance(texts, str):
        raise TypeError("tokenize expects a sequence of texts, got one str; wrap it in a list")
    encoded = tokenizer(
        list(texts),
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_token_type_ids=False,
        return_tensors="pt",
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
