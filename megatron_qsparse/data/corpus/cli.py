"""The command line: fetch (or find cached) the default corpus and print its files and counts.

python -m megatron_qsparse.data.corpus [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from megatron_qsparse.data.corpus.documents import CorpusError, CorpusFiles
from megatron_qsparse.data.corpus.fetch import default_cache_dir, fetch_default_corpus


def _describe(files: CorpusFiles) -> str:
    lines = [
        f"train    {files.train}  {files.train_counts.documents} documents, "
        f"{files.train_counts.characters:,} characters",
        f"heldout  {files.heldout}  {files.heldout_counts.documents} documents, "
        f"{files.heldout_counts.characters:,} characters",
    ]
    for source, by_split in files.source_counts.items():
        parts = ", ".join(
            f"{split} {c.documents} documents / {c.characters:,} characters" for split, c in by_split.items()
        )
        lines.append(f"  {source:<7} {parts}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_qsparse.data.corpus",
        description="Fetch (or find cached) the default public-domain corpus.",
    )
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
