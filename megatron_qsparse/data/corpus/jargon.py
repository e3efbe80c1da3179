"""The Jargon File 4.4.7 (plain text): consecutive lexicon entries, or front and back matter sections, packed
into ~8 KB documents (ids like ``jargon/bandwidth``, from a chunk's first heading)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from megatron_qsparse.data.corpus.documents import Document
from megatron_qsparse.data.corpus.text import split_paragraphs

JARGON_CHUNK_CHARS = 8_000  # a chunk closes once it reaches this size ...
JARGON_MAX_CHARS = 16_000  # ... or before it would pass this one

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
        found = _drop_tables_of_contents(split_paragraphs("\n".join(unit.lines)))
        paragraphs = [textwrap.dedent(p) for p in found]
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
