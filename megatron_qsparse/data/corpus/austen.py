"""Jane Austen's six novels from the janeaustenr R package: one document per chapter (ids like
``austen/emma/12``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from megatron_qsparse.data.corpus.debian import read_package_file
from megatron_qsparse.data.corpus.documents import Document
from megatron_qsparse.data.corpus.rdata import read_lazyload_db
from megatron_qsparse.data.corpus.text import unwrap_paragraphs

# Publication order; the names are the R variables of janeaustenr.
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
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
    books = read_lazyload_db(read_package_file(data_dir / "Rdata.rdb"), read_package_file(data_dir / "Rdata.rdx"))
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
