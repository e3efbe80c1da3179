"""Tokenizers: train a byte-level BPE, and load any local Hugging Face tokenizer for megatron-core.

`QSparseTokenizer` is the small interface megatron-core's `GPTDataset` reads (`vocab_size`, `eod`, `pad`) plus
`tokenize`/`detokenize` for preprocessing and checks. A document's own text never produces the end-of-document
id: special-token strings inside a document (say, the literal text "<|endoftext|>") are encoded as plain text,
so the only `eod` in a preprocessed corpus is the one appended after each document.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from megatron_qsparse.atomic import atomic_directory
from megatron_qsparse.data.readers import iter_document_texts, offline_hugging_face

END_OF_TEXT = "<|endoftext|>"
# What save_pretrained writes for one kind of tokenizer or another; a directory with none of them is not one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# 256 byte symbols plus <|endoftext|>: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB_SIZE = 257


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be loaded, or a training request that cannot be met."""


class QSparseTokenizer:
    """megatron-core's view of a Hugging Face tokenizer."""

    def __init__(self, hf_tokenizer: Any, path: Path) -> None:
        self._hf = hf_tokenizer
        self._eod = _end_of_document_id(hf_tokenizer, path)

    @property
    def hf(self) -> Any:
        """The underlying Hugging Face tokenizer."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included."""
        return len(self._hf)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        pad = self._hf.pad_token_id
        return self._eod if pad is None else pad

    def tokenize(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False, split_special_tokens=True)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`tokenize` over many texts in one call (the backend's batch path)."""
        encoded = self._hf(list(texts), add_special_tokens=False, split_special_tokens=True, verbose=False)
        return encoded["input_ids"]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _end_of_document_id(hf_tokenizer: Any, path: Path) -> int:
    if hf_tokenizer.eos_token_id is not None:
        return hf_tokenizer.eos_token_id
    eod = hf_tokenizer.get_vocab().get(END_OF_TEXT)
    if eod is None:
        raise TokenizerError(
            f"tokenizer {path} has no end-of-document token: it sets no eos_token and has no {END_OF_TEXT}; "
            f"set eos_token in its tokenizer_config.json"
        )
    return eod


def load_tokenizer(path: str | os.PathLike) -> QSparseTokenizer:
    """Load a local Hugging Face tokenizer directory (ours, or e.g. a Llama/Mistral tokenizer saved locally)."""
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer directory {path} does not exist (or is not a directory)")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise TokenizerError(
            f"{path} is not a Hugging Face tokenizer directory: it has none of {', '.join(TOKENIZER_FILES)} "
            f"(train one with tools/train_tokenizer.py, or save one with save_pretrained)"
        )
    from transformers import AutoTokenizer

    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TokenizerError(f"{path} is not a loadable Hugging Face tokenizer directory: {error}") from error
    return QSparseTokenizer(hf_tokenizer, path)


def train_bpe_tokenizer(
    files: list[Path],
    output_dir: Path,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    text_field: str = "text",
) -> Path:
    """Train a byte-level BPE on text or JSON-lines files (the `text_field` of each line) and save it.

    Text files are read paragraph by paragraph; any input `preprocess` reads (parquet, a saved `datasets`
    directory) works too. The result is a Hugging Face tokenizer directory whose only special token,
    `<|endoftext|>`, is the end-of-document and pad token. It is built in a temporary sibling directory and
    renamed into place, so `output_dir` is either absent or complete.
    """
    # Before `datasets` (reading) and `transformers` (saving) are first imported: they read the switch only then.
    offline_hugging_face()
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE}")
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise TokenizerError(f"{output_dir} already exists and is not an empty directory; remove it or pick another")
    texts = iter_document_texts(files, json_key=text_field, text_unit="paragraph")
    backend = _byte_level_bpe()
    backend.train_from_iterator(texts, _bpe_trainer(vocab_size, min_frequency))
    _save_atomically(backend, output_dir)
    return output_dir


def _byte_level_bpe() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # No prefix space: decode(encode(text)) == text exactly, for any text.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _bpe_trainer(vocab_size: int, min_frequency: int) -> Any:
    from tokenizers import pre_tokenizers, trainers

    # The whole byte alphabet up front: every byte stays encodable even if the corpus never shows it.
    return trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )


def _save_atomically(backend: Any, output_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        clean_up_tokenization_spaces=False,
    )
    # Not replace=True: the caller has refused an output directory that is not empty; an empty one is replaced.
    with atomic_directory(output_dir) as staging:
        hf_tokenizer.save_pretrained(str(staging))
