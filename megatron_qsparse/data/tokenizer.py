"""Tokenizers: train a byte-level BPE, and load any local Hugging Face tokenizer for megatron-core.

`QSparseTokenizer` is the small interface megatron-core's `GPTDataset` reads (`vocab_size`, `eod`, `pad`) plus
`tokenize`/`detokenize` for preprocessing and checks. A document's own text never produces the end-of-document
id: special-token strings inside a document (say, the literal text "<|endoftext|>") are encoded as plain text,
so the only `eod` in a preprocessed corpus is the one appended after each document.

`tokenizer_fingerprint` is what a corpus records of its tokenizer (`PREFIX.meta.json`, see `indexed`), and what
training compares it with.

`save_tokenizer` writes every tokenizer directory the project makes (a trained BPE, the tokenizer of an HF export or
import) so that it loads under transformers 5 and 4.x alike (`AutoTokenizer`, and through it megatron-core's
`HuggingFaceTokenizer`, lm-evaluation-harness, ...).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from megatron_qsparse.atomic import atomic_directory, write_json
from megatron_qsparse.data.readers import SkippedRecords, iter_text_pieces, offline_hugging_face
from megatron_qsparse.errors import EXIT_NO_INPUT, UserError, os_error

END_OF_TEXT = "<|endoftext|>"
# What save_pretrained writes for one kind of tokenizer or another; a directory with none of them is not one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# transformers 5 saves a tokenizers-backed tokenizer as "TokenizersBackend", a class transformers 4.x does not have
# ("Tokenizer class TokenizersBackend does not exist"); under 5 "PreTrainedTokenizerFast" is an alias of it, and
# under 4.x the same class: one name both resolve to the same tokenizer, read from the same tokenizer.json.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
TRANSFORMERS5_ONLY_CLASSES = ("TokenizersBackend",)
# How the copy that was re-saved had been loaded (from_pretrained's arguments, which transformers 5 saves too), not
# what the tokenizer is: a directory written with them would carry local_files_only=True to wherever it goes next.
LOAD_TIME_KEYS = ("local_files_only", "is_local")
# 256 byte symbols plus <|endoftext|>: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB_SIZE = 257
# The most characters given to the BPE trainer as one text: a long document goes in pieces (`readers.text_pieces`,
# cut where the pre-tokenizer splits anyway, so the words counted are the same), a few hundred of them buffered.
TRAINING_PIECE_CHARACTERS = 1 << 16


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be loaded, or a training request that cannot be met."""


class MissingTokenizerError(TokenizerError, UserError):
    """A tokenizer directory that does not exist (exit status 66, like a missing input)."""

    exit_code = EXIT_NO_INPUT


class QSparseTokenizer:
    """megatron-core's view of a Hugging Face tokenizer."""

    def __init__(self, hf_tokenizer: Any, path: Path) -> None:
        self._hf = hf_tokenizer
        self._eod = _end_of_document_id(hf_tokenizer, path)
        self.path = Path(path)

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
    if not path.exists():
        raise MissingTokenizerError(f"tokenizer directory {path} does not exist")
    if not path.is_dir():
        raise TokenizerError(f"tokenizer {path} is a file; pass its directory (the one save_pretrained wrote)")
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


def tokenizer_fingerprint(tokenizer: QSparseTokenizer | str | os.PathLike) -> dict:
    """What identifies a tokenizer (loaded, or its directory): the "tokenizer" entry of a corpus' sidecar,
    ``{"path": <absolute directory>, "vocab_size": int, "vocab_sha256": <64 hex>, "eod": int}``.

    Two tokenizers with the same "vocab_sha256" give every id the same meaning, so a corpus made with one trains
    a model for the other; "path" only says where it was."""
    if not isinstance(tokenizer, QSparseTokenizer):
        tokenizer = load_tokenizer(tokenizer)
    return {
        "path": str(tokenizer.path.absolute()),
        "vocab_size": tokenizer.vocab_size,
        "vocab_sha256": vocab_sha256(tokenizer),
        "eod": tokenizer.eod,
    }


def vocab_sha256(tokenizer: QSparseTokenizer | str | os.PathLike) -> str:
    """sha256 (hex) of the vocabulary, added tokens included: ``json.dumps(sorted(get_vocab().items()))`` as UTF-8
    (compact separators ``(",", ":")``, ASCII escapes), i.e. of the sorted [token, id] pairs. Independent of how
    the tokenizer files are formatted, and of the files' kind (tokenizer.json, a SentencePiece model, ...)."""
    if not isinstance(tokenizer, QSparseTokenizer):
        tokenizer = load_tokenizer(tokenizer)
    pairs = sorted(tokenizer.hf.get_vocab().items())
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode("utf-8")).hexdigest()


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_bpe_tokenizer(
    files: list[Path],
    output_dir: Path,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    text_field: str = "text",
    skip_bad: bool = False,
    log: Callable[[str], None] = _log_to_stderr,
) -> Path:
    """Train a byte-level BPE on text or JSON-lines files (the `text_field` of each line) and save it.

    Text files are read paragraph by paragraph; any input `preprocess` reads (parquet, a saved `datasets`
    directory) works too. A long document reaches the trainer in pieces of `TRAINING_PIECE_CHARACTERS`, so its
    memory does not grow with the document. Bad records raise `BadInputError`, or with `skip_bad` are skipped,
    counted and logged. The result is a Hugging Face tokenizer directory whose only special token,
    `<|endoftext|>`, is the end-of-document and pad token. It is built in a temporary sibling directory, made
    before training (an output that cannot be created fails at once, not after the work) and renamed into place
    at the end, so `output_dir` is either absent or complete; the temporary is removed on any error or
    interruption.
    """
    # Before `datasets` (reading) and `transformers` (saving) are first imported: they read the switch only then.
    offline_hugging_face()
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE}")
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise TokenizerError(f"{output_dir} already exists and is not an empty directory; remove it or pick another")
    bad = SkippedRecords(skip_bad, log)
    texts = _Counted(
        iter_text_pieces(
            files, json_key=text_field, text_unit="paragraph", on_bad=bad, limit=TRAINING_PIECE_CHARACTERS
        ),
        _input_bytes(files),
    )
    with contextlib.ExitStack() as stack:
        # Not replace=True: an output directory that is not empty was refused above; an empty one is replaced.
        with failures_named(output_dir):
            staging = stack.enter_context(atomic_directory(output_dir))
        backend = _byte_level_bpe()
        log(f"reading the text, then learning a {vocab_size:,}-token vocabulary")
        with texts:
            backend.train_from_iterator(texts, _bpe_trainer(vocab_size, min_frequency))
        if bad.counts:
            log(f"skipped: {bad.summary()}")
        if texts.count == 0:
            raise TokenizerError("no text to train on: every record was skipped")
        with failures_named(output_dir):
            _save(backend, staging)
    return output_dir


class _Counted:
    """An iterator that counts what it yields, and shows it: UTF-8 bytes of text against the input files' size
    (a total only for plain files: compressed ones would overshoot it; JSON syntax makes it end a little short)."""

    def __init__(self, items: Iterator[str], total_bytes) -> None:
        from megatron_qsparse.progress import progress

        self.items, self.count = items, 0
        self.bar = progress(total=total_bytes, desc="tokenizer text", unit="B")

    def __iter__(self) -> Iterator[str]:
        for item in self.items:
            self.count += 1
            self.bar.update(len(item.encode("utf-8")))
            yield item

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


def _input_bytes(files) -> int | None:
    paths = [Path(f) for f in files]
    if any(p.suffix in (".gz", ".xz", ".zst") or not p.is_file() for p in paths):
        return None
    return sum(p.stat().st_size for p in paths)


@contextlib.contextmanager
def failures_named(path: Path) -> Iterator[None]:
    """An OS error inside becomes one naming `path` (the output the user asked for), keeping its errno: a write to
    a full disk names no file at all, and a temporary's hidden name would mean nothing to the user. The Rust
    writers' errors (tokenizer.json) carry their errno only as "(os error N)" in the message."""
    try:
        yield
    except OSError as error:
        if error.errno is None:
            raise
        raise os_error(error.errno, path) from None
    except Exception as error:
        found = re.search(r"\(os error (\d+)\)", str(error))
        if found is None or int(found.group(1)) not in errno.errorcode:
            raise
        raise os_error(int(found.group(1)), path) from None


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


def _save(backend: Any, directory: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        clean_up_tokenization_spaces=False,
    )
    save_tokenizer(hf_tokenizer, directory)


def save_tokenizer(hf_tokenizer: Any, directory: str | os.PathLike) -> Path:
    """`hf_tokenizer.save_pretrained(directory)`, then `make_portable(directory)`."""
    directory = Path(directory)
    hf_tokenizer.save_pretrained(str(directory))
    make_portable(directory)
    return directory


def make_portable(directory: str | os.PathLike) -> bool:
    """Name a transformers-5-only tokenizer class in `directory`'s tokenizer_config.json by the name transformers 4.x
    knows too (`PORTABLE_TOKENIZER_CLASS`), and drop the `LOAD_TIME_KEYS`; the tokenizer itself (tokenizer.json,
    special tokens) is untouched. True if the file was rewritten. The class is renamed only beside a tokenizer.json:
    that is the file it reads."""
    directory = Path(directory)
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{config_path} is not valid JSON ({error}); save the tokenizer again") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{config_path} is not a JSON object; save the tokenizer again")
    portable = {key: value for key, value in config.items() if key not in LOAD_TIME_KEYS}
    if portable.get("tokenizer_class") in TRANSFORMERS5_ONLY_CLASSES and (directory / "tokenizer.json").is_file():
        portable["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    if portable == config:
        return False
    write_json(config_path, portable)
    return True
