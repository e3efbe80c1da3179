"""Tokenizing records in a pool of worker processes: batches that never span two files go out in file order, at
most a few at a time, and come back in the same order as tokens plus each document's length."""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_qsparse.data.readers import BATCH_RECORDS, BadRecord, InputFile, Record, document_text, iter_records
from megatron_qsparse.data.tokenizer import QSparseTokenizer, load_tokenizer

# The characters that close a batch before BATCH_RECORDS (long documents).
BATCH_CHARACTERS = 1 << 20


@dataclass(frozen=True)
class Batch:
    input_format: str
    json_key: str
    records: list[Record]


@dataclass(frozen=True)
class EncodedBatch:
    tokens: np.ndarray  # every document's tokens and eod, concatenated
    lengths: list[int]
    bad: list[tuple[int, BadRecord]]


def batches(sources: list[InputFile], json_key: str, text_unit: str) -> Iterator[tuple[InputFile, Batch]]:
    """Records grouped in batches that never span two files (a bad record is located within its file)."""
    for source in sources:
        records: list[Record] = []
        characters = 0
        for record in iter_records(source, json_key, text_unit):
            records.append(record)
            characters += len(record[1]) if isinstance(record[1], str) else 0
            if len(records) >= BATCH_RECORDS or characters >= BATCH_CHARACTERS:
                yield source, Batch(source.format, json_key, records)
                records, characters = [], 0
        if records:
            yield source, Batch(source.format, json_key, records)


_worker_tokenizer: QSparseTokenizer | None = None
_worker_dtype: type[np.number] | None = None


def _start_worker(tokenizer_path: str, dtype: type[np.number]) -> None:
    global _worker_tokenizer, _worker_dtype
    # One core per worker: the tokenizer's own thread pool would oversubscribe the machine.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer, _worker_dtype = load_tokenizer(tokenizer_path), dtype


def _encode_batch(batch: Batch) -> EncodedBatch:
    texts, bad = [], []
    for location, payload in batch.records:
        try:
            texts.append(document_text(batch.input_format, batch.json_key, payload))
        except BadRecord as record:
            bad.append((location, record))
    eod = _worker_tokenizer.eod
    documents = [ids + [eod] for ids in _worker_tokenizer.tokenize_batch(texts)] if texts else []
    lengths = [len(ids) for ids in documents]
    tokens = np.fromiter(itertools.chain.from_iterable(documents), dtype=_worker_dtype, count=sum(lengths))
    return EncodedBatch(tokens, lengths, bad)


def in_order(
    pool: Any, work: Iterator[tuple[InputFile, Batch]], window: int
) -> Iterator[tuple[InputFile, EncodedBatch]]:
    """`pool.imap` with at most `window` batches in flight (imap would read the whole corpus ahead)."""
    pending: deque = deque()
    for source, batch in work:
        pending.append((source, pool.apply_async(_encode_batch, (batch,))))
        if len(pending) >= window:
            source_done, result = pending.popleft()
            yield source_done, result.get()
    while pending:
        source_done, result = pending.popleft()
        yield source_done, result.get()


def worker_pool(workers: int, tokenizer_path: Path, dtype: type[np.number]) -> Any:
    # fork starts workers in milliseconds with the tokenizer libraries already imported; spawn re-imports them.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    return context.Pool(workers, initializer=_start_worker, initargs=(str(tokenizer_path), dtype))
