"""What the default corpus is made of: a ``Document``, the counts and files of a built corpus, and
``CorpusError``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
