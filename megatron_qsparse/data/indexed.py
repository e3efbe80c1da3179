"""Writing megatron-core's .bin/.idx: each tokenized document becomes one sequence (and one document) of an
`IndexedDataset`, written under a temporary prefix that is published only when complete, with its sidecar.

The sidecar `PREFIX.meta.json` (`CORPUS_META_FORMAT` 1) says what the corpus was made with, so that training can
refuse a corpus made with another tokenizer::

    {"format": 1,
     "tokenizer": {"path": "/abs/tokenizer/dir", "vocab_size": 2000, "vocab_sha256": "<64 hex>", "eod": 0},
     "documents": 23, "tokens": 10870, "dtype": "uint16", "bin_size": 21740, "idx_size": 530}

"tokenizer" is `tokenizer.tokenizer_fingerprint` (compare "vocab_sha256", not "path": a moved tokenizer is the
same one). The .bin/.idx are exactly megatron-core's: a corpus without a sidecar (made by Megatron-LM's own tools,
or before the sidecar existed) reads as before, and `read_corpus_meta` returns None for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from megatron_qsparse.atomic import temporary_sibling, write_json
from megatron_qsparse.data.readers import BadInputError, InputFile, SkippedRecords
from megatron_qsparse.data.tokenizer import failures_named
from megatron_qsparse.data.tokenizing import EncodedBatch
from megatron_qsparse.errors import DataError

META_SUFFIX = ".meta.json"
CORPUS_META_FORMAT = 1
# Every file of a corpus, the .idx (the mark of a complete .bin) before its sidecar.
CORPUS_SUFFIXES = (".bin", ".idx", META_SUFFIX)


@contextmanager
def temporary_prefix(output_prefix: Path) -> Iterator[Path]:
    """A temporary prefix beside `output_prefix`; its .bin, .idx and sidecar are renamed into place on success, and
    removed on any error (or interruption: KeyboardInterrupt and the like unwind through here too)."""
    temp = temporary_sibling(output_prefix)
    try:
        yield temp
        # The .idx marks completion: drop an older one (and the sidecar describing it) first, publish the .bin,
        # then the new .idx, then its sidecar. Interrupted in between, the corpus has no sidecar: read as before.
        with_suffix(output_prefix, ".idx").unlink(missing_ok=True)
        with_suffix(output_prefix, META_SUFFIX).unlink(missing_ok=True)
        for suffix in CORPUS_SUFFIXES:
            if suffix != META_SUFFIX or with_suffix(temp, suffix).exists():
                os.replace(with_suffix(temp, suffix), with_suffix(output_prefix, suffix))
    finally:
        for suffix in CORPUS_SUFFIXES:
            with_suffix(temp, suffix).unlink(missing_ok=True)


def with_suffix(prefix: Path, suffix: str) -> Path:
    # Not Path.with_suffix: a prefix like "corpus.v2" would lose its ".v2".
    return prefix.with_name(prefix.name + suffix)


def indexed_dataset() -> Any:
    """megatron-core's indexed_dataset module, imported without its warnings about TransformerEngine and apex
    (optional training kernels, irrelevant to writing a corpus)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class IndexedWriter:
    """Feeds encoded batches to megatron-core's builder: one sequence, and one document, per document.

    A document streamed in pieces is written as its pieces arrive and registered once, when it ends: the same
    bytes, and the same index, as `add_document` with the whole of it, without holding it. Write failures name
    `output_bin` (the .bin being published), not the temporary."""

    def __init__(
        self, bin_path: Path, dtype: type[np.number], skip_bad: bool, log: Callable[[str], None], output_bin: Path
    ) -> None:
        self.output_bin = output_bin
        with failures_named(output_bin):
            self.builder = indexed_dataset().IndexedDatasetBuilder(str(bin_path), dtype=dtype)
        self.bad = SkippedRecords(skip_bad, log)
        self.documents = self.tokens = 0
        self.open_document = 0  # tokens written of a document that has not ended yet

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped records by reason."""
        return self.bad.counts

    def add(self, source: InputFile, encoded: EncodedBatch) -> None:
        for location, bad in encoded.bad:
            self.bad(BadInputError(source.path, source.unit, location, bad.reason, bad.problem))
        start = 0
        with failures_named(self.output_bin):
            for length, ends in zip(encoded.lengths, encoded.ends):
                self.builder.data_file.write(encoded.tokens[start : start + length].tobytes(order="C"))
                start += length
                self.open_document += length
                if ends:
                    self._end_document()
        self.tokens += start

    def _end_document(self) -> None:
        # What add_document(tokens, [length]) records, after having written the tokens.
        self.builder.sequence_lengths.append(self.open_document)
        self.builder.end_document()
        self.documents += 1
        self.open_document = 0

    def finish(self, idx_path: Path, output_idx: Path) -> None:
        if self.open_document:
            raise AssertionError("a document's last piece never came")  # readers end every document
        with failures_named(self.output_bin):
            self.builder.data_file.close()  # flushes: a full disk shows here
        with failures_named(output_idx):
            self.builder.finalize(str(idx_path))

    def abandon(self) -> None:
        # The builder has no close() of its own; its .bin is about to be removed. Closing flushes, which fails
        # again on a full disk: that error is already on its way.
        with contextlib.suppress(OSError):
            self.builder.data_file.close()


def corpus_meta(prefix: Path, tokenizer_entry: dict, documents: int, tokens: int, dtype: type[np.number]) -> dict:
    """The sidecar of the corpus written at `prefix` (its .bin and .idx exist)."""
    return {
        "format": CORPUS_META_FORMAT,
        "tokenizer": tokenizer_entry,
        "documents": documents,
        "tokens": tokens,
        "dtype": np.dtype(dtype).name,
        "bin_size": with_suffix(prefix, ".bin").stat().st_size,
        "idx_size": with_suffix(prefix, ".idx").stat().st_size,
    }


def write_corpus_meta(prefix: Path, meta: dict) -> None:
    """`PREFIX.meta.json`, written atomically."""
    write_json(with_suffix(Path(prefix), META_SUFFIX), meta)


def read_corpus_meta(prefix: str | os.PathLike) -> dict | None:
    """The sidecar of the corpus at `prefix`, or None when it has none (a Megatron-LM corpus, or an older one).

    Raises `DataError` (naming the file) for a sidecar that is not one this version can read."""
    path = with_suffix(Path(prefix), META_SUFFIX)
    rerun = "rerun tools/preprocess_data.py, or delete it to use the corpus without the tokenizer check"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a corpus description ({error}); {rerun}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tokenizer"), dict):
        raise DataError(f'{path}: not a corpus description (no "tokenizer" object); {rerun}')
    if meta.get("format") != CORPUS_META_FORMAT:
        raise DataError(
            f"{path}: corpus description format {meta.get('format')!r}, this version reads {CORPUS_META_FORMAT}; "
            f"{rerun}"
        )
    return meta
