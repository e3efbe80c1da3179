"""Plain-text clean-up shared by the source parsers: whitespace, paragraphs, hard-wrapped lines."""

from __future__ import annotations

import re
from collections.abc import Sequence


def normalize_whitespace(text: str) -> str:
    """Spaces and tabs collapsed to one space, lines stripped, at most one blank line between paragraphs."""
    lines = [re.sub(r"[ \t\r\f\v\u00a0]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def split_paragraphs(text: str) -> list[str]:
    """The non-blank paragraphs of ``text`` (separated by lines holding at most spaces and tabs)."""
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def unwrap_paragraphs(lines: Sequence[str]) -> str:
    """Hard-wrapped lines joined into paragraphs (blank lines separate paragraphs), one blank line between."""
    return "\n\n".join(re.sub(r"\s+", " ", p).strip() for p in split_paragraphs("\n".join(lines)))
