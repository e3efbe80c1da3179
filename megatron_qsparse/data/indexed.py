"""Writing megatron-core's .bin/.idx: each tokenized document becomes one sequence (and one document) of an
`IndexedDataset`, written under a temporary prefix that is published only when complete."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from megatron_qsparse.atomic import temporary_sibling
from megatron_qsparse.data.readers import BadInputError, BadRecord, InputFile
from megatron_qsparse.data.tokenizing import EncodedBatch

# Skipped records reported one by one before only counting them.
WARNINGS_SHOWN = 20


@contextmanager
def temporary_prefix(output_prefix: Path) -> Iterator[Path]:
    """A temporary prefix beside `output_prefix`; renamed into place on success, removed on any error."""
    temp = temporary_sibling(output_prefix)
    try:
        yield temp
        # The .idx marks completion: drop an older one first, publish the .bin, then the new .idx.
        with_suffix(output_prefix, ".idx").unlink(missing_ok=True)
        os.replace(with_suffix(temp, ".bin"), with_suffix(output_prefix, ".bin"))
        os.replace(with_suffix(temp, ".idx"), with_suffix(output_prefix, ".idx"))
    finally:
        for suffix in (".bin", ".idx"):
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
    """Feeds encoded batches to megatron-core's builder: one sequence, and one document, per document."""

    def __init__(self, bin_path: Path, dtype: type[np.number], skip_bad: bool, log: Callable[[str], None]) -> None:
        import torch

        self._as_tensor = torch.from_numpy
        self.builder = indexed_dataset().IndexedDatasetBuilder(str(bin_path), dtype=dtype)
        self.skip_bad, self.log = skip_bad, log
        self.documents = self.tokens = 0
        self.skipped: Counter[str] = Counter()

    def add(self, source: InputFile, encoded: EncodedBatch) -> None:
        for location, bad in encoded.bad:
            self._skip(source, location, bad)
        start = 0
        for length in encoded.lengths:
            self.builder.add_document(self._as_tensor(encoded.tokens[start : start + length]), [length])
            start += length
        self.documents += len(encoded.lengths)
        self.tokens += start

    def _skip(self, source: InputFile, location: int, bad: BadRecord) -> None:
        error = BadInputError(source.path, source.unit, location, bad.reason, bad.problem)
        if not self.skip_bad:
            raise error
        self.skipped[bad.reason] += 1
        shown = sum(self.skipped.values())
        if shown <= WARNINGS_SHOWN:
            self.log(f"warning: skipped {source.path}, {source.unit} {location}: {bad.problem}")
        if shown == WARNINGS_SHOWN:
            self.log("warning: further skipped records are only counted")

    def finish(self, idx_path: Path) -> None:
        self.builder.finalize(str(idx_path))

    def abandon(self) -> None:
        # The builder has no close() of its own; its .bin is about to be removed.
        self.builder.data_file.close()
