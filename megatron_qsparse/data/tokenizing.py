"""Tokenizing records in a pool of worker processes: batches that never span two files go out in file order, at
most a few at a time, and come back in the same order as tokens plus each record's length.

A record is a document, or a `Piece` of one streamed in parts (a text file read whole); only a record that ends
its document gets the eod. A long text is tokenized `BATCH_CHARACTERS` at a time, in `text_pieces` (which
tokenize like the whole, see `readers`): the tokenizer's working memory for a document is bounded, and only its
ids (2 or 4 bytes each) are kept.

Workers ignore SIGINT and die on SIGTERM: on Ctrl-C (sent to the whole process group) the main process unwinds,
removes its temporary output and terminates the pool; a worker's own traceback would only be noise.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_qsparse.data.readers import (
    BATCH_RECORDS,
    BadRecord,
    InputFile,
    Piece,
    Record,
    document_text,
    ends_document,
    iter_records,
    text_pieces,
)
from megatron_qsparse.data.tokenizer import QSparseTokenizer, load_tokenizer

# The characters that close a batch before BATCH_RECORDS (long documents); also the most characters a worker
# gives the tokenizer at once.
BATCH_CHARACTERS = 1 << 20


@dataclass(frozen=True)
class Batch:
    input_format: str
    json_key: str
    records: list[Record]


@dataclass(frozen=True)
class EncodedBatch:
    tokens: np.ndarray  # every record's tokens (and eod where it ends its document), concatenated
    lengths: list[int]  # each record's share of `tokens`
    ends: list[bool]  # whether each record ends its document
    bad: list[tuple[int, BadRecord]]
    text_bytes: int = 0  # UTF-8 bytes of the records' text: the progress display's measure


def batches(sources: list[InputFile], json_key: str, text_unit: str) -> Iterator[tuple[InputFile, Batch]]:
    """Records grouped in batches that never span two files (a bad record is located within its file)."""
    for source in sources:
        records: list[Record] = []
        characters = 0
        for record in iter_records(source, json_key, text_unit):
            records.append(record)
            characters += _characters(record[1])
            if len(records) >= BATCH_RECORDS or characters >= BATCH_CHARACTERS:
                yield source, Batch(source.format, json_key, records)
                records, characters = [], 0
        if records:
            yield source, Batch(source.format, json_key, records)


def _characters(payload: Any) -> int:
    if isinstance(payload, Piece):
        return len(payload.text)
    return len(payload) if isinstance(payload, str) else 0  # a document's text or JSON line; not a BadRecord


_worker_tokenizer: QSparseTokenizer | None = None
_worker_dtype: type[np.number] | None = None


def _start_worker(tokenizer_path: str, dtype: type[np.number]) -> None:
    global _worker_tokenizer, _worker_dtype
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, inherited through fork
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by `worker_pool` while forking
    # One core per worker: the tokenizer's own thread pool would oversubscribe the machine.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer, _worker_dtype = load_tokenizer(tokenizer_path), dtype


def _encode_batch(batch: Batch) -> EncodedBatch:
    texts, ends, bad = [], [], []
    for location, payload in batch.records:
        try:
            texts.append(document_text(batch.input_format, batch.json_key, payload))
            ends.append(ends_document(payload))
        except BadRecord as record:
            bad.append((location, record))
    eod = np.array([_worker_tokenizer.eod], dtype=_worker_dtype)
    parts: list[np.ndarray] = []
    lengths = []
    for ids, end in zip(_tokenize_each(texts), ends):
        parts.extend(ids + [eod] if end else ids)
        lengths.append(sum(len(part) for part in ids) + (1 if end else 0))
    tokens = np.concatenate(parts) if parts else np.empty(0, dtype=_worker_dtype)
    return EncodedBatch(tokens, lengths, ends, bad, sum(len(t.encode("utf-8")) for t in texts))


def _tokenize_each(texts: list[str]) -> list[list[np.ndarray]]:
    """Each text's ids, as arrays; texts go to the tokenizer in calls of about `BATCH_CHARACTERS` characters, a
    long one in several (`text_pieces`), so no call sees more than that."""
    ids: list[list[np.ndarray]] = [[] for _ in texts]
    owners: list[int] = []
    pieces: list[str] = []
    characters = 0

    def flush() -> None:
        for owner, piece_ids in zip(owners, _worker_tokenizer.tokenize_batch(pieces)):
            ids[owner].append(np.array(piece_ids, dtype=_worker_dtype))
        owners.clear()
        pieces.clear()

    for owner, text in enumerate(texts):
        for piece in text_pieces(text, BATCH_CHARACTERS):
            if pieces and characters + len(piece) > BATCH_CHARACTERS:
                flush()
                characters = 0
            owners.append(owner)
            pieces.append(piece)
            characters += len(piece)
    if pieces:
        flush()
    return ids


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


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def worker_pool(workers: int, tokenizer_path: Path, dtype: type[np.number]) -> Any:
    # fork starts workers in milliseconds with the tokenizer libraries already imported; spawn re-imports them.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    # SIGINT and SIGTERM wait while the workers start: one landing in fork's bookkeeping is lost to the parent
    # (Python prints "Exception ignored" and carries on), and a worker must not get one before it ignores it. The
    # pool's threads, started now, inherit the mask and leave the signals to the main thread.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    # A forked child's garbage collector must never traverse what it inherited: native objects of the parent's
    # libraries (torch, the tokenizers' thread pool) can crash it there, and the pool would restart the crashing
    # worker for ever. Frozen objects are never collected; the parent unfreezes once the workers exist.
    gc.collect()
    gc.freeze()
    try:
        return context.Pool(workers, initializer=_start_worker, initargs=(str(tokenizer_path), dtype))
    finally:
        gc.unfreeze()
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
