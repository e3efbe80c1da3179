"""The held-out split: a stable hash of each document's source id puts 2% of documents on the held-out side, the
same on every machine and in every run."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from megatron_qsparse.data.corpus.documents import Document

HELDOUT_PER_10000 = 200  # 2% of documents


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
