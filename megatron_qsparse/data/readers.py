"""Reading documents from the inputs preprocessing and tokenizer training accept: text files (a document per file,
paragraph or line), JSON lines, JSON arrays, parquet and saved `datasets` directories, in file order.

Files are read with Hugging Face `datasets` (streaming, offline). A record that cannot be a document is located
by file and line (or row) and has a reason: "malformed_json", "missing_field", "non_string_field", "invalid_utf8"
or "empty_file"; `iter_document_texts` raises `BadInputError` at the first, preprocessing can skip and count them.

Text, JSON-lines and JSON-array files may be compressed, told by their last extension (`COMPRESSIONS`:
"corpus.jsonl.gz", ".xz", ".zst"; zstd needs the `zstandard` package before Python 3.14). They are decompressed
as they are read, never whole, and lines are numbered as in the uncompressed file. A ".json" file whose first
character (after whitespace) is "[" is a JSON array of records (`--input-format json`), as written by
`json.dump(list_of_dicts)`; anything else with that extension is JSON lines. The array is scanned one element at a
time (its memory is the largest element's, like a JSON line's), and an element is located by the line it starts on.

Memory is bounded by the pieces of a document, not by the document: a text file read as one document (the
default) is streamed as `Piece`s of at most `DOCUMENT_PIECE_CHARACTERS` characters, and every consumer tokenizes
any long text piece by piece (`text_pieces`). Pieces end just before a space (or tab) that follows a non-space,
where the byte-level pre-tokenizers (GPT-2's, Llama 3's, ours) also split, so tokenizing the pieces gives the
same ids as tokenizing the whole. Only a window of that size without any such space is cut elsewhere (before a
line break, or hard at the limit when it has no whitespace at all), and only there may the ids differ;
tokenizers that add a prefix to every text they see (SentencePiece's "▁" with prepend_scheme "always") may
differ at every cut. A line, a paragraph or a JSON/parquet record is read whole: its size is the record's.
"""

from __future__ import annotations

import glob
import gzip
import importlib
import io
import json
import lzma
import os
import re
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_qsparse.errors import EXIT_NO_INPUT, UserError

INPUT_FORMATS = ("auto", "text", "jsonl", "json", "parquet", "datasets")
TEXT_UNITS = ("file", "paragraph", "line")
FORMAT_BY_EXTENSION = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",  # or "json" (an array) when it starts with "[": see `_json_or_json_lines`
    ".parquet": "parquet",
}
# A file's last extension -> how it is compressed; the extension before it tells the format ("a.jsonl.gz").
COMPRESSIONS = {".gz": "gzip", ".xz": "xz", ".zst": "zstd"}
# The zstandard release to install for .zst inputs before Python 3.14 (which has compression.zstd).
ZSTANDARD_REQUIREMENT = "zstandard==0.25.0"
# Formats read line by line, whose records are located by line.
LINE_FORMATS = ("text", "jsonl", "json")
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
# The most characters of one document read, or tokenized, at a time (see the module's docstring).
DOCUMENT_PIECE_CHARACTERS = 1 << 20
# Skipped records reported one by one before only counting them.
WARNINGS_SHOWN = 20


class PreprocessError(ValueError):
    """Input or arguments that preprocessing cannot use; the message says what to do."""


class MissingInputError(PreprocessError, UserError):
    """An input path that does not exist (exit status 66, like a missing file)."""

    exit_code = EXIT_NO_INPUT


class BadInputError(PreprocessError):
    """A bad record, located by file and 1-based line (text, JSON lines) or row (parquet, datasets)."""

    def __init__(self, path: Path, unit: str, location: int, reason: str, problem: str) -> None:
        super().__init__(f"{path}, {unit} {location}: {problem}; {FIXES[reason]}")
        self.path, self.unit, self.location, self.reason, self.problem = path, unit, location, reason, problem


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
        return "line" if self.format in LINE_FORMATS else "row"


@dataclass(frozen=True)
class Piece:
    """A part of a document streamed in parts (a text file read whole); the document ends with its `last` piece."""

    text: str
    last: bool


# A record: its 1-based line/row and either the raw JSON line (jsonl), the document text, a `Piece` of it, or why
# it is bad.
Record = tuple[int, Any]


def ends_document(payload: Any) -> bool:
    """Whether a record's payload completes its document (all but the non-last pieces do)."""
    return not isinstance(payload, Piece) or payload.last


class SkippedRecords:
    """What to do with a bad record: raise its `BadInputError`, or (with `skip_bad`) count it by reason and warn
    about the first `WARNINGS_SHOWN`."""

    def __init__(self, skip_bad: bool, log: Callable[[str], None]) -> None:
        self.skip_bad, self.log = skip_bad, log
        self.counts: Counter[str] = Counter()

    def __call__(self, error: BadInputError) -> None:
        if not self.skip_bad:
            raise error
        self.counts[error.reason] += 1
        shown = sum(self.counts.values())
        if shown <= WARNINGS_SHOWN:
            self.log(f"warning: skipped {error.path}, {error.unit} {error.location}: {error.problem}")
        if shown == WARNINGS_SHOWN:
            self.log("warning: further skipped records are only counted")

    def summary(self) -> str:
        return ", ".join(f"{reason} {count}" for reason, count in sorted(self.counts.items())) or "none"


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
        raise MissingInputError(f"input {path} does not exist")
    if path.is_dir():
        if requested not in ("auto", "datasets") or not any((path / m).exists() for m in DATASETS_DIR_MARKERS):
            raise PreprocessError(
                f"input {path} is a directory but not a `datasets` directory written by save_to_disk "
                f"(no {' or '.join(DATASETS_DIR_MARKERS)}); pass its files instead"
            )
        return "datasets"
    if requested == "datasets":
        raise PreprocessError(f"input {path} is a file; --input-format datasets needs a save_to_disk directory")
    chosen = requested if requested != "auto" else _format_by_extension(path)
    if compression_of(path) and chosen not in LINE_FORMATS:
        raise PreprocessError(
            f"input {path}: a compressed {chosen} file cannot be read ({chosen} compresses internally); "
            f"decompress it, or pass --input-format {'|'.join(LINE_FORMATS)} if it holds text or JSON"
        )
    return chosen


def compression_of(path: Path) -> str | None:
    """How `path` is compressed, by its last extension (`COMPRESSIONS`), or None."""
    return COMPRESSIONS.get(path.suffix.lower())


def _format_by_extension(path: Path) -> str:
    """The format of `path` from its extension, the one before a compression extension if any ("a.jsonl.gz")."""
    named = path.with_suffix("") if compression_of(path) else path
    detected = FORMAT_BY_EXTENSION.get(named.suffix.lower())
    if detected is None:
        known = ", ".join([*FORMAT_BY_EXTENSION, *(f"(...){ext}" for ext in COMPRESSIONS)])
        raise PreprocessError(
            f"cannot tell the format of {path} from its extension (known: {known}); "
            f"pass --input-format {'|'.join(INPUT_FORMATS[1:])}"
        )
    if named.suffix.lower() == ".json":
        return _json_or_json_lines(path)
    return detected


def _json_or_json_lines(path: Path) -> str:
    """ "json" when the file's first character after whitespace (and a byte-order mark) is "[", else "jsonl"."""
    with _decompression_errors(path), open_text(path, errors="replace") as file:
        while chunk := file.read(1 << 16):
            stripped = chunk.lstrip()
            if stripped:
                return "json" if stripped[0] == "[" else "jsonl"
    return "jsonl"  # blank: reported as an empty file


# ---------------------------------------------------------------------------------------------------------------
# Opening files, compressed or not


def open_binary(path: Path) -> io.BufferedIOBase:
    """`path` opened for reading bytes, decompressed as it is read when its extension says so (`COMPRESSIONS`)."""
    kind = compression_of(path)
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "xz":
        return lzma.open(path, "rb")
    if kind == "zstd":
        return _open_zstd(path)
    return path.open("rb")


def _open_zstd(path: Path) -> io.BufferedIOBase:
    try:
        from compression import zstd  # Python 3.14

        return zstd.open(path, "rb")
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise PreprocessError(
            f"input {path}: reading .zst files needs the zstandard package: install zstandard "
            f"(pip install {ZSTANDARD_REQUIREMENT}), or decompress the file first (zstd -d)"
        ) from None
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True))


def open_text(
    path: Path, encoding: str = "utf-8-sig", errors: str = "strict", newline: str | None = None
) -> io.TextIOBase:
    """`path` opened as text (decompressed when compressed); by default UTF-8 with an optional byte-order mark
    and universal newlines, as `datasets` reads text."""
    if compression_of(path) is None:
        return path.open(encoding=encoding, errors=errors, newline=newline)
    return io.TextIOWrapper(open_binary(path), encoding=encoding, errors=errors, newline=newline)


def _decompression_failures() -> tuple[type[BaseException], ...]:
    failures: list[type[BaseException]] = [EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError]
    for module, name in (("compression.zstd", "ZstdError"), ("zstandard", "ZstdError")):
        try:
            failures.append(getattr(importlib.import_module(module), name))
        except ImportError:
            pass
    return tuple(failures)


@contextmanager
def _decompression_errors(path: Path) -> Iterator[None]:
    """A compressed input that cannot be decompressed (truncated, or not what its extension says) becomes one
    `PreprocessError` naming it, not a bare "Compressed file ended before the end-of-stream marker"."""
    kind = compression_of(path)
    if kind is None:
        yield
        return
    try:
        yield
    except _decompression_failures() as error:
        raise PreprocessError(
            f"input {path}: cannot decompress it as {kind} ({error or type(error).__name__}): the file is "
            f"truncated or not {kind}-compressed; check it (e.g. {_CHECK_COMMANDS[kind]} {path})"
        ) from None


_CHECK_COMMANDS = {"gzip": "gzip -t", "xz": "xz -t", "zstd": "zstd -t"}


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
    elif source.format == "json":
        records = _json_array_records(source.path)
    else:
        records = _table_records(source, json_key)
    empty = True
    for record in records:
        empty = False
        yield record
    if empty:
        yield 1, BadRecord("empty_file", "the file has no documents (it is empty or blank)")


def _undecodable_lines(path: Path, chunk_characters: int = 1 << 22) -> set[int]:
    """1-based numbers of the lines that are not valid UTF-8, numbered like `datasets`' text builder does.

    `datasets` cannot carry undecodable bytes (Arrow strings are UTF-8, so "surrogateescape" fails), so files are
    read with errors="replace" and this pass tells which lines were replaced. It reads with "surrogateescape"
    (each undecodable byte becomes a lone surrogate) and universal newlines (lines end at "\\n", "\\r\\n" or
    "\\r", like `bytes.splitlines`), a bounded chunk at a time: a file that is one long line is never whole.
    """
    bad: set[int] = set()
    lines_before = 0
    with _decompression_errors(path), open_text(path, encoding="utf-8", errors="surrogateescape") as file:
        while chunk := file.read(chunk_characters):
            line, counted_to = lines_before + 1, 0
            for escaped in _ESCAPED_BYTE.finditer(chunk):
                line += chunk.count("\n", counted_to, escaped.start())
                counted_to = escaped.start()
                bad.add(line)
            lines_before += chunk.count("\n")
    return bad


# What "surrogateescape" turns an undecodable byte into.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _numbered_lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(1-based line number, text without its line break, whether its bytes were valid UTF-8)."""
    if compression_of(path):
        yield from _decompressed_lines(path)
        return
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


def _decompressed_lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """`_numbered_lines` of a compressed file, in one streamed pass: lines numbered and split as `datasets`' text
    builder does (universal newlines, then at "\\n"), undecodable bytes replaced by U+FFFD."""
    with _decompression_errors(path), open_text(path, errors="surrogateescape") as file:
        for number, line in enumerate(file, 1):
            text = line[:-1] if line.endswith("\n") else line
            if _ESCAPED_BYTE.search(text):
                yield number, _ESCAPED_BYTE.sub("\ufffd", text), False
            else:
                yield number, text, True


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


def _json_array_records(path: Path, read_characters: int = 1 << 20) -> Iterator[Record]:
    """The elements of a top-level JSON array, each as its raw JSON text located by the line it starts on (parsed,
    like a JSON line, by `document_text`). The file is scanned a read at a time, keeping only the element being
    read: memory is bounded by the largest element, whatever the file's size. Structure that is not an array of
    values separated by commas is one "malformed_json" record, after which the rest of the file cannot be read."""
    with _decompression_errors(path), open_text(path, errors="surrogateescape") as file:
        yield from _JsonArrayScanner(file, read_characters).records()


class _JsonArrayScanner:
    """Finds where each element of a JSON array ends without parsing it: brackets and braces are counted outside
    strings, and strings skipped (escapes included), across reads."""

    # Outside strings: what changes the depth or starts a string. Inside: what may end it.
    _STRUCTURE = re.compile(r'["{}\[\]]')
    _IN_STRING = re.compile(r'["\\]')
    _WHITESPACE = re.compile(r"[ \t\n\r]*")
    _SCALAR = re.compile(r"[^\s,\]]*")

    def __init__(self, file: io.TextIOBase, read_characters: int) -> None:
        self.file, self.read_characters = file, read_characters
        self.text, self.at, self.line, self.eof = "", 0, 1, False  # `line`: the line `text[at]` is on

    def records(self) -> Iterator[Record]:
        first = self._next_character()
        if first is None:
            return  # blank: `iter_records` reports an empty file
        if first != "[":
            yield self.line, BadRecord("malformed_json", f"a JSON-array file must start with '[', found {first!r}")
            return
        self._advance(self.at + 1)
        if self._next_character() == "]":
            self._advance(self.at + 1)
            yield from self._trailing()
            return
        while True:
            if self._next_character() is None:
                yield self.line, BadRecord("malformed_json", "the file ends inside the JSON array (truncated?)")
                return
            line, end = self.line, self._element_end()
            if end is None:
                yield line, BadRecord("malformed_json", "the file ends inside this element (truncated?)")
                return
            element = self.text[self.at : end]
            self._advance(end)
            # Read with "surrogateescape": an undecodable byte shows as a lone surrogate, reported like a JSON line's.
            yield line, _invalid_utf8() if _ESCAPED_BYTE.search(element) else element
            separator = self._next_character()
            if separator == ",":
                self._advance(self.at + 1)
            elif separator == "]":
                self._advance(self.at + 1)
                yield from self._trailing()
                return
            else:
                yield self.line, self._missing_separator(separator)
                return

    @staticmethod
    def _missing_separator(found: str | None) -> BadRecord:
        what = "the end of the file" if found is None else repr(found)
        return BadRecord(
            "malformed_json", f"expected ',' or ']' after an element, found {what} (the rest of the file is not read)"
        )

    def _trailing(self) -> Iterator[Record]:
        found = self._next_character()
        if found is not None:
            yield self.line, BadRecord("malformed_json", f"{found!r} after the end of the JSON array")

    def _read(self) -> bool:
        """Append the next read to the text (dropping what is consumed); False at the end of the file."""
        chunk = "" if self.eof else self.file.read(self.read_characters)
        if not chunk:
            self.eof = True
            return False
        self.text, self.at = self.text[self.at :] + chunk, 0
        return True

    def _advance(self, to: int) -> None:
        self.line += self.text.count("\n", self.at, to)
        self.at = to

    def _next_character(self) -> str | None:
        """The next character that is not whitespace (not consumed), or None at the end of the file."""
        while True:
            self._advance(self._WHITESPACE.match(self.text, self.at).end())
            if self.at < len(self.text):
                return self.text[self.at]
            if not self._read():
                return None

    def _element_end(self) -> int | None:
        """Where the value starting at `at` ends in `text` (reading on as needed), or None if the file ends first."""
        first = self.text[self.at]
        if first not in '{["':
            return self._scalar_end()
        position, depth, in_string = self.at, 0, False
        while True:
            pattern = self._IN_STRING if in_string else self._STRUCTURE
            found = pattern.search(self.text, position)
            if found is None or (found.group() == "\\" and found.end() >= len(self.text)):
                position = len(self.text) if found is None else found.start()  # rescan an escape split by a read
                consumed = self.at
                if not self._read():
                    return None
                position -= consumed  # the read dropped the characters before `at`
                continue
            character, position = found.group(), found.end()
            if in_string:
                if character == "\\":
                    position += 1  # the escaped character, whatever it is
                    continue
                in_string = False
            elif character == '"':
                in_string = True
                continue
            else:
                depth += 1 if character in "{[" else -1
            if depth == 0:
                return position

    def _scalar_end(self) -> int:
        """The end of a number or literal (not an object: `document_text` says so); it may continue in the next read."""
        while True:
            end = self._SCALAR.match(self.text, self.at).end()
            if end < len(self.text) or not self._read():
                return end


def _text_records(path: Path, text_unit: str) -> Iterator[Record]:
    if text_unit == "file":
        return _whole_file_record(path)
    lines = _numbered_lines(path)
    return _line_records(lines) if text_unit == "line" else _paragraph_records(lines)


def _whole_file_record(path: Path) -> Iterator[Record]:
    """The file as one document, read like `datasets`' "document" samples (UTF-8 with an optional byte-order mark,
    universal newlines), streamed in `Piece`s; nothing for a blank file."""
    undecodable = _undecodable_lines(path)
    if undecodable:
        yield min(undecodable), _invalid_utf8()
        return
    pieces = _streamed_pieces(path, DOCUMENT_PIECE_CHARACTERS)
    held = next(pieces, None)
    for piece in pieces:
        yield 1, Piece(held, last=False)
        held = piece
    if held is not None:
        yield 1, Piece(held, last=True)


def _streamed_pieces(path: Path, limit: int) -> Iterator[str]:
    """The file's text in consecutive pieces of at most `limit` characters, cut like `text_pieces`; nothing when it
    is blank (leading blank text is held until the first non-blank character shows the document is not empty)."""
    pending, blank = "", True
    with _decompression_errors(path), open_text(path) as file:
        while chunk := file.read(limit):
            pending += chunk
            blank = blank and chunk.isspace()
            while not blank and len(pending) > limit:
                end = _piece_end(pending, 0, limit)
                yield pending[:end]
                pending = pending[end:]
    if not blank:
        yield from text_pieces(pending, limit)


def text_pieces(text: str, limit: int = DOCUMENT_PIECE_CHARACTERS) -> Iterator[str]:
    """`text` in consecutive pieces of at most `limit` characters that join back to it; a short text is itself.

    A piece ends, by preference, just before a space, tab or other horizontal whitespace that follows a non-space
    (where byte-level pre-tokenizers split too, so the pieces tokenize like the whole); else before a line break
    after a letter or digit (as safe), else before any whitespace after a non-space (Llama 3's pre-tokenizer
    keeps punctuation with the line breaks that follow it: the ids may differ there), else at `limit`."""
    start = 0
    while len(text) - start > limit:
        end = _piece_end(text, start, limit)
        yield text[start:end]
        start = end
    yield text[start:] if start else text


# The cuts, best first: the last match before the limit ends a piece (see `text_pieces`).
_CUTS = (re.compile(r"\S(?=[^\S\r\n])"), re.compile(r"[^\W_](?=\s)"), re.compile(r"\S(?=\s)"))
# Where the search for a cut starts: the window's last part (a cut is usually near), then the whole window.
_CUT_SEARCH = 1 << 12


def _piece_end(text: str, start: int, limit: int) -> int:
    """The end of the piece of `text` that starts at `start`: the last good cut in text[start + 1 : start + limit]."""
    end = start + limit  # the cut is at most here: text[end] may be the space the piece ends before
    for pattern in _CUTS:
        for search_from in (max(start, end - _CUT_SEARCH), start):
            last = deque(pattern.finditer(text, search_from, end + 1), maxlen=1)
            if last:
                return last[0].end()
    return end


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
    if isinstance(payload, Piece):
        return payload.text
    if input_format in ("jsonl", "json"):
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
    inputs: Iterable[str | os.PathLike],
    json_key: str = "text",
    text_unit: str = "file",
    input_format: str = "auto",
    on_bad: Callable[[BadInputError], None] | None = None,
) -> Iterator[str]:
    """Every document's text, in order, in this process (a document streamed in pieces is joined: whole).

    Inputs and options are checked now; the first bad record raises `BadInputError` when it is reached, or is
    passed to `on_bad` (say a `SkippedRecords`) and skipped.
    """
    check_text_unit(text_unit)
    return _joined(_texts(resolve_inputs(inputs, input_format), json_key, text_unit, on_bad))


def iter_text_pieces(
    inputs: Iterable[str | os.PathLike],
    json_key: str = "text",
    text_unit: str = "file",
    input_format: str = "auto",
    on_bad: Callable[[BadInputError], None] | None = None,
    limit: int = DOCUMENT_PIECE_CHARACTERS,
) -> Iterator[str]:
    """Like `iter_document_texts` (inputs checked now), but every document in pieces of at most `limit` characters
    (`text_pieces`): for consumers, like tokenizer training, to whom where a document ends does not matter."""
    check_text_unit(text_unit)
    texts = _texts(resolve_inputs(inputs, input_format), json_key, text_unit, on_bad)
    return (piece for text, _ in texts for piece in text_pieces(text, limit))


def _texts(
    sources: list[InputFile], json_key: str, text_unit: str, on_bad: Callable[[BadInputError], None] | None
) -> Iterator[tuple[str, bool]]:
    """(text, whether it ends its document) for every record, in order."""
    for source in sources:
        for location, payload in iter_records(source, json_key, text_unit):
            try:
                text = document_text(source.format, json_key, payload)
            except BadRecord as bad:
                error = BadInputError(source.path, source.unit, location, bad.reason, bad.problem)
            else:
                yield text, ends_document(payload)
                continue
            if on_bad is None:
                raise error
            on_bad(error)


def _joined(texts: Iterator[tuple[str, bool]]) -> Iterator[str]:
    parts: list[str] = []
    for text, ends in texts:
        parts.append(text)
        if ends:
            yield parts[0] if len(parts) == 1 else "".join(parts)
            parts = []
