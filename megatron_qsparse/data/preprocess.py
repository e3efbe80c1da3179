"""Corpus preprocessing: text, JSON lines, parquet or a saved `datasets` directory -> megatron-core .bin/.idx.

Every document becomes one sequence `tokenize(text) + [eod]` of an `IndexedDataset` (one sequence per document),
read back by megatron-core with `IndexedDataset(prefix)`. Files are read in order with Hugging Face `datasets`
(streaming, offline), tokenized by a pool of worker processes in ordered batches, and written through
`IndexedDatasetBuilder` to a temporary prefix that is renamed into place only when complete.

Bad input stops the run with the file, the line (or row) and the fix; with `skip_bad` such records are skipped
and counted by reason instead: "malformed_json", "missing_field", "non_string_field", "invalid_utf8" and
"empty_file".
"""

from __future__ import annotations

import glob
import itertools
import json
import multiprocessing
import os
import sys
import time
import uuid
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_qsparse.data.tokenizer import QSparseTokenizer, load_tokenizer

# Local files only: never let `datasets` or the hub client reach for the network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

INPUT_FORMATS = ("auto", "text", "jsonl", "parquet", "datasets")
TEXT_UNITS = ("file", "paragraph", "line")
FORMAT_BY_EXTENSION = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
}
# Files a `save_to_disk` directory always holds (a Dataset, or a DatasetDict of splits).
DATASETS_DIR_MARKERS = ("state.json", "dataset_dict.json")

FIXES = {
    "malformed_json": "fix or remove the line, or pass --skip-bad (skip_bad=True) to skip such records",
    "missing_field": "name the field that holds the text with --json-key (json_key=...), or pass --skip-bad",
    "non_string_field": "the text field must be a string; fix the record, or pass --skip-bad",
    "invalid_utf8": "convert the file to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8), or pass --skip-bad",
    "empty_file": "remove the file from the inputs, or pass --skip-bad to only warn about it",
}
# Records per batch sent to a worker, and the characters that close a batch early (long documents).
BATCH_RECORDS = 1024
BATCH_CHARACTERS = 1 << 20
# Skipped records reported one by one before only counting them.
WARNINGS_SHOWN = 20


class PreprocessError(ValueError):
    """Input or arguments that preprocessing cannot use; the message says what to do."""


class BadInputError(PreprocessError):
    """A bad record, located by file and 1-based line (text, JSON lines) or row (parquet, datasets)."""

    def __init__(self, path: Path, unit: str, location: int, reason: str, problem: str) -> None:
        super().__init__(f"{path}, {unit} {location}: {problem}; {FIXES[reason]}")
        self.path, self.unit, self.location, self.reason = path, unit, location, reason


class BadRecord(Exception):
    """Why one record cannot be a document (located by whoever reads the record)."""

    def __init__(self, reason: str, problem: str) -> None:
        super().__init__(reason, problem)
        self.reason, self.problem = reason, problem


@dataclass(frozen=True)
class InputFile:
    path: Path
    format: str

    @property
    def unit(self) -> str:
        """What a record's location counts."""
        return "line" if self.format in ("text", "jsonl") else "row"


# A record: its 1-based line/row and either the raw JSON line (jsonl), the document text, or why it is bad.
Record = tuple[int, Any]


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


@dataclass
class PreprocessStats:
    documents: int
    tokens: int  # written, one eod per document included
    skipped: dict[str, int]  # skipped records by reason
    seconds: float
    bin_path: Path
    idx_path: Path

    def summary(self) -> str:
        skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items())) or "none"
        elapsed = max(self.seconds, 1e-9)
        return (
            f"wrote {self.documents} documents, {self.tokens} tokens (skipped: {skipped}) in {self.seconds:.2f} s "
            f"({self.documents / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s) "
            f"-> {self.bin_path}, {self.idx_path}"
        )


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Finding inputs


def resolve_inputs(inputs: Iterable[str | os.PathLike], input_format: str = "auto") -> list[InputFile]:
    """Check that every input exists and decide its format (by extension when `input_format` is "auto")."""
    if input_format not in INPUT_FORMATS:
        raise PreprocessError(f"unknown input format {input_format!r}; choose one of {', '.join(INPUT_FORMATS)}")
    resolved = [InputFile(Path(path), _format_of(Path(path), input_format)) for path in inputs]
    if not resolved:
        raise PreprocessError("no input files given")
    return resolved


def _format_of(path: Path, requested: str) -> str:
    if not path.exists():
        raise PreprocessError(f"input {path} does not exist")
    if path.is_dir():
        if requested not in ("auto", "datasets") or not any((path / m).exists() for m in DATASETS_DIR_MARKERS):
            raise PreprocessError(
                f"input {path} is a directory but not a `datasets` directory written by save_to_disk "
                f"(no {' or '.join(DATASETS_DIR_MARKERS)}); pass its files instead"
            )
        return "datasets"
    if requested == "datasets":
        raise PreprocessError(f"input {path} is a file; --input-format datasets needs a save_to_disk directory")
    if requested != "auto":
        return requested
    detected = FORMAT_BY_EXTENSION.get(path.suffix.lower())
    if detected is None:
        raise PreprocessError(
            f"cannot tell the format of {path} from its extension (known: {', '.join(FORMAT_BY_EXTENSION)}); "
            f"pass --input-format text|jsonl|parquet|datasets"
        )
    return detected


# ---------------------------------------------------------------------------------------------------------------
# Reading records, in file order


def iter_records(source: InputFile, json_key: str = "text", text_unit: str = "file") -> Iterator[Record]:
    """The records of one input in order; an input without any document yields one "empty_file" record."""
    if source.format == "text":
        records = _text_records(source.path, text_unit)
    elif source.format == "jsonl":
        records = _json_line_records(source.path)
    else:
        records = _table_records(source, json_key)
    empty = True
    for record in records:
        empty = False
        yield record
    if empty:
        yield 1, BadRecord("empty_file", "the file has no documents (it is empty or blank)")


def _undecodable_lines(path: Path, chunk_bytes: int = 1 << 24) -> set[int]:
    """1-based numbers of the lines that are not valid UTF-8, numbered like `datasets`' text builder does.

    `datasets` cannot carry undecodable bytes (Arrow strings are UTF-8, so "surrogateescape" fails), so files are
    read with errors="replace" and this binary pass tells which lines were replaced. Lines end at "\\n", "\\r\\n"
    or "\\r" (Python's universal newlines), like `bytes.splitlines`.
    """
    bad: set[int] = set()
    lines_before = 0
    with path.open("rb") as file:
        # Chunks end at a "\n", so neither a line nor a UTF-8 sequence is ever cut in two.
        while chunk := file.read(chunk_bytes) + file.readline():
            lines = chunk.splitlines()
            if not _is_utf8(chunk):
                bad.update(lines_before + number for number, line in enumerate(lines, 1) if not _is_utf8(line))
            lines_before += len(lines)
    return bad


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _numbered_lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(1-based line number, text without its line break, whether its bytes were valid UTF-8)."""
    from datasets import load_dataset

    undecodable = _undecodable_lines(path)
    # utf-8-sig: a byte-order mark is not part of the first line's text.
    lines = load_dataset(
        "text",
        data_files=_exactly(path),
        split="train",
        streaming=True,
        encoding="utf-8-sig",
        encoding_errors="replace",
    )
    number = 0
    for batch in lines.iter(batch_size=BATCH_RECORDS):
        for text in batch["text"]:
            number += 1
            yield number, text, number not in undecodable


def _exactly(path: Path) -> list[str]:
    """`data_files` naming this one file: `datasets` expands glob patterns, so "doc[1].txt" would read doc1.txt."""
    return [glob.escape(str(path))]


def _invalid_utf8() -> BadRecord:
    return BadRecord("invalid_utf8", "bytes that are not valid UTF-8")


def _json_line_records(path: Path) -> Iterator[Record]:
    # Blank lines separate nothing in JSON lines; they are not records.
    for number, text, decodable in _numbered_lines(path):
        if not decodable:
            yield number, _invalid_utf8()
        elif text.strip():
            yield number, text


def _text_records(path: Path, text_unit: str) -> Iterator[Record]:
    if text_unit == "file":
        return _whole_file_record(path)
    lines = _numbered_lines(path)
    return _line_records(lines) if text_unit == "line" else _paragraph_records(lines)


def _whole_file_record(path: Path) -> Iterator[Record]:
    from datasets import load_dataset

    undecodable = _undecodable_lines(path)
    if undecodable:
        yield min(undecodable), _invalid_utf8()
        return
    document = load_dataset(
        "text", data_files=_exactly(path), split="train", streaming=True, encoding="utf-8-sig", sample_by="document"
    )
    for row in document:
        if row["text"].strip():
            yield 1, row["text"]


def _line_records(lines: Iterator[tuple[int, str, bool]]) -> Iterator[Record]:
    for number, text, decodable in lines:
        if not decodable:
            yield number, _invalid_utf8()
        elif text.strip():
            yield number, text


def _paragraph_records(lines: Iterator[tuple[int, str, bool]]) -> Iterator[Record]:
    """Paragraphs are runs of non-blank lines, joined by "\\n"; located by their first line (or first bad one)."""
    start, paragraph, first_bad = 0, [], 0
    for number, text, decodable in lines:
        if text.strip() or not decodable:
            start = start or number
            first_bad = first_bad or (0 if decodable else number)
            paragraph.append(text)
            continue
        if paragraph:
            yield (first_bad, _invalid_utf8()) if first_bad else (start, "\n".join(paragraph))
        start, paragraph, first_bad = 0, [], 0
    if paragraph:
        yield (first_bad, _invalid_utf8()) if first_bad else (start, "\n".join(paragraph))


def _table_records(source: InputFile, json_key: str) -> Iterator[Record]:
    table = _open_table(source)
    columns = list(table.column_names or [])
    if json_key not in columns:
        missing = BadRecord("missing_field", f"no column {json_key!r} (columns: {', '.join(columns)})")
        for row, _ in enumerate(table, 1):
            yield row, missing
        return
    row = 0
    for batch in table.select_columns([json_key]).iter(batch_size=BATCH_RECORDS):
        for value in batch[json_key]:
            row += 1
            yield row, _table_text(value, json_key)


def _open_table(source: InputFile) -> Any:
    if source.format == "parquet":
        from datasets import load_dataset

        return load_dataset("parquet", data_files=_exactly(source.path), split="train", streaming=True)
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(source.path))
    if isinstance(dataset, DatasetDict):
        splits = list(dataset)
        if len(splits) != 1:
            raise PreprocessError(
                f"{source.path} holds the splits {', '.join(splits)}; pass one split's directory, "
                f"e.g. {source.path / splits[0]}"
            )
        dataset = dataset[splits[0]]
    return dataset


def _table_text(value: Any, json_key: str) -> Any:
    if isinstance(value, str):
        return value
    return BadRecord("non_string_field", f"column {json_key!r} holds {type(value).__name__}, not a string")


def document_text(input_format: str, json_key: str, payload: Any) -> str:
    """The text of one record's payload, or raise `BadRecord`."""
    if isinstance(payload, BadRecord):
        raise payload
    if input_format == "jsonl":
        return _json_field(payload, json_key)
    return payload


def _json_field(line: str, json_key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadRecord("malformed_json", f"malformed JSON ({error.msg}, column {error.colno})") from None
    if not isinstance(record, dict):
        raise BadRecord("malformed_json", f"expected a JSON object, got a JSON {type(record).__name__}")
    if json_key not in record:
        raise BadRecord("missing_field", f"no field {json_key!r} (fields: {', '.join(record) or 'none'})")
    text = record[json_key]
    if not isinstance(text, str):
        raise BadRecord("non_string_field", f"field {json_key!r} is a JSON {type(text).__name__}, not a string")
    if not _is_encodable(text):
        raise BadRecord("invalid_utf8", f"field {json_key!r} has an unpaired surrogate escape (not valid Unicode)")
    return text


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def iter_document_texts(
    inputs: Iterable[str | os.PathLike], json_key: str = "text", text_unit: str = "file", input_format: str = "auto"
) -> Iterator[str]:
    """Every document's text, in order, in this process.

    Inputs and options are checked now; the first bad record raises `BadInputError` when it is reached.
    """
    _check_text_unit(text_unit)
    return _texts(resolve_inputs(inputs, input_format), json_key, text_unit)


def _texts(sources: list[InputFile], json_key: str, text_unit: str) -> Iterator[str]:
    for source in sources:
        for location, payload in iter_records(source, json_key, text_unit):
            try:
                yield document_text(source.format, json_key, payload)
            except BadRecord as bad:
                raise BadInputError(source.path, source.unit, location, bad.reason, bad.problem) from None


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing in worker processes


def _batches(sources: list[InputFile], json_key: str, text_unit: str) -> Iterator[tuple[InputFile, Batch]]:
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


def _in_order(
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


def _worker_pool(workers: int, tokenizer_path: Path, dtype: type[np.number]) -> Any:
    # fork starts workers in milliseconds with the tokenizer libraries already imported; spawn re-imports them.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    return context.Pool(workers, initializer=_start_worker, initargs=(str(tokenizer_path), dtype))


# ---------------------------------------------------------------------------------------------------------------
# Writing .bin/.idx atomically


@contextmanager
def _temporary_prefix(output_prefix: Path) -> Iterator[Path]:
    """A temporary prefix beside `output_prefix`; renamed into place on success, removed on any error."""
    temp = output_prefix.with_name(f".{output_prefix.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield temp
        # The .idx marks completion: drop an older one first, publish the .bin, then the new .idx.
        _with_suffix(output_prefix, ".idx").unlink(missing_ok=True)
        os.replace(_with_suffix(temp, ".bin"), _with_suffix(output_prefix, ".bin"))
        os.replace(_with_suffix(temp, ".idx"), _with_suffix(output_prefix, ".idx"))
    finally:
        for suffix in (".bin", ".idx"):
            _with_suffix(temp, suffix).unlink(missing_ok=True)


def _with_suffix(prefix: Path, suffix: str) -> Path:
    # Not Path.with_suffix: a prefix like "corpus.v2" would lose its ".v2".
    return prefix.with_name(prefix.name + suffix)


def _indexed_dataset() -> Any:
    """megatron-core's indexed_dataset module, imported without its warnings about TransformerEngine and apex
    (optional training kernels, irrelevant to writing a corpus)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class _Writer:
    """Feeds encoded batches to megatron-core's builder: one sequence, and one document, per document."""

    def __init__(self, bin_path: Path, dtype: type[np.number], skip_bad: bool, log: Callable[[str], None]) -> None:
        import torch

        self._as_tensor = torch.from_numpy
        self.builder = _indexed_dataset().IndexedDatasetBuilder(str(bin_path), dtype=dtype)
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


# ---------------------------------------------------------------------------------------------------------------
# The whole run


def preprocess(
    inputs: list[Path],
    output_prefix: Path,
    tokenizer_path: Path,
    input_format: str = "auto",
    json_key: str = "text",
    text_unit: str = "file",
    workers: int = 1,
    skip_bad: bool = False,
    log: Callable[[str], None] = _log_to_stderr,
    progress: bool = True,
) -> PreprocessStats:
    """Tokenize `inputs` into `output_prefix`.bin/.idx (megatron-core `IndexedDataset`), one sequence per document.

    Raises `PreprocessError` (`BadInputError` for a located bad record) and leaves nothing at `output_prefix`.
    """
    started = time.perf_counter()
    output_prefix = Path(output_prefix)
    sources = _check_arguments(inputs, output_prefix, input_format, text_unit, workers)
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = _indexed_dataset().DType.optimal_dtype(tokenizer.vocab_size)
    log(
        f"preprocessing {len(sources)} input(s) with {workers} worker(s); vocabulary {tokenizer.vocab_size}, "
        f"eod {tokenizer.eod}, dtype {np.dtype(dtype).name}"
    )
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    # The pool first: forked workers need not inherit the open .bin.
    with _worker_pool(workers, tokenizer_path, dtype) as pool, _temporary_prefix(output_prefix) as temp_prefix:
        writer = _Writer(_with_suffix(temp_prefix, ".bin"), dtype, skip_bad, log)
        try:
            batches = _batches(sources, json_key, text_unit)
            _tokenize_into(writer, _in_order(pool, batches, window=2 * workers + 2), progress)
            if writer.documents == 0:
                raise PreprocessError("no documents to write: every record was skipped")
        except BaseException:
            writer.abandon()
            raise
        writer.finish(_with_suffix(temp_prefix, ".idx"))
    stats = PreprocessStats(
        documents=writer.documents,
        tokens=writer.tokens,
        skipped=dict(writer.skipped),
        seconds=time.perf_counter() - started,
        bin_path=_with_suffix(output_prefix, ".bin"),
        idx_path=_with_suffix(output_prefix, ".idx"),
    )
    log(stats.summary())
    return stats


def _check_arguments(
    inputs: list[Path], output_prefix: Path, input_format: str, text_unit: str, workers: int
) -> list[InputFile]:
    _check_text_unit(text_unit)
    if workers < 1:
        raise PreprocessError(f"workers must be at least 1, got {workers}")
    if output_prefix.suffix in (".bin", ".idx"):
        raise PreprocessError(
            f"the output prefix {output_prefix} ends in {output_prefix.suffix}; pass the prefix only "
            f"({output_prefix.with_suffix('')}), the .bin and .idx are added"
        )
    return resolve_inputs(inputs, input_format)


def _check_text_unit(text_unit: str) -> None:
    if text_unit not in TEXT_UNITS:
        raise PreprocessError(f"unknown text unit {text_unit!r}; choose one of {', '.join(TEXT_UNITS)}")


def _tokenize_into(
    writer: _Writer, encoded_batches: Iterator[tuple[InputFile, EncodedBatch]], progress: bool
) -> None:
    from tqdm import tqdm

    started = time.perf_counter()
    with tqdm(unit="doc", desc="tokenizing", file=sys.stderr, disable=not progress, mininterval=0.5) as bar:
        for source, encoded in encoded_batches:
            writer.add(source, encoded)
            rate = writer.tokens / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
            bar.update(len(encoded.lengths))
