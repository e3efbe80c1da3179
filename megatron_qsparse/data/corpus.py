"""The embedded default corpus: public-domain English text from three Debian packages.

* ``sword-text-web``: the World English Bible (SWORD zText module, OSIS markup), one document per chapter.
* ``r-cran-janeaustenr``: Jane Austen's six novels (an R lazy-load database), one document per chapter.
* ``jargon-text``: the Jargon File 4.4.7 (plain text), consecutive entries and sections packed into ~8 KB chunks.

Only the Debian package registry is needed (``apt-get download`` + ``dpkg-deb -x``, never ``apt-get install``).
The result is two JSON-lines files, ``train.jsonl`` and ``heldout.jsonl``, one ``{"text", "source"}`` object per
document, cached with a ``manifest.json`` written last::

    python -m megatron_qsparse.data.corpus [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import gzip
import hashlib
import html
import json
import lzma
import os
import re
import struct
import subprocess
import tempfile
import textwrap
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# Bump when the extraction changes: caches written by an older format are rebuilt.
CORPUS_FORMAT = 1
HELDOUT_PER_10000 = 200  # 2% of documents
JARGON_CHUNK_CHARS = 8_000  # a chunk closes once it reaches this size ...
JARGON_MAX_CHARS = 16_000  # ... or before it would pass this one

BIBLE_PACKAGE = "sword-text-web"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
JARGON_PACKAGE = "jargon-text"
BIBLE_MODULE_DIR = "usr/share/sword/modules/texts/ztext/engWEB2015eb"
AUSTEN_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
JARGON_TEXT = "usr/share/doc/jargon-text/jargon.txt.gz"
# Publication order; the names are the R variables of janeaustenr.
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
Log = Callable[[str], None]


class CorpusError(RuntimeError):
    """Fetching or parsing the default corpus failed; the message names the package and the step."""


@dataclass(frozen=True)
class Document:
    source: str  # stable id, e.g. "bible/John/3", "austen/emma/12", "jargon/bandwidth"
    text: str


@dataclass(frozen=True)
class SplitCounts:
    documents: int
    characters: int


@dataclass(frozen=True)
class CorpusFiles:
    train: Path
    heldout: Path
    manifest: Path
    train_counts: SplitCounts
    heldout_counts: SplitCounts
    source_counts: dict[str, dict[str, SplitCounts]]  # source name -> split name -> counts


# ----------------------------------------------------------------------------------------------------------------
# SWORD zText (World English Bible)


def read_ztext_testament(bzs: bytes, bzv: bytes, bzz: bytes) -> list[str]:
    """Every entry of one testament of a zText module, in index order ("" for absent verses).

    ``.bzs`` holds 12-byte little-endian (offset, size, inflated size) records of zlib blocks in ``.bzz``;
    ``.bzv`` holds 10-byte (block u32, offset u32, size u16) records locating each entry in its inflated block.
    A verse range stored once has the same record for each verse of the range (e.g. 4 Maccabees 8:29-30): only
    the first of such consecutive entries gets the text, the others are "".
    """
    if len(bzs) % 12 or len(bzv) % 10:
        raise ValueError(f"zText index sizes {len(bzs)} (.bzs) and {len(bzv)} (.bzv) are not multiples of 12 and 10")
    blocks = []
    for offset, size, inflated_size in struct.iter_unpack("<III", bzs):
        block = zlib.decompress(bzz[offset : offset + size])
        if len(block) != inflated_size:
            raise ValueError(f"zText block at {offset} inflates to {len(block)} bytes, index says {inflated_size}")
        blocks.append(block)
    entries, previous = [], None
    for record in struct.iter_unpack("<IIH", bzv):
        block, offset, size = record
        if size and block >= len(blocks):
            raise ValueError(f"zText entry points to block {block}, the module has {len(blocks)}")
        linked = record == previous
        entries.append(blocks[block][offset : offset + size].decode("utf-8") if size and not linked else "")
        previous = record
    return entries


# One XML token: a tag (groups: closing slash, name, attributes, self-closing slash), text, or a stray "<".
_XML_TOKEN = re.compile(r"<\s*(/?)\s*([\w:]+)([^>]*?)(/?)\s*>|([^<]+)|(<)")
_XML_ATTRIBUTE = re.compile(r'([\w:]+)\s*=\s*"([^"]*)"')
_OSIS_WORD_TAG = re.compile(r"</?w\b[^>]*>")
# Divisions, titles and line groups are paragraphs; everything else but poetry lines and list items (quotes,
# milestones, names) only loses its markup.
_OSIS_BREAKS = {"div": "\n\n", "lb": "\n\n", "lg": "\n\n", "title": "\n\n", "speaker": "\n\n", "list": "\n\n"}
# Poetry lines and list items start a line. Only their starts break: an end is followed by the next start, and a
# break at both would leave a blank line between lines.
_OSIS_LINE_STARTS = {"l", "item"}
# The module often drops the space after a note ("God<note>...</note>created"): text that follows a dropped note
# and starts like a word gets one back.
_STARTS_LIKE_A_WORD = re.compile(r"[\w“‘\"'(\[]")


def _xml_tokens(markup: str) -> Iterator[re.Match]:
    for token in _XML_TOKEN.finditer(markup):
        if token.group(6):
            raise ValueError(f"malformed OSIS markup at {markup[token.start() : token.start() + 80]!r}")
        yield token


def osis_to_text(markup: str) -> str:
    """Plain text of OSIS markup: verse text kept, footnotes and cross references (``<note>``) dropped."""
    pieces = []
    note_depth = 0
    after_note = False
    for token in _xml_tokens(markup):
        closing, name, attributes, self_closing, text, _ = token.groups()
        if text is not None:
            if note_depth == 0:
                if after_note and _STARTS_LIKE_A_WORD.match(text):
                    pieces.append(" ")
                pieces.append(html.unescape(text))
                after_note = False
        elif name == "note" and not self_closing:
            note_depth += -1 if closing else 1
            after_note = note_depth == 0
        elif note_depth == 0:
            starts_line = name in _OSIS_LINE_STARTS and not closing and "eID=" not in attributes
            pieces.append("\n" if starts_line else _OSIS_BREAKS.get(name, ""))
    return normalize_whitespace("".join(pieces))


def osis_chapters(markup: str) -> Iterator[tuple[str, str]]:
    """(osisID, markup) of each chapter in a stream of OSIS entries: from its ``<chapter sID>`` milestone to its
    ``<chapter eID>`` (or the next chapter or book start). Book titles and introductions fall outside."""
    chapter_id, pieces = None, []
    for token in _xml_tokens(markup):
        closing, name, attribute_text, _, _, _ = token.groups()
        if name in ("chapter", "div") and not closing:
            attributes = dict(_XML_ATTRIBUTE.findall(attribute_text))
            starts_chapter = name == "chapter" and "sID" in attributes
            starts_book = attributes.get("type") == "book" and "sID" in attributes
            ends_chapter = name == "chapter" and "eID" in attributes
            if starts_chapter or starts_book or ends_chapter:
                if chapter_id is not None:
                    yield chapter_id, "".join(pieces)
                chapter_id, pieces = (attributes.get("osisID", attributes["sID"]) if starts_chapter else None), []
                continue
        if chapter_id is not None:
            pieces.append(token.group(0))
    if chapter_id is not None:
        yield chapter_id, "".join(pieces)


# Greek Esther: the module's NRSVA index interleaves its verses with those of other chapters (measured: verses of
# chapter 4 land inside chapter 5, some after its end milestone), so its chapters do not read as text. Daniel with
# Greek portions (only 6 of its chapters survive the versification) largely repeats Daniel word for word: keeping
# both would put near-duplicates on both sides of the held-out split.
_SKIPPED_BIBLE_BOOKS = frozenset({"EsthGr", "DanGr"})


def bible_documents(module_dir: Path) -> list[Document]:
    """One document per chapter of the World English Bible (with Deuterocanon), ids like ``bible/John/3``."""
    entries = []
    for testament in ("ot", "nt"):
        bzs, bzv, bzz = (_read_package_file(module_dir / f"{testament}.{ext}") for ext in ("bzs", "bzv", "bzz"))
        entries += read_ztext_testament(bzs, bzv, bzz)
    documents = []
    # Entries are verses: a space keeps the last word of one verse off the first word of the next.
    # Word elements (Strong's numbers) are two thirds of all tags: dropping them first halves the parsing time.
    for osis_id, markup in osis_chapters(_OSIS_WORD_TAG.sub("", " ".join(entries))):
        book, _, chapter = osis_id.rpartition(".")
        text = osis_to_text(markup)
        if book not in _SKIPPED_BIBLE_BOOKS and text:
            documents.append(Document(f"bible/{book}/{chapter}", text))
    return documents


# ----------------------------------------------------------------------------------------------------------------
# R serialization (XDR format) and lazy-load databases (Jane Austen)


class RVector(list):
    """An R vector (logical, integer, double, character, list): its elements, plus its attributes."""

    def __init__(self, values: Iterable[Any] = (), attributes: dict[str, Any] | None = None):
        super().__init__(values)
        self.attributes = attributes or {}

    def named(self) -> dict[str, Any]:
        """The elements keyed by the ``names`` attribute."""
        names = self.attributes.get("names")
        if names is None or len(names) != len(self):
            raise ValueError("R vector has no names attribute of its length")
        return dict(zip(names, self))


class RSymbol(str):
    """An R symbol (SYMSXP), e.g. an attribute tag."""


_NILVALUE_SXP, _REFSXP = 254, 255
_SYMSXP, _LISTSXP, _CHARSXP = 1, 2, 9
_LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP, _EXPRSXP = 10, 13, 14, 16, 19, 20
_HAS_ATTRIBUTES, _HAS_TAG = 1 << 9, 1 << 10
_CHARSXP_LATIN1, _CHARSXP_UTF8 = 1 << 2, 1 << 3
_NA_INTEGER = -(2**31)


class _XdrReader:
    """Reads R's XDR serialization (``serialize(x, NULL, xdr = TRUE)``, versions 2 and 3); see R's serialize.c.

    Every item starts with a 32-bit flags word: bits 0-7 the type, bit 9 "has attributes", bit 10 "has tag",
    bits 12-27 the "levels" (string encoding for CHARSXP). Symbols are entered in a reference table that later
    REFSXP items point back to (1-based index in the upper 24 bits of the flags, or in the next word when 0).
    """

    def __init__(self, data: bytes):
        self.data, self.position = data, 0
        self.references: list[RSymbol] = []
        self.native_encoding = "utf-8"

    def take(self, size: int) -> bytes:
        if size < 0 or self.position + size > len(self.data):
            raise ValueError(f"R serialization truncated at byte {self.position} (wanted {size} more)")
        chunk = self.data[self.position : self.position + size]
        self.position += size
        return chunk

    def integer(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        length = self.integer()
        if length == -1:  # long vector: the length follows as two words
            upper, lower = struct.unpack(">II", self.take(8))
            return (upper << 32) + lower
        return length

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise ValueError("not an R XDR serialization (header is not 'X\\n')")
        version = self.integer()
        self.take(8)  # R version that wrote it, oldest R version that can read it
        if version == 3:
            self.native_encoding = self.take(self.integer()).decode("ascii")
        elif version != 2:
            raise ValueError(f"R serialization format version {version} is not supported (only 2 and 3)")

    def item(self) -> Any:
        flags = self.integer()
        kind = flags & 0xFF
        if kind == _NILVALUE_SXP:
            return None
        if kind == _REFSXP:
            index = flags >> 8 or self.integer()
            return self.references[index - 1]
        if kind == _SYMSXP:
            symbol = RSymbol(self.item())
            self.references.append(symbol)
            return symbol
        if kind == _LISTSXP:
            return self.pairlist(flags)
        if kind == _CHARSXP:
            return self.string(flags)
        if kind in _VECTOR_READERS:
            values = _VECTOR_READERS[kind](self, self.length())
            attributes = self.attributes() if flags & _HAS_ATTRIBUTES else {}
            return RVector(values, attributes)
        raise ValueError(f"R object type {kind} at byte {self.position - 4} is not supported by this reader")

    def attributes(self) -> dict[str, Any]:
        return dict(self.item())

    def pairlist(self, flags: int) -> list[tuple[str | None, Any]]:
        """A pairlist as (tag, value) pairs; read iteratively since R writes the CDR chain inline."""
        pairs = []
        while (flags & 0xFF) == _LISTSXP:
            if flags & _HAS_ATTRIBUTES:
                self.item()  # attributes on a pairlist node carry nothing the corpus needs
            tag = str(self.item()) if flags & _HAS_TAG else None
            pairs.append((tag, self.item()))
            flags = self.integer()
        if (flags & 0xFF) != _NILVALUE_SXP:
            raise ValueError(f"pairlist ends in type {flags & 0xFF}, not NULL")
        return pairs

    def string(self, flags: int) -> str | None:
        length = self.integer()
        if length == -1:
            return None  # NA_character_
        levels = flags >> 12
        encoding = "latin-1" if levels & _CHARSXP_LATIN1 else "utf-8" if levels & _CHARSXP_UTF8 else None
        return self.take(length).decode(encoding or self.native_encoding)

    def strings(self, count: int) -> list[str | None]:
        return [self.item() for _ in range(count)]

    def items(self, count: int) -> list[Any]:
        return [self.item() for _ in range(count)]

    def integers(self, count: int) -> list[int | None]:
        return [None if v == _NA_INTEGER else v for v in struct.unpack(f">{count}i", self.take(4 * count))]

    def logicals(self, count: int) -> list[bool | None]:
        return [None if v is None else bool(v) for v in self.integers(count)]

    def doubles(self, count: int) -> list[float]:
        return list(struct.unpack(f">{count}d", self.take(8 * count)))


_VECTOR_READERS: dict[int, Callable[[_XdrReader, int], list]] = {
    _LGLSXP: _XdrReader.logicals,
    _INTSXP: _XdrReader.integers,
    _REALSXP: _XdrReader.doubles,
    _STRSXP: _XdrReader.strings,
    _VECSXP: _XdrReader.items,
    _EXPRSXP: _XdrReader.items,
}


def unserialize_r(data: bytes) -> Any:
    """The R object in an XDR serialization: vectors as ``RVector``, NULL as None, NA as None, pairlists as
    (tag, value) lists. Environments, closures, ALTREP and other types raise ValueError."""
    reader = _XdrReader(data)
    reader.header()
    value = reader.item()
    if reader.position != len(data):
        raise ValueError(f"{len(data) - reader.position} bytes left after the R object")
    return value


def _inflate_lazyload_blob(blob: bytes, compression: bool | int) -> bytes:
    """One object of a lazy-load database: 4-byte big-endian inflated size, then zlib data (compression TRUE) or
    a type byte ('Z' xz, '2' bzip2, '0' none) and the data (compression 2 or 3)."""
    size = int.from_bytes(blob[:4], "big")
    if compression is True or compression == 1:
        data = zlib.decompress(blob[4:])
    else:
        inflate = {b"Z": lzma.decompress, b"2": bz2.decompress, b"0": bytes}.get(blob[4:5])
        if inflate is None:
            raise ValueError(f"unknown lazy-load compression type byte {blob[4:5]!r}")
        data = inflate(blob[5:])
    if len(data) != size:
        raise ValueError(f"lazy-load object inflates to {len(data)} bytes, its header says {size}")
    return data


def read_lazyload_db(rdb: bytes, rdx: bytes) -> dict[str, Any]:
    """Every variable of an R lazy-load database (``.rdb`` data, ``.rdx`` gzip-compressed serialized index with
    ``variables`` = name -> (offset, length) in the ``.rdb`` and ``compressed`` = TRUE, 2 or 3)."""
    index = unserialize_r(gzip.decompress(rdx)).named()
    compression = index["compressed"][0]
    variables = {}
    for name, (offset, length) in index["variables"].named().items():
        blob = rdb[int(offset) : int(offset) + int(length)]
        variables[name] = unserialize_r(_inflate_lazyload_blob(blob, compression))
    return variables


_CHAPTER_HEADING = re.compile(r"\s*chapter\s+(?:\d+|[ivxlc]+)\.?\s*", re.IGNORECASE)
_NOVEL_FURNITURE = re.compile(r"\s*(?:volume\s+[ivx]+|the end|finis)\.?\s*", re.IGNORECASE)
_ITALICS = re.compile(r"_([^_\n]+)_")  # Project Gutenberg's _emphasis_


def split_chapters(lines: Sequence[str]) -> list[str]:
    """The text of each chapter of a novel given line by line (lines like "CHAPTER IV" or "Chapter 4" start a
    chapter). Front matter before the first chapter, volume headings and "THE END"/"FINIS" are dropped, hard
    wrapped lines are joined into paragraphs."""
    chapters: list[list[str]] = []
    for line in lines:
        if _CHAPTER_HEADING.fullmatch(line):
            chapters.append([])
        elif chapters and not _NOVEL_FURNITURE.fullmatch(line):
            chapters[-1].append(line)
    texts = (_ITALICS.sub(r"\1", unwrap_paragraphs(chapter)) for chapter in chapters)
    return [text for text in texts if text]


def austen_documents(data_dir: Path) -> list[Document]:
    """One document per chapter of Jane Austen's six novels, ids like ``austen/emma/12`` (chapters numbered
    through the whole book: the printed numbering restarts in every volume of some novels)."""
    books = read_lazyload_db(_read_package_file(data_dir / "Rdata.rdb"), _read_package_file(data_dir / "Rdata.rdx"))
    documents = []
    for book in AUSTEN_BOOKS:
        if book not in books:
            raise ValueError(f"variable {book!r} missing; the database holds {sorted(books)}")
        lines = ["" if line is None else line for line in books[book]]
        chapters = split_chapters(lines)
        if not chapters:
            raise ValueError(f"no chapter headings found in {book!r}")
        documents += [Document(f"austen/{book}/{number}", text) for number, text in enumerate(chapters, 1)]
    return documents


# ----------------------------------------------------------------------------------------------------------------
# The Jargon File

_JARGON_SECTION = re.compile(r"\w")  # section headings start in column 0 ("Chapter 4. ...", "The Story of Mel")
_JARGON_ENTRY = re.compile(r"   :([^:]+):")  # a lexicon entry: "   :headword: /pronunciation/, n."
_JARGON_LETTER = re.compile(r"  [0-9A-Z]")  # letter divider of the lexicon, followed by a list of its headwords
_JARGON_HEADWORD_LISTS = ("Glossary",)  # the lexicon's own heading is followed by a list of all its headwords


@dataclass
class _JargonUnit:
    heading: str
    is_entry: bool
    lines: list[str]
    keep: bool = True


def _jargon_units(lines: Iterable[str]) -> list[_JargonUnit]:
    units = [_JargonUnit("The Jargon File", False, [])]
    for line in lines:
        line = line.rstrip()
        if entry := _JARGON_ENTRY.match(line):
            units.append(_JargonUnit(entry.group(1), True, []))
        elif _JARGON_LETTER.fullmatch(line) or line in _JARGON_HEADWORD_LISTS:
            units.append(_JargonUnit(line.strip(), False, [], keep=False))
        elif _JARGON_SECTION.match(line):
            units.append(_JargonUnit(line, False, []))
        units[-1].lines.append(line)
    return [unit for unit in units if unit.keep]


def _drop_tables_of_contents(paragraphs: list[str]) -> list[str]:
    """Drops each "Table of Contents" paragraph and the one-line paragraphs (headings) listed after it."""
    kept, in_contents = [], False
    for paragraph in paragraphs:
        if paragraph.strip() == "Table of Contents":
            in_contents = True
        elif not (in_contents and "\n" not in paragraph):
            in_contents = False
            kept.append(paragraph)
    return kept


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _split_long(paragraphs: list[str], limit: int) -> Iterator[list[str]]:
    """Consecutive runs of paragraphs of at most ``limit`` characters (a longer paragraph stays whole)."""
    run, size = [], 0
    for paragraph in paragraphs:
        if run and size + len(paragraph) > limit:
            yield run
            run, size = [], 0
        run.append(paragraph)
        size += len(paragraph) + 2
    if run:
        yield run


def _pack(pieces: list[tuple[str, str]], target: int, limit: int) -> list[tuple[str, str]]:
    """Greedily joins consecutive (heading, text) pieces into chunks of about ``target`` and at most ``limit``
    characters (unless one piece is longer); a short remainder joins the chunk before it if that fits. A chunk is
    named by its first heading."""
    chunks: list[tuple[str, list[str]]] = []
    sizes: list[int] = []
    for heading, text in pieces:
        if not chunks or sizes[-1] >= target or sizes[-1] + len(text) > limit:
            chunks.append((heading, []))
            sizes.append(0)
        chunks[-1][1].append(text)
        sizes[-1] += len(text) + 2
    if len(chunks) > 1 and sizes[-1] < target // 8 and sizes[-2] + sizes[-1] <= limit:
        chunks[-2][1].extend(chunks.pop()[1])
    return [(heading, "\n\n".join(texts)) for heading, texts in chunks]


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "symbol"


def jargon_documents(text: str) -> list[Document]:
    """The Jargon File as ~8 KB documents of consecutive lexicon entries or front/back-matter sections (line
    breaks kept: some sections are verse or code), ids like ``jargon/bandwidth`` (its first heading)."""
    groups: list[list[tuple[str, str]]] = []  # runs of entries, runs of sections: a chunk never mixes them
    previous_kind = None
    for unit in _jargon_units(text.splitlines()):
        # Dedented paragraph by paragraph: the body is indented, centred titles more, code keeps its own indent.
        paragraphs = [textwrap.dedent(p) for p in _drop_tables_of_contents(_paragraphs("\n".join(unit.lines)))]
        if not paragraphs:
            continue
        if unit.is_entry != previous_kind:
            groups.append([])
            previous_kind = unit.is_entry
        for run in _split_long(paragraphs, JARGON_MAX_CHARS):
            groups[-1].append((unit.heading, "\n\n".join(run)))
    documents, seen = [], set()
    for group in groups:
        for heading, chunk in _pack(group, JARGON_CHUNK_CHARS, JARGON_MAX_CHARS):
            source = base = f"jargon/{_slug(heading)}"
            suffix = 1
            while source in seen:
                suffix += 1
                source = f"{base}-{suffix}"
            seen.add(source)
            documents.append(Document(source, chunk))
    return documents


def jargon_documents_from_package(root: Path) -> list[Document]:
    return jargon_documents(gzip.decompress(_read_package_file(root / JARGON_TEXT)).decode("utf-8"))


# ----------------------------------------------------------------------------------------------------------------
# Text normalization, split, files


def normalize_whitespace(text: str) -> str:
    """Spaces and tabs collapsed to one space, lines stripped, at most one blank line between paragraphs."""
    lines = [re.sub(r"[ \t\r\f\v\u00a0]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def unwrap_paragraphs(lines: Sequence[str]) -> str:
    """Hard-wrapped lines joined into paragraphs (blank lines separate paragraphs), one blank line between."""
    return "\n\n".join(re.sub(r"\s+", " ", p).strip() for p in _paragraphs("\n".join(lines)))


def is_heldout(source: str) -> bool:
    """Whether a document belongs to the held-out split: a stable hash of its source id, the same everywhere."""
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < HELDOUT_PER_10000


def split_documents(documents: Iterable[Document]) -> tuple[list[Document], list[Document]]:
    """(train, heldout) by ``is_heldout``; refuses duplicate source ids, which would make the split ambiguous."""
    train, heldout, seen = [], [], set()
    for document in documents:
        if document.source in seen:
            raise ValueError(f"duplicate document source id {document.source!r}")
        seen.add(document.source)
        (heldout if is_heldout(document.source) else train).append(document)
    return train, heldout


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[IO[str]]:
    """A UTF-8 text file opened under a temporary name beside ``path`` and renamed to ``path`` only when the block
    completes; on an exception the temporary file is removed and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(temporary, "x", encoding="utf-8") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_jsonl(path: Path, documents: Iterable[Document]) -> SplitCounts:
    count = characters = 0
    with atomic_write(path) as stream:
        for document in documents:
            stream.write(json.dumps({"text": document.text, "source": document.source}, ensure_ascii=False) + "\n")
            count += 1
            characters += len(document.text)
    return SplitCounts(count, characters)


def iter_documents(path: Path) -> Iterator[Document]:
    """The documents of a JSON-lines corpus file."""
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            record = json.loads(line)
            yield Document(record["source"], record["text"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_name(document: Document) -> str:
    return document.source.split("/", 1)[0]


def _count_by_source(train: list[Document], heldout: list[Document]) -> dict[str, dict[str, SplitCounts]]:
    counts: dict[str, dict[str, list[int]]] = {}
    for split, documents in (("train", train), ("heldout", heldout)):
        for document in documents:
            by_split = counts.setdefault(_source_name(document), {"train": [0, 0], "heldout": [0, 0]})
            by_split[split][0] += 1
            by_split[split][1] += len(document.text)
    return {source: {split: SplitCounts(*c) for split, c in s.items()} for source, s in counts.items()}


def write_corpus(
    cache_dir: Path, documents: Iterable[Document], packages: dict[str, str] | None = None, log: Log = print
) -> CorpusFiles:
    """Splits ``documents`` and writes ``train.jsonl``, ``heldout.jsonl`` and, last, ``manifest.json``."""
    train, heldout = split_documents(documents)
    if not train or not heldout:
        raise CorpusError(f"the held-out split left {len(train)} train and {len(heldout)} held-out documents")
    paths = {"train": cache_dir / "train.jsonl", "heldout": cache_dir / "heldout.jsonl"}
    files = {}
    for split, members in (("train", train), ("heldout", heldout)):
        path = paths[split]
        counts = write_jsonl(path, members)
        files[split] = {"path": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path),
                        "documents": counts.documents, "characters": counts.characters}
        log(f"wrote {path} ({counts.documents} documents, {counts.characters:,} characters)")
    manifest = {
        "format": CORPUS_FORMAT,
        "packages": packages or {},
        "heldout_rule": f"sha256(source)[:8] as big-endian integer mod 10000 < {HELDOUT_PER_10000}",
        "files": files,
        "sources": {source: {split: vars(c) for split, c in by_split.items()}
                    for source, by_split in _count_by_source(train, heldout).items()},
    }
    with atomic_write(cache_dir / "manifest.json") as stream:
        json.dump(manifest, stream, indent=2)
    return _corpus_files(cache_dir, manifest)


def _corpus_files(cache_dir: Path, manifest: dict) -> CorpusFiles:
    files = manifest["files"]
    return CorpusFiles(
        train=cache_dir / files["train"]["path"],
        heldout=cache_dir / files["heldout"]["path"],
        manifest=cache_dir / "manifest.json",
        train_counts=SplitCounts(files["train"]["documents"], files["train"]["characters"]),
        heldout_counts=SplitCounts(files["heldout"]["documents"], files["heldout"]["characters"]),
        source_counts={source: {split: SplitCounts(**c) for split, c in by_split.items()}
                       for source, by_split in manifest["sources"].items()},
    )


def load_cached_corpus(cache_dir: Path) -> CorpusFiles | None:
    """The corpus in ``cache_dir`` if its manifest is current and every file matches its size and sha256."""
    try:
        manifest = json.loads((cache_dir / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("format") != CORPUS_FORMAT:
            return None
        for entry in manifest["files"].values():
            path = cache_dir / entry["path"]
            if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
                return None
        return _corpus_files(cache_dir, manifest)
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Debian packages and the fetch


_REGISTRY_HINT = "this needs a Debian/Ubuntu machine with access to the Debian package registry"


def _tool_failure(command: list[str], error: Exception | subprocess.CompletedProcess) -> str:
    if isinstance(error, subprocess.CompletedProcess):
        detail = (error.stderr or error.stdout).strip() or f"exit status {error.returncode}"
    else:
        detail = str(error)
    return f"{' '.join(command)} failed: {detail}"


def _run(command: list[str], cwd: Path | None = None, hint: str = _REGISTRY_HINT) -> subprocess.CompletedProcess:
    """Runs a tool; a missing tool or a hang (10 minutes) is a CorpusError, an exit status is the caller's."""
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CorpusError(f"{_tool_failure(command, error)}; {hint}") from error


def _apt_get_download(package: str, dest: Path) -> tuple[Path | None, subprocess.CompletedProcess]:
    result = _run(["apt-get", "download", package], cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    return (debs[-1] if result.returncode == 0 and debs else None), result


def download_debian_package(package: str, dest: Path, log: Log = print) -> Path:
    """Downloads ``package``'s .deb into ``dest`` with ``apt-get download``; on a failure as root (a fresh
    machine has no package lists) runs ``apt-get update`` once and retries."""
    deb, result = _apt_get_download(package, dest)
    is_root = os.geteuid() == 0
    if deb is None and is_root:
        log(f"apt-get download {package} failed; refreshing the package lists with apt-get update")
        updated = _run(["apt-get", "update"])
        if updated.returncode != 0:
            raise CorpusError(f"{_tool_failure(['apt-get', 'update'], updated)}; {_REGISTRY_HINT}")
        deb, result = _apt_get_download(package, dest)
    if deb is None:
        advice = "" if is_root else " (on a fresh machine run `apt-get update` first)"
        raise CorpusError(f"{_tool_failure(['apt-get', 'download', package], result)}; {_REGISTRY_HINT}{advice}")
    return deb


def unpack_deb(deb: Path, dest: Path) -> Path:
    """Extracts a .deb's files (``dpkg-deb -x``, no maintainer scripts, nothing installed) into ``dest``."""
    command = ["dpkg-deb", "-x", str(deb), str(dest)]
    result = _run(command, hint="dpkg-deb comes with every Debian/Ubuntu system")
    if result.returncode != 0:
        raise CorpusError(_tool_failure(command, result))
    return dest


def _read_package_file(path: Path) -> bytes:
    if not path.is_file():
        raise ValueError(f"expected file {path} is missing (package layout changed?)")
    return path.read_bytes()


@dataclass(frozen=True)
class _Source:
    name: str
    package: str
    read: Callable[[Path], list[Document]]  # unpacked package root -> documents


SOURCES = (
    _Source("bible", BIBLE_PACKAGE, lambda root: bible_documents(root / BIBLE_MODULE_DIR)),
    _Source("austen", AUSTEN_PACKAGE, lambda root: austen_documents(root / AUSTEN_DATA_DIR)),
    _Source("jargon", JARGON_PACKAGE, jargon_documents_from_package),
)


def _package_version(deb: Path) -> str:
    return deb.name.split("_")[1] if deb.name.count("_") >= 2 else "unknown"


def build_documents(work_dir: Path, log: Log = print) -> tuple[list[Document], dict[str, str]]:
    """Downloads, unpacks and parses every source package: (documents, package -> Debian version)."""
    documents, versions = [], {}
    for source in SOURCES:
        log(f"{source.name}: apt-get download {source.package}")
        deb = download_debian_package(source.package, work_dir, log)
        versions[source.package] = _package_version(deb)
        root = unpack_deb(deb, work_dir / source.package)
        try:
            found = source.read(root)
        except (ValueError, KeyError, IndexError, OSError, zlib.error, lzma.LZMAError, EOFError, struct.error) as error:
            raise CorpusError(f"parsing {source.package} ({deb.name}) failed: {error}") from error
        if not found:
            raise CorpusError(f"parsing {source.package} ({deb.name}) found no documents")
        log(f"{source.name}: {len(found)} documents, {sum(len(d.text) for d in found):,} characters")
        documents += found
    return documents, versions


def default_cache_dir() -> Path:
    """``$QSPARSE_CACHE/corpus``, or ``~/.cache/megatron_qsparse/corpus``."""
    root = os.environ.get("QSPARSE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "megatron_qsparse") / "corpus"


def fetch_default_corpus(cache_dir: Path | None = None, log: Log = print) -> CorpusFiles:
    """The default corpus's train and held-out JSON-lines files, built on the first call and cached after it."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = load_cached_corpus(cache_dir)
    if cached is not None:
        log(f"default corpus cached in {cache_dir}")
        return cached
    log(f"building the default corpus in {cache_dir}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qsparse-corpus-") as work_dir:
        documents, versions = build_documents(Path(work_dir), log)
    return write_corpus(cache_dir, documents, versions, log)


def _describe(files: CorpusFiles) -> str:
    lines = [f"train    {files.train}  {files.train_counts.documents} documents, "
             f"{files.train_counts.characters:,} characters",
             f"heldout  {files.heldout}  {files.heldout_counts.documents} documents, "
             f"{files.heldout_counts.characters:,} characters"]
    for source, by_split in files.source_counts.items():
        parts = ", ".join(f"{split} {c.documents} documents / {c.characters:,} characters"
                          for split, c in by_split.items())
        lines.append(f"  {source:<7} {parts}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch (or find cached) the default public-domain corpus.")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default: {default_cache_dir()}")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        files = fetch_default_corpus(args.cache_dir)
    except CorpusError as error:
        parser.exit(1, f"error: {error}\n")
    print(_describe(files))
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
