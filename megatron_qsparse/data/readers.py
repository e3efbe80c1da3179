"""Reading documents from the inputs preprocessing and tokenizer training accept: text files (a document per file,
paragraph or line), JSON lines, parquet and saved `datasets` directories, in file order.

Files are read with Hugging Face `datasets` (streaming, offline). A record that cannot be a document is located
by file and line (or row) and has a reason: "malformed_json", "missing_field", "non_string_field", "invalid_utf8"
or "empty_file"; `iter_document_texts` raises `BadInputError` at the first, preprocessing can skip and count them.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
# Records read from `datasets` per step; also the records per batch sent to a tokenizer worker.
BATCH_RECORDS = 1024


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


def offline_hugging_face() -> None:
    """Local files only: never let `datasets` or the hub client reach for the network (a value already set is kept).

    Both read these variables once, when first imported, so this runs before anything that imports them: reading
    an input here, loading a tokenizer for preprocessing, training one. Not at import: importing this module must
    not change the process's environment."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _datasets() -> Any:
    """The `datasets` package, imported offline."""
    offline_hugging_face()
    import datasets

    return datasets


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


def check_text_unit(text_unit: str) -> None:
    if text_unit not in TEXT_UNITS:
        raise PreprocessError(f"unknown text unit {text_unit!r}; choose one of {', '.join(TEXT_UNITS)}")


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
    undecodable = _undecodable_lines(path)
    # utf-8-sig: a byte-order mark is not part of the first line's text.
    lines = _datasets().load_dataset(
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
    undecodable = _undecodable_lines(path)
    if undecodable:
        yield min(undecodable), _invalid_utf8()
        return
    document = _datasets().load_dataset(
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
    datasets = _datasets()
    if source.format == "parquet":
        return datasets.load_dataset("parquet", data_files=_exactly(source.path), split="train", streaming=True)
    dataset = datasets.load_from_disk(str(source.path))
    if isinstance(dataset, datasets.DatasetDict):
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
    check_text_unit(text_unit)
    return _texts(resolve_inputs(inputs, input_format), json_key, text_unit)


def _texts(sources: list[InputFile], json_key: str, text_unit: str) -> Iterator[str]:
    for source in sources:
        for location, payload in iter_records(source, json_key, text_unit):
            try:
                yield document_text(source.format, json_key, payload)
            except BadRecord as bad:
                raise BadInputError(source.path, source.unit, location, bad.reason, bad.problem) from None
